"""Blockwise attention on one process: the ``local`` strategy and the per-chunk worker of the ring.

Queries and keys are cut into blocks; each block pair runs through a block kernel (chosen by
``kernels.select.block_kernels``) and the partials merge by log-sum-exp, so extra memory is
O(block x block), never O(S x S). Block pairs the mask removes entirely are skipped; causal
pairs it keeps entirely run without a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringcompile.kernels.dropout import seed_to_int
from ringcompile.kernels.reference import add_extra_grads, block_keep_mask, merge_partials
from ringcompile.kernels.select import BlockKernels, block_kernels
from ringcompile.mods import Mod
from ringcompile.spec import AttentionSpec

DEFAULT_BLOCK = 512


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_INDEX_KINDS = ("causal", "sliding_window")
_MATERIALISE_LIMIT = 512 * 512  # query x key tokens of a pair whose data-dependent mask may be evaluated


def mask_parts(mask: Mod) -> list[tuple[str, dict]]:
    """(kind, params) of every mask joined in ``mask`` (an AND).

    ``and_masks`` compositions carry their parts; a mod classified by discovery ("causal+padding",
    "sliding_window+padding") has at most one index part, so its params belong to that part. Two
    index parts without ``parts`` cannot be told apart: they come back as "custom" (unknown).
    """
    if mask.parts:
        return [kp for p in mask.parts for kp in mask_parts(p)]
    kinds = mask.kinds
    if len(kinds) == 1:
        return [(kinds[0], dict(mask.params))]
    n_index = sum(k in _INDEX_KINDS for k in kinds)
    return [(k, dict(mask.params)) if k not in _INDEX_KINDS or n_index == 1 else ("custom", {})
            for k in kinds]


def _index_structure(kind: str, params: dict, q0: int, q1: int, k0: int, k1: int) -> str | None:
    if kind == "causal":
        return "empty" if k0 > q1 else "full" if k1 <= q0 else "partial"
    if kind == "sliding_window":
        w = params.get("window")
        if not isinstance(w, int):
            return None
        if params.get("causal", True):
            if k0 > q1 or q0 - k1 >= w:
                return "empty"
            return "full" if k1 <= q0 and q1 - k0 < w else "partial"
        if k0 - q1 >= w or q0 - k1 >= w:
            return "empty"
        return "full" if q1 - k0 < w and k1 - q0 < w else "partial"
    return None


def mask_structure(mask: Mod, q0: int, q1: int, k0: int, k1: int) -> str | None:
    """"empty", "full" or "partial" for masks whose structure is known from indices alone
    (inclusive query range [q0, q1], key range [k0, k1]); None when it depends on data.

    Host integer arithmetic only. A composition is an AND: "empty" when any part is, "full" when
    every part is; a part that depends on data (padding, a dense or custom mask) leaves it None
    unless an index part already makes it "empty".
    """
    states = [_index_structure(kind, params, q0, q1, k0, k1) for kind, params in mask_parts(mask)]
    if "empty" in states:
        return "empty"
    if None in states:
        return None
    return "full" if all(st == "full" for st in states) else "partial"


def host_checks_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing extra (CPU), unlike on a GPU,
    where ``bool(t)`` waits for every queued kernel."""
    return device.type == "cpu"


def _pair_is_empty(q, k, q0, k0, seq_len, spec, mask_extras) -> bool:
    """True when the mask removes every pair of this block (so it is skipped, not computed).

    Decided from indices (host ints); a mask that depends on data (padding) is only evaluated
    on the CPU, for pairs of at most ``_MATERIALISE_LIMIT`` entries. On a GPU such a pair runs and
    the kernel masks it, so the host never waits."""
    if k0 >= seq_len or q.shape[2] == 0 or k.shape[2] == 0:
        return True
    if spec.mask is None:
        return False
    known = mask_structure(spec.mask, q0, q0 + q.shape[2] - 1, k0, k0 + k.shape[2] - 1)
    if known is not None:
        return known == "empty"
    if not host_checks_are_free(q.device) or q.shape[2] * k.shape[2] > _MATERIALISE_LIMIT:
        return False  # a whole chunk's mask is not materialised just to ask: its kernel masks it
    keep = block_keep_mask(q, k, q_offset=q0, kv_offset=k0, seq_len=seq_len, mask=spec.mask,
                           mask_extras=mask_extras)
    return keep is not None and not bool(keep.any())


def _pair_mask(q, k, q0, k0, spec):
    """The mask to apply to a non-empty pair: None (the unmasked fast path) when it keeps all of it."""
    if spec.mask is not None and mask_structure(spec.mask, q0, q0 + q.shape[2] - 1, k0,
                                             k0 + k.shape[2] - 1) == "full":
        return None
    return spec.mask


