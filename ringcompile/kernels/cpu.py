"""Fast CPU block kernels with exactly the contract of ``kernels.reference``.

Three paths, chosen per block pair (and per query chunk inside a pair):

* fused: PyTorch's flash attention for CPU (``_scaled_dot_product_flash_attention_for_cpu``)
  returns (out, natural-log lse) and its backward, given the FINAL out and lse, returns exactly
  this pair's dq/dk/dv (GQA handled natively, dk/dv summed over the group). Used for no mask,
  for block pairs the mask fully keeps, and for causal pairs, which are cut into at most one
  fully kept piece plus one diagonal piece (``is_causal`` is top-left aligned, so any pair whose
  query and key ranges start at the same global index is a diagonal piece).
* fused with an additive mask: other masks (sliding window, padding, custom) evaluated on the
  chunk's global indices and passed as a -inf/0 ``attn_mask``; fully masked chunks are skipped.
* math: score mods and dropout, chunked over queries so a score tile stays about
  ``TILE_ELEMENTS``; GQA by a grouped view (K/V never repeated); the score mod alone is
  differentiated by autograd, the matmuls by hand.

Keys at or past ``seq_len`` are sliced away instead of masked. Inputs are computed in fp32
(fp64 for fp64): bf16/fp16 blocks are upcast, so partial outputs keep fp32 precision.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from ringcompile.mods import Mod, index_grid

from .dropout import HeadOffsetSeed, Seed, check_dropout, dropout_scale, seed_to_int
from .reference import add_extra_grads, autograd_enabled, block_keep_mask, merge_partials

TILE_ELEMENTS = 1 << 22  # score-tile elements per chunk on the math path (16 MiB in fp32)
MASK_TILE_ELEMENTS = 1 << 22  # mask elements per chunk on the fused-with-mask path
PREFERRED_BLOCK = 16384  # tokens per block call the runtime should use with these kernels

_FUSED_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FUSED_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_NEG_INF = float("-inf")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class Piece:
    """Local query rows [q0, q1) against local keys [k0, k1) and how to run them.

    kind: "full" (every pair kept), "diagonal" (causal, top-left aligned: key k0 + j is kept
    for query q0 + i iff j <= i) or "general" (evaluate the mask / score mod / dropout).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    kind: str


def plan_pieces(
    sq: int, sk: int, *, q_offset: int, kv_offset: int, seq_len: int | None, mask: Mod | None,
    score: Mod | None, dropout: bool, fused_ok: bool = True,
) -> list[Piece]:
    """Cut one block pair into pieces the fast paths can run; an empty list means fully masked."""
    if seq_len is not None:
        sk = max(0, min(sk, seq_len - kv_offset))
    if sq == 0 or sk == 0:
        return []
    if score is not None or dropout or not fused_ok:
        return [Piece(0, sq, 0, sk, "general")]
    if mask is None:
        return [Piece(0, sq, 0, sk, "full")]
    if mask.kind != "causal":
        return [Piece(0, sq, 0, sk, "general")]
    d = q_offset - kv_offset  # key j is kept for query i iff j <= i + d
    if d >= sk - 1:
        return [Piece(0, sq, 0, sk, "full")]
    if d + sq - 1 < 0:
        return []
    if d >= 0:
        pieces = [Piece(0, sq, 0, d, "full")] if d > 0 else []
        return pieces + [Piece(0, sq, d, sk, "diagonal")]
    return [Piece(-d, sq, 0, sk, "diagonal")]


def _fused_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *more: torch.Tensor) -> bool:
    """The fused op needs equal head dims, and it hides NaN/inf inputs (eager propagates them).

    A sum is non-finite when any element is (or, harmlessly, when finite values overflow it).
    """
    if not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        return False
    return all(math.isfinite(float(t.sum())) for t in (q, k, v, *more[:2]))  # cheap; inf/NaN propagate


