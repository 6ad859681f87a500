"""Ulysses: all-to-all over heads, so each rank attends over the full sequence for H/N heads.

q, k, v go from (B, H, S/N) shards to (B, H/N, S) head groups, attention runs locally, and
the output (with its lse) goes back. Query AND kv heads must divide by N (GQA groups stay
on one rank). Mods see global head indices: the head group's offset is added to ``h``.

Dropout: the keep mask is a hash of global (b, h, q, kv) and the seed (``kernels.dropout``).
The pieces already carry global token offsets; rank r holds query heads [h0, h0 + H/N) with
h0 = r * H/N, and the hash takes the query head (a GQA group's kv head stays on the rank), so
the seed travels as ``HeadOffsetSeed(seed, h0)`` (the seed as given: a device tensor is not read
on the host) and every rank drops exactly the entries one process (or the ring) drops. Every
kernel set adds h0 to its head index in the hash (the Triton kernels as their ``drop_head_offset``
argument), so the rank's usual kernels run.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from ringcompile.errors import OptionError
from ringcompile.kernels.dropout import with_head_offset
from ringcompile.kernels.select import BlockKernels, block_kernels
from ringcompile.mods import Mod
from ringcompile.spec import AttentionSpec

from ..layouts import global_order
from .common import (
    RingContext,
    backward_pairs,
    chunk_pieces,
    delta_of,
    empty_outputs,
    forward_pairs,
    grad_buffers,
    reduce_extras,
)

Tensor = torch.Tensor
_HEAD_INVARIANT = {"causal", "sliding_window", "padding"}
_CACHE: dict[tuple[int, int], tuple[AttentionSpec, AttentionSpec, BlockKernels]] = {}
_LOCK = threading.Lock()


def check_heads(hq: int, hkv: int, world_size: int) -> None:
    if hq % world_size or hkv % world_size:
        raise OptionError(
            f"strategy 'ulysses' splits heads across the {world_size} ranks, so query heads ({hq}) and "
            f"kv heads ({hkv}) must both be divisible by {world_size}; use strategy 'ring', 'zigzag' or "
            "'allgather' for this shape"
        )


def shift_heads(mod: Mod | None, h0: int) -> Mod | None:
    """The same mod seen from a head group starting at global head ``h0``."""
    if mod is None or h0 == 0:
        return mod
    fn = mod.fn
    if mod.is_mask:
        def shifted(b, h, q, kv, *extras):
            return fn(b, h + h0, q, kv, *extras)
    else:
        def shifted(s, b, h, q, kv, *extras):
            return fn(s, b, h + h0, q, kv, *extras)
    keep_kind = set(mod.kinds) <= _HEAD_INVARIANT
    return Mod(shifted, mod.is_mask, mod.kind if keep_kind else "custom",
               dict(mod.params) if keep_kind else {}, mod.n_extras, f"{mod.describe()} (heads from {h0})",
               parts=mod.parts if keep_kind else ())


def _group_spec(ctx: RingContext, h0: int, device: torch.device) -> tuple[AttentionSpec, BlockKernels]:
    key = (id(ctx.spec), h0)
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None and hit[0] is ctx.spec:
        return hit[1], hit[2]
    spec = ctx.spec.replace(mask=shift_heads(ctx.spec.mask, h0), score=shift_heads(ctx.spec.score, h0))
    kernels = block_kernels(spec, device) if h0 else ctx.kernels
    with _LOCK:
        _CACHE[key] = (ctx.spec, spec, kernels)
    return spec, kernels


def _scatter_heads(ctx: RingContext, x: Tensor, what: str):
    """Start sending head group j of the local shard to rank j; result: full sequence, my heads."""
    n = ctx.world_size
    h = x.shape[1] // n
    pending = ctx.comm.all_to_all([x[:, j * h:(j + 1) * h] for j in range(n)], 0, what)
    return lambda: torch.cat(pending.wait(), dim=2)


def _gather_heads(ctx: RingContext, x: Tensor, local: int, what: str) -> Tensor:
    """Inverse: sequence part i of my head group goes to rank i; result: my shard, all heads."""
    n = ctx.world_size
    pending = ctx.comm.all_to_all([x[:, :, i * local:(i + 1) * local] for i in range(n)], 2, what)
    return torch.cat(pending.wait(), dim=1)


def _head_group(ctx: RingContext, hq: int, device: torch.device
                ) -> tuple[RingContext, AttentionSpec, BlockKernels]:
    """This rank's view of its head group [h0, h0 + hq/N) of global heads: mods shifted by h0 and,
    under dropout, the seed shifted too (every kernel set hashes the shifted head)."""
    h0 = ctx.rank * (hq // ctx.world_size)
    spec, kernels = _group_spec(ctx, h0, device)
    if spec.dropout_p > 0 and ctx.dropout_seed is not None:  # None: the kernels raise their clear error
        # the seed as given (a device tensor is not read here) with the group's offset beside it
        ctx = dataclasses.replace(ctx, dropout_seed=with_head_offset(ctx.dropout_seed, h0))
    return ctx, spec, kernels


def _pieces(ctx: RingContext, local: int):
    n = ctx.world_size
    return chunk_pieces(global_order(local * n, n, ctx.layout), ctx.seq_len)


def forward(ctx: RingContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    n, local = ctx.world_size, q.shape[2]
    check_heads(q.shape[1], k.shape[1], n)
    timer = ctx.timer("forward", q, k)
    group, spec, kernels = _head_group(ctx, q.shape[1], q.device)
    fq, fk, fv = (_scatter_heads(ctx, t, f"{name} all-to-all") for t, name in ((q, "Q"), (k, "K"), (v, "V")))
    with timer.wait(0, "Q/K/V all-to-all"):
        qf, kf, vf = fq(), fk(), fv()
    pieces = _pieces(ctx, local)
    out, lse = empty_outputs(qf, vf)
    with timer.compute(0):
        forward_pairs(group, qf, pieces, kf, vf, pieces, out, lse, spec=spec, kernels=kernels)
    with timer.wait(1, "output all-to-all"):
        packed = _gather_heads(ctx, torch.cat([out, lse.unsqueeze(-1)], dim=-1), local, "output all-to-all")
    timer.finish(ctx.spec.record_timing)
    return packed[..., :-1], packed[..., -1]


def backward(ctx: RingContext, dout, q, k, v, out, lse):
    n, local = ctx.world_size, q.shape[2]
    check_heads(q.shape[1], k.shape[1], n)
    timer = ctx.timer("backward", q, k)
    group, spec, kernels = _head_group(ctx, q.shape[1], q.device)
    inputs = ((q, "Q"), (k, "K"), (v, "V"), (dout, "dO"), (out, "O"), (lse.unsqueeze(-1), "lse"))
    starts = [_scatter_heads(ctx, t, f"{name} all-to-all") for t, name in inputs]
    with timer.wait(0, "Q/K/V/dO all-to-all"):
        qf, kf, vf, df, of, lf = (f() for f in starts)
    lf = lf.squeeze(-1)
    pieces = _pieces(ctx, local)
    dq, dk, dv = grad_buffers(qf, kf, vf)
    d_extras: list[Tensor | None] = [None] * len(ctx.score_extras)
    with timer.compute(0):
        backward_pairs(group, df, qf, of, lf, delta_of(df, of), pieces, kf, vf, pieces, dq, dk, dv, d_extras,
                       spec=spec, kernels=kernels)
    with timer.wait(1, "dQ/dK/dV all-to-all"):
        dq = _gather_heads(ctx, dq, local, "dQ all-to-all")
        dk = _gather_heads(ctx, dk, local, "dK all-to-all")
        dv = _gather_heads(ctx, dv, local, "dV all-to-all")
    d_extras = reduce_extras(ctx, d_extras, 2)
    timer.finish(ctx.spec.record_timing)
    return dq, dk, dv, d_extras
