"""Device-generic block kernels: the reference math in plain torch ops, chunked over queries.

This is the path for non-CPU tensors whenever Triton cannot run a site (a mod the lowering
declines, triton missing, ``kernel="cpu"`` asked for on a GPU): ``kernels.cpu`` calls
``aten._scaled_dot_product_flash_attention_for_cpu``, which has no CUDA kernel. Every op
used here (matmul, logsumexp, masked_fill, autograd of the score mod) runs on any device.

Queries are cut into chunks so one score tile stays about ``TILE_ELEMENTS`` elements
whatever block the caller hands in; each chunk is one ``reference`` call at its own global
query offset (mods read global indices, so extras need no slicing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ringcompile.mods import Mod

if TYPE_CHECKING:
    from .dropout import Seed

from . import reference
from .reference import add_extra_grads

TILE_ELEMENTS = 1 << 24  # score elements per query chunk (64 MiB in fp32)


def query_chunk(q: torch.Tensor, k: torch.Tensor, tile_elements: int = TILE_ELEMENTS) -> int:
    """Query rows per chunk so that B * Hq * rows * Sk stays about ``tile_elements``."""
    B, Hq, Sq, _ = q.shape
    per_row = max(1, B * Hq * k.shape[2])
    return max(1, min(Sq, tile_elements // per_row))


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int = 0,
    kv_offset: int = 0, seq_len: int | None = None, mask: Mod | None = None, score: Mod | None = None,
    mask_extras: Sequence[torch.Tensor] = (), score_extras: Sequence[torch.Tensor] = (),
    dropout_p: float = 0.0, dropout_seed: Seed | None = None,
    tile_elements: int = TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one block pair; see ``reference.block_forward``."""
    rows = query_chunk(q, k, tile_elements)
    if rows >= q.shape[2]:
        return reference.block_forward(q, k, v, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                                       seq_len=seq_len, mask=mask, score=score, mask_extras=mask_extras,
                                       score_extras=score_extras, dropout_p=dropout_p,
                                       dropout_seed=dropout_seed)
    outs, lses = [], []
    for i0 in range(0, q.shape[2], rows):
        o, s = reference.block_forward(q[:, :, i0:i0 + rows], k, v, scale=scale, q_offset=q_offset + i0,
                                       kv_offset=kv_offset, seq_len=seq_len, mask=mask, score=score,
                                       mask_extras=mask_extras, score_extras=score_extras,
                                       dropout_p=dropout_p, dropout_seed=dropout_seed)
        outs.append(o)
        lses.append(s)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def block_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
    lse: torch.Tensor, *, scale: float, q_offset: int = 0, kv_offset: int = 0, seq_len: int | None = None,
    mask: Mod | None = None, score: Mod | None = None, mask_extras: Sequence[torch.Tensor] = (),
    score_extras: Sequence[torch.Tensor] = (), delta: torch.Tensor | None = None,
    dropout_p: float = 0.0, dropout_seed: Seed | None = None,
    tile_elements: int = TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(dq, dk, dv, d_score_extras) of one block pair; see ``reference.block_backward``."""
    rows = query_chunk(q, k, tile_elements)
    common = dict(scale=scale, kv_offset=kv_offset, seq_len=seq_len, mask=mask, score=score,
                  mask_extras=mask_extras, score_extras=score_extras, dropout_p=dropout_p,
                  dropout_seed=dropout_seed)
    if rows >= q.shape[2]:
        return reference.block_backward(q, k, v, out, dout, lse, q_offset=q_offset, delta=delta, **common)
    dqs = []
    dk = dv = None
    d_extras: list[torch.Tensor | None] = [None] * len(score_extras)
    for i0 in range(0, q.shape[2], rows):
        rs = slice(i0, i0 + rows)
        g = reference.block_backward(q[:, :, rs], k, v, out[:, :, rs], dout[:, :, rs], lse[:, :, rs],
                                     q_offset=q_offset + i0, delta=None if delta is None else delta[:, :, rs],
                                     **common)
        dqs.append(g[0])
        dk = g[1] if dk is None else dk + g[1]
        dv = g[2] if dv is None else dv + g[2]
        add_extra_grads(d_extras, g[3])
    return torch.cat(dqs, dim=2), dk, dv, d_extras