def _dropout_kwargs(spec: AttentionSpec, dropout_seed, kernels: BlockKernels) -> dict:
    """The kernels' dropout arguments: the seed tensor itself for kernels that read it on the device,
    else the seed read once here (not once per block pair)."""
    if spec.dropout_p > 0:  # a missing seed is the kernel's clear error, never silently no dropout
        seed = dropout_seed if kernels.device_seed else seed_to_int(dropout_seed)
        return {"dropout_p": spec.dropout_p, "dropout_seed": seed}
    return {}


def local_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_extras: Sequence[torch.Tensor],
    score_extras: Sequence[torch.Tensor], seq_len: int, spec: AttentionSpec, *, q_offset: int = 0,
    kv_offset: int = 0, block: int | None = None, kernels: BlockKernels | None = None,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out fp32, lse fp32) for q at global ``q_offset`` against k/v at ``kv_offset``."""
    block = DEFAULT_BLOCK if block is None else block
    kernels = block_kernels(spec, q.device) if kernels is None else kernels
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    extra = _dropout_kwargs(spec, dropout_seed, kernels)
    acc = acc_dtype(q)
    outs, lses = [], []
    for qs, qe in _blocks(q.shape[2], block):
        qb = q[:, :, qs:qe]
        out = lse = None
        for ks, ke in _blocks(k.shape[2], block):
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            q0, k0 = q_offset + qs, kv_offset + ks
            if _pair_is_empty(qb, kb, q0, k0, seq_len, spec, mask_extras):
                continue
            o, s = kernels.forward(qb, kb, vb, scale=scale, q_offset=q0, kv_offset=k0, seq_len=seq_len,
                                   mask=_pair_mask(qb, kb, q0, k0, spec), score=spec.score,
                                   mask_extras=mask_extras, score_extras=score_extras, **extra)
            out, lse = merge_partials(out, lse, o.to(acc), s.to(acc))
        if out is None:
            out = q.new_zeros(*qb.shape[:3], v.shape[-1], dtype=acc)
            lse = q.new_full(qb.shape[:3], float("-inf"), dtype=acc)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return q.new_zeros(*q.shape[:3], v.shape[-1], dtype=acc), q.new_zeros(q.shape[:3], dtype=acc)
    if len(outs) == 1:  # one query block (whole chunks): no copy
        return outs[0], lses[0]
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def local_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, mask_extras: Sequence[torch.Tensor], score_extras: Sequence[torch.Tensor],
    seq_len: int, spec: AttentionSpec, *, q_offset: int = 0, kv_offset: int = 0,
    block: int | None = None, kernels: BlockKernels | None = None, delta: torch.Tensor | None = None,
    dropout_seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(dq, dk, dv, d_score_extras) in fp32, accumulated block pair by block pair."""
    block = DEFAULT_BLOCK if block is None else block
    kernels = block_kernels(spec, q.device) if kernels is None else kernels
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    extra = _dropout_kwargs(spec, dropout_seed, kernels)
    acc = acc_dtype(q)
    if delta is None:
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if block >= q.shape[2] and block >= k.shape[2]:  # one pair (whole chunks): the kernel's own buffers
        if _pair_is_empty(q, k, q_offset, kv_offset, seq_len, spec, mask_extras):
            zeros = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v)]
            return zeros[0], zeros[1], zeros[2], [None] * len(score_extras)
        g = kernels.backward(q, k, v, out, dout, lse, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                             seq_len=seq_len, mask=_pair_mask(q, k, q_offset, kv_offset, spec),
                             score=spec.score, mask_extras=mask_extras, score_extras=score_extras,
                             delta=delta, **extra)
        return g[0].to(acc), g[1].to(acc), g[2].to(acc), list(g[3])
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    d_extras: list[torch.Tensor | None] = [None] * len(score_extras)
    for qs, qe in _blocks(q.shape[2], block):
        qb = q[:, :, qs:qe]
        for ks, ke in _blocks(k.shape[2], block):
            kb, vb = k[:, :, ks:ke], v[:, :, ks:ke]
            q0, k0 = q_offset + qs, kv_offset + ks
            if _pair_is_empty(qb, kb, q0, k0, seq_len, spec, mask_extras):
                continue
            g = kernels.backward(qb, kb, vb, out[:, :, qs:qe], dout[:, :, qs:qe], lse[:, :, qs:qe],
                                 scale=scale, q_offset=q0, kv_offset=k0, seq_len=seq_len,
                                 mask=_pair_mask(qb, kb, q0, k0, spec), score=spec.score,
                                 mask_extras=mask_extras, score_extras=score_extras,
                                 delta=delta[:, :, qs:qe], **extra)
            dq[:, :, qs:qe] += g[0]
            dk[:, :, ks:ke] += g[1]
            dv[:, :, ks:ke] += g[2]
            add_extra_grads(d_extras, g[3])
    return dq, dk, dv, d_extras
