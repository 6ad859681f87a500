"""Blockwise attention on one process: the ``local`` strategy and the world-size-1 path.

Queries and keys are cut into blocks; each block pair runs through a block kernel and the
partials merge by log-sum-exp, so extra memory is O(block x block), never O(S x S).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringcompile.kernels.reference import block_backward, block_forward, block_keep_mask, merge_partials
from ringcompile.spec import AttentionSpec

DEFAULT_BLOCK = 512


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _pair_is_empty(q, k, q0, k0, seq_len, spec, mask_extras) -> bool:
    """True when the mask removes every pair of this block (so it is skipped, not computed)."""
    if k0 >= seq_len:
        return True
    if spec.mask is None:
        return False
    if spec.mask.kind == "causal":
        return k0 > q0 + q.shape[2] - 1
    keep = block_keep_mask(q, k, q_offset=q0, kv_offset=k0, seq_len=seq_len, mask=spec.mask,
                           mask_extras=mask_extras)
    return keep is not None and not bool(keep.any())


def local_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_extras: Sequence[torch.Tensor],
    score_extras: Sequence[torch.Tensor], seq_len: int, spec: AttentionSpec, *, q_offset: int = 0,
    kv_offset: int = 0, block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out fp32, lse fp32) for q at global ``q_offset`` against k/v at ``kv_offset``."""
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    outs, lses = [], []
    for qs, qe in _blocks(q.shape[2], block):
        qb = q[:, :, qs:qe]
        out = lse = None
        for ks, ke in _blocks(k.shape[2], block):
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            if _pair_is_empty(qb, kb, q_offset + qs, kv_offset + ks, seq_len, spec, mask_extras):
                continue
            o, s = block_forward(qb, kb, vb, scale=scale, q_offset=q_offset + qs, kv_offset=kv_offset + ks,
                                 seq_len=seq_len, mask=spec.mask, score=spec.score,
                                 mask_extras=mask_extras, score_extras=score_extras)
            out, lse = merge_partials(out, lse, o, s)
        if out is None:
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            out = q.new_zeros(*qb.shape[:3], v.shape[-1], dtype=acc)
            lse = q.new_full(qb.shape[:3], float("-inf"), dtype=acc)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def local_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, mask_extras: Sequence[torch.Tensor], score_extras: Sequence[torch.Tensor],
    seq_len: int, spec: AttentionSpec, *, q_offset: int = 0, kv_offset: int = 0,
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(dq, dk, dv, d_score_extras) in fp32, accumulated block pair by block pair."""
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc)
    dk = torch.zeros(k.shape, dtype=acc)
    dv = torch.zeros(v.shape, dtype=acc)
    d_extras: list[torch.Tensor | None] = [None] * len(score_extras)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    for qs, qe in _blocks(q.shape[2], block):
        qb = q[:, :, qs:qe]
        for ks, ke in _blocks(k.shape[2], block):
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            if _pair_is_empty(qb, kb, q_offset + qs, kv_offset + ks, seq_len, spec, mask_extras):
                continue
            g = block_backward(qb, kb, vb, out[:, :, qs:qe], dout[:, :, qs:qe], lse[:, :, qs:qe],
                               scale=scale, q_offset=q_offset + qs, kv_offset=kv_offset + ks,
                               seq_len=seq_len, mask=spec.mask, score=spec.score,
                               mask_extras=mask_extras, score_extras=score_extras,
                               delta=delta[:, :, qs:qe])
            dq[:, :, qs:qe] += g[0]
            dk[:, :, ks:ke] += g[1]
            dv[:, :, ks:ke] += g[2]
            for i, de in enumerate(g[3]):
                if de is not None:
                    d_extras[i] = de if d_extras[i] is None else d_extras[i] + de
    return dq, dk, dv, d_extras