def _dense_last(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with a unit stride along the head dim: the fused op reads rows as dense vectors
    and gives wrong values (no error) for q/k/v whose last dim is strided, e.g. heads split from a
    (B, C, S) layout as (B, H, D, S).permute(0, 1, 3, 2) (SqueezeBERT's conv projections). Public SDPA
    checks this before picking the kernel; calling the op directly must too."""
    x = x.to(dtype)
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


# ---------------------------------------------------------------------------- forward


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int = 0,
    kv_offset: int = 0, seq_len: int | None = None, mask: Mod | None = None, score: Mod | None = None,
    mask_extras: Sequence[torch.Tensor] = (), score_extras: Sequence[torch.Tensor] = (),
    dropout_p: float = 0.0, dropout_seed: Seed | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one block pair, as ``reference.block_forward``; fully masked rows: 0 and -inf."""
    dropout_seed = seed_to_int(dropout_seed)
    check_dropout(dropout_p, dropout_seed)
    acc = acc_dtype(q.dtype)
    B, Hq, Sq, _ = q.shape
    fused_ok = _fused_ok(q, k, v)
    pieces = plan_pieces(Sq, k.shape[2], q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len,
                         mask=mask, score=score, dropout=dropout_p > 0, fused_ok=fused_ok)
    qa, ka, va = _dense_last(q, acc), _dense_last(k, acc), _dense_last(v, acc)
    if len(pieces) == 1 and pieces[0].kind != "general" and (pieces[0].q0, pieces[0].q1) == (0, Sq):
        pc = pieces[0]  # the common case: one fused call covers every query row, no copies
        return _FUSED_FWD(qa, ka[:, :, pc.k0:pc.k1], va[:, :, pc.k0:pc.k1], 0.0, pc.kind == "diagonal",
                          scale=scale)
    out = q.new_zeros(B, Hq, Sq, v.shape[-1], dtype=acc)
    lse = q.new_full((B, Hq, Sq), _NEG_INF, dtype=acc)
    covered: list[tuple[int, int]] = []
    for pc in pieces:
        qp, kp, vp = qa[:, :, pc.q0:pc.q1], ka[:, :, pc.k0:pc.k1], va[:, :, pc.k0:pc.k1]
        if pc.kind == "general":
            ctx = _Context(scale, q_offset + pc.q0, kv_offset + pc.k0, mask, score, mask_extras,
                           score_extras, dropout_p, dropout_seed, not fused_ok)
            o, s = _general_forward(qp, kp, vp, ctx)
        else:
            o, s = _FUSED_FWD(qp, kp, vp, 0.0, pc.kind == "diagonal", scale=scale)
        if any(a < pc.q1 and pc.q0 < b for a, b in covered):
            o, s = merge_partials(out[:, :, pc.q0:pc.q1], lse[:, :, pc.q0:pc.q1], o, s)
        out[:, :, pc.q0:pc.q1] = o
        lse[:, :, pc.q0:pc.q1] = s
        covered.append((pc.q0, pc.q1))
    return out, lse


@dataclasses.dataclass(frozen=True)
class _Context:
    """What the general path needs besides tensors; offsets are the piece's global starts."""

    scale: float
    q_offset: int
    kv_offset: int
    mask: Mod | None
    score: Mod | None
    mask_extras: Sequence[torch.Tensor]
    score_extras: Sequence[torch.Tensor]
    dropout_p: float
    dropout_seed: int | HeadOffsetSeed | None
    force_math: bool = False

    @property
    def math(self) -> bool:
        return self.score is not None or self.dropout_p > 0 or self.force_math


def _chunk_rows(ctx: _Context, q: torch.Tensor, k: torch.Tensor) -> int:
    """Query rows per chunk so a score tile (math) or mask tile (fused) stays within budget."""
    B, Hq, _, _ = q.shape
    Sk = k.shape[2]
    if ctx.math:
        return max(1, TILE_ELEMENTS // max(1, B * Hq * Sk))
    probe = _chunk_keep(q[:, :, :1], k, 0, ctx)  # does the mask vary with batch / head?
    spread = 1 if probe is None else math.prod(probe.shape[:-2])  # batch x head extent of the mask
    return max(1, MASK_TILE_ELEMENTS // max(1, spread * Sk))


def _chunk_keep(q: torch.Tensor, k: torch.Tensor, i0: int, ctx: _Context) -> torch.Tensor | None:
    return block_keep_mask(q, k, q_offset=ctx.q_offset + i0, kv_offset=ctx.kv_offset, seq_len=None,
                           mask=ctx.mask, mask_extras=ctx.mask_extras)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.full((), _NEG_INF, dtype=dtype, device=keep.device))


def _empty_rows(keep: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    return (~keep.any(dim=-1)).expand(shape)


def _chunk_plan(q: torch.Tensor, k: torch.Tensor, i0: int, ctx: _Context):
    """(keep, j0, j1, ctx) for one query chunk, or None when the mask removes all of it.

    Keys are trimmed to the span the chunk keeps (sliding windows and causal edges then cost
    their band, not the whole block); ``keep`` is None when that span is kept entirely.
    """
    keep = _chunk_keep(q, k, i0, ctx)
    if keep is None:
        return None, 0, k.shape[2], ctx
    if keep.dim() < 4:  # broadcasting aligns from the right
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    cols = keep.reshape(-1, keep.shape[-1]).any(0)
    if not bool(cols.any()):
        return None
    if keep.shape[-1] != k.shape[2]:  # a mask that does not depend on kv_idx
        keep = keep.expand(*keep.shape[:-1], k.shape[2])
        cols = cols.expand(k.shape[2])
    kept = torch.nonzero(cols).flatten()
    j0, j1 = int(kept[0]), int(kept[-1]) + 1
    keep = keep[..., j0:j1]
    if bool(keep.all()):
        keep = None
    if j0 > 0:
        ctx = dataclasses.replace(ctx, kv_offset=ctx.kv_offset + j0)
    return keep, j0, j1, ctx


def _general_forward(q, k, v, ctx: _Context) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Sq, _ = q.shape
    out = q.new_zeros(B, Hq, Sq, v.shape[-1])
    lse = q.new_full((B, Hq, Sq), _NEG_INF)
    rows = _chunk_rows(ctx, q, k)
    for i0 in range(0, Sq, rows):
        i1 = min(Sq, i0 + rows)
        qc = q[:, :, i0:i1]
        plan = _chunk_plan(qc, k, i0, ctx)
        if plan is None:
            continue
        keep, j0, j1, cctx = plan
        kc, vc = k[:, :, j0:j1], v[:, :, j0:j1]
        if cctx.math:
            o, s = _math_forward(qc, kc, vc, keep, i0, cctx)
        else:
            attn_mask = None if keep is None else _additive(keep, q.dtype)
            o, s = _FUSED_FWD(qc, kc, vc, 0.0, False, attn_mask=attn_mask, scale=ctx.scale)
            if keep is not None:
                empty = _empty_rows(keep, s.shape)
                s = s.masked_fill(empty, _NEG_INF)
                o = o.masked_fill(empty.unsqueeze(-1), 0.0)
        out[:, :, i0:i1] = o
        lse[:, :, i0:i1] = s
    return out, lse


# ---------------------------------------------------------------------------- grouped (GQA) math


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, Hq, S, D) -> (B, Hkv, g*S, D): query heads of one KV head side by side, no copy of K/V."""
    B, Hq, S, D = x.shape
    return x.reshape(B, hkv, (Hq // hkv) * S, D)


def _ungrouped(x: torch.Tensor, hq: int) -> torch.Tensor:
    B, hkv, gs, D = x.shape
    return x.reshape(B, hq, gs * hkv // hq, D)


def _raw_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Hq, Sq, Sk) scaled scores computed per KV head."""
    s = torch.matmul(_grouped(q, k.shape[1]), k.transpose(-2, -1))
    s.mul_(scale)
    return _ungrouped(s, q.shape[1])


def _grid(q: torch.Tensor, k: torch.Tensor, i0: int, ctx: _Context):
    B, Hq, Sq, _ = q.shape
    return index_grid(B, Hq, ctx.q_offset + i0, Sq, ctx.kv_offset, k.shape[2], device=q.device)


def _apply_score(s: torch.Tensor, grid, extras, ctx: _Context) -> torch.Tensor:
    return ctx.score.fn(s, *grid, *extras).to(s.dtype) if ctx.score is not None else s


def _dropout(grid, ctx: _Context, dtype: torch.dtype) -> torch.Tensor | None:
    if ctx.dropout_p <= 0:
        return None
    return dropout_scale(ctx.dropout_seed, *grid, ctx.dropout_p, dtype)


def _math_forward(qc, k, v, keep, i0, ctx: _Context) -> tuple[torch.Tensor, torch.Tensor]:
    grid = _grid(qc, k, i0, ctx)
    s = _apply_score(_raw_scores(qc, k, ctx.scale), grid, ctx.score_extras, ctx)
    if keep is not None:
        s = s.masked_fill(~keep, _NEG_INF)
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe.unsqueeze(-1))
    drop = _dropout(grid, ctx, p.dtype)
    if drop is not None:
        p = p * drop
    out = torch.matmul(_grouped(p, k.shape[1]), v)
    return _ungrouped(out, qc.shape[1]), lse


# ---------------------------------------------------------------------------- backward


def block_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
    lse: torch.Tensor, *, scale: float, q_offset: int = 0, kv_offset: int = 0, seq_len: int | None = None,
    mask: Mod | None = None, score: Mod | None = None, mask_extras: Sequence[torch.Tensor] = (),
    score_extras: Sequence[torch.Tensor] = (), delta: torch.Tensor | None = None,
    dropout_p: float = 0.0, dropout_seed: Seed | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(dq, dk, dv, d_score_extras) of this pair given the final out/lse, as ``reference.block_backward``.

    A score-mod extra gets a gradient tensor when this pair depends on it, else None.
    """
    dropout_seed = seed_to_int(dropout_seed)
    check_dropout(dropout_p, dropout_seed)
    acc = acc_dtype(q.dtype)
    d_extras: list[torch.Tensor | None] = [None] * len(score_extras)
    fused_ok = _fused_ok(q, k, v, out, dout, lse)
    pieces = plan_pieces(q.shape[2], k.shape[2], q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len,
                         mask=mask, score=score, dropout=dropout_p > 0, fused_ok=fused_ok)
    qa, ka, va = _dense_last(q, acc), _dense_last(k, acc), _dense_last(v, acc)
    oa, doa = _dense_last(out, acc), _dense_last(dout, acc)
    lse_a = lse.to(acc)
    safe_lse = torch.where(torch.isneginf(lse_a), torch.zeros_like(lse_a), lse_a)
    if len(pieces) == 1 and pieces[0].kind != "general" and pieces[0] == Piece(0, q.shape[2], 0, k.shape[2],
                                                                                 pieces[0].kind):
        # the common case: one fused call covers the whole pair, its gradients are the answer
        dq, dk, dv = _FUSED_BWD(doa, qa, ka, va, oa, safe_lse, 0.0, pieces[0].kind == "diagonal", scale=scale)
        return dq, dk, dv, d_extras
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for pc in pieces:
        rq, rk = slice(pc.q0, pc.q1), slice(pc.k0, pc.k1)
        qp, kp, vp = qa[:, :, rq], ka[:, :, rk], va[:, :, rk]
        if pc.kind == "general":
            ctx = _Context(scale, q_offset + pc.q0, kv_offset + pc.k0, mask, score, mask_extras,
                           score_extras, dropout_p, dropout_seed, not fused_ok)
            if delta is None:
                dl = (doa[:, :, rq] * oa[:, :, rq]).sum(-1)
            else:
                dl = delta[:, :, rq].to(acc)
            g = _general_backward(qp, kp, vp, oa[:, :, rq], doa[:, :, rq], safe_lse[:, :, rq], dl, ctx)
            add_extra_grads(d_extras, g[3])
        else:
            g = _FUSED_BWD(doa[:, :, rq], qp, kp, vp, oa[:, :, rq], safe_lse[:, :, rq], 0.0,
                           pc.kind == "diagonal", scale=scale)
        dq[:, :, rq] += g[0]
        dk[:, :, rk] += g[1]
        dv[:, :, rk] += g[2]
    return dq, dk, dv, d_extras


def _general_backward(q, k, v, out, dout, lse, delta, ctx: _Context):
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    d_extras: list[torch.Tensor | None] = [None] * len(ctx.score_extras)
    B, Hq, Sq, _ = q.shape
    rows = _chunk_rows(ctx, q, k)
    for i0 in range(0, Sq, rows):
        i1 = min(Sq, i0 + rows)
        r = slice(i0, i1)
        qc = q[:, :, r]
        plan = _chunk_plan(qc, k, i0, ctx)
        if plan is None:
            continue
        keep, j0, j1, cctx = plan
        kc, vc = k[:, :, j0:j1], v[:, :, j0:j1]
        if cctx.math:
            g = _math_backward(qc, kc, vc, dout[:, :, r], lse[:, :, r], delta[:, :, r], keep, i0, cctx)
            add_extra_grads(d_extras, g[3])
        else:
            attn_mask = None if keep is None else _additive(keep, q.dtype)
            g = _FUSED_BWD(dout[:, :, r], qc, kc, vc, out[:, :, r], lse[:, :, r], 0.0, False,
                           attn_mask=attn_mask, scale=ctx.scale)
        dq[:, :, r] += g[0]
        dk[:, :, j0:j1] += g[1]
        dv[:, :, j0:j1] += g[2]
    return dq, dk, dv, d_extras


def _math_backward(qc, k, v, dout, lse, delta, keep, i0, ctx: _Context):
    hkv, hq = k.shape[1], qc.shape[1]
    grid = _grid(qc, k, i0, ctx)
    raw = _raw_scores(qc, k, ctx.scale)
    extras = [e.detach().requires_grad_(True) if e.is_floating_point() else e for e in ctx.score_extras]
    if ctx.score is not None:
        raw.requires_grad_(True)
        with autograd_enabled():
            s = _apply_score(raw, grid, extras, ctx)
    else:
        s = raw
    p = torch.exp(s.detach() - lse.unsqueeze(-1))
    if keep is not None:
        p = p.masked_fill(~keep, 0.0)
    drop = _dropout(grid, ctx, p.dtype)
    p_used = p if drop is None else p * drop
    do_g = _grouped(dout, hkv)
    dv = torch.matmul(_grouped(p_used, hkv).transpose(-2, -1), do_g)
    dp = _ungrouped(torch.matmul(do_g, v.transpose(-2, -1)), hq)
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - delta.unsqueeze(-1))
    d_extras: list[torch.Tensor | None] = [None] * len(extras)
    if ctx.score is not None:
        wanted = [raw] + [e for e in extras if e.requires_grad]
        with autograd_enabled():
            grads = torch.autograd.grad(s, wanted, ds, allow_unused=True)
        ds = grads[0] if grads[0] is not None else torch.zeros_like(ds)
        it = iter(grads[1:])
        d_extras = [next(it) if e.requires_grad else None for e in extras]
    ds_g = _grouped(ds, hkv)
    dq = _ungrouped(torch.matmul(ds_g, k), hq).mul_(ctx.scale)
    dk = torch.matmul(ds_g.transpose(-2, -1), _grouped(qc, hkv)).mul_(ctx.scale)
    return dq, dk, dv, d_extras
