"""All-gather K/V: every rank gathers all K/V shards once (O(S) K/V memory, one collective).

The own shard is computed while the gather is in flight. In the backward each rank
computes dK/dV contributions for every shard and an all-to-all returns them to owners.
"""

from __future__ import annotations

import torch

from .common import (
    RingContext,
    backward_pairs,
    delta_of,
    empty_outputs,
    forward_pairs,
    grad_buffers,
    reduce_extras,
)

Tensor = torch.Tensor


def _gather(ctx: RingContext, k: Tensor, v: Tensor):
    pk = ctx.comm.all_gather(k, 0, "K all-gather")
    pv = ctx.comm.all_gather(v, 0, "V all-gather")
    return pk, pv


def forward(ctx: RingContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    n, rank, local = ctx.world_size, ctx.rank, q.shape[2]
    timer = ctx.timer("forward", q, k)
    out, lse = empty_outputs(q, v)
    q_pieces = ctx.pieces(rank, local)
    pk, pv = _gather(ctx, k, v)
    with timer.compute(0):
        forward_pairs(ctx, q, q_pieces, k, v, ctx.pieces(rank, local), out, lse)
    with timer.wait(1, "K/V all-gather"):
        ks, vs = pk.wait(), pv.wait()
    with timer.compute(1):
        for src in range(n):
            if src != rank:
                forward_pairs(ctx, q, q_pieces, ks[src], vs[src], ctx.pieces(src, local), out, lse)
    timer.finish(ctx.spec.record_timing)
    return out, lse


def backward(ctx: RingContext, dout, q, k, v, out, lse):
    n, rank, local = ctx.world_size, ctx.rank, q.shape[2]
    timer = ctx.timer("backward", q, k)
    q_pieces = ctx.pieces(rank, local)
    delta = delta_of(dout, out)
    pk, pv = _gather(ctx, k, v)
    dq, _, _ = grad_buffers(q, k, v)
    d_extras: list[Tensor | None] = [None] * len(ctx.score_extras)
    dk_parts: list[Tensor] = [None] * n  # type: ignore[list-item]
    dv_parts: list[Tensor] = [None] * n  # type: ignore[list-item]
    with timer.compute(0):
        _, dk_parts[rank], dv_parts[rank] = grad_buffers(q, k, v)
        backward_pairs(ctx, dout, q, out, lse, delta, q_pieces, k, v, ctx.pieces(rank, local), dq,
                       dk_parts[rank], dv_parts[rank], d_extras)
    with timer.wait(1, "K/V all-gather"):
        ks, vs = pk.wait(), pv.wait()
    with timer.compute(1):
        for src in range(n):
            if src != rank:
                _, dk_parts[src], dv_parts[src] = grad_buffers(q, ks[src], vs[src])
                backward_pairs(ctx, dout, q, out, lse, delta, q_pieces, ks[src], vs[src],
                               ctx.pieces(src, local), dq, dk_parts[src], dv_parts[src], d_extras)
    if n > 1:
        rk = ctx.comm.all_to_all(dk_parts, 2, "dK all-to-all")
        rv = ctx.comm.all_to_all(dv_parts, 2, "dV all-to-all")
        with timer.wait(2, "dK/dV all-to-all"):
            dk = torch.stack(rk.wait()).sum(0)
            dv = torch.stack(rv.wait()).sum(0)
    else:
        dk, dv = dk_parts[0], dv_parts[0]
    d_extras = reduce_extras(ctx, d_extras, 2)
    timer.finish(ctx.spec.record_timing)
    return dq, dk, dv, d_extras
