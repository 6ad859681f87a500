"""Ring attention: K/V shards travel rank -> rank+1 while the current shard is computed.

Forward: N steps; at step i rank r holds the K/V of rank r-i. The transfer for step i+1 is
started before step i computes and waited on only after it (double buffering). Pairs the
mask removes entirely (e.g. causal steps from later ranks) are skipped, not computed.

Backward: K/V travel the same way; the fp32 dK/dV accumulators of each K/V shard travel
with it, gaining every rank's contribution, and one final hop returns them to their owner.
The accumulator received at step i is waited on only after step i's compute.
Works on any layout: the pieces of each shard carry their global offsets.
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


def forward(ctx: RingContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    n, rank, local = ctx.world_size, ctx.rank, q.shape[2]
    timer = ctx.timer("forward")
    out, lse = empty_outputs(q, v)
    q_pieces = ctx.pieces(rank, local)
    kv = [k, v]
    for step in range(n):
        src = (rank - step) % n
        pending = ctx.comm.ring_shift(kv, step) if step < n - 1 else None
        with timer.compute(step):
            forward_pairs(ctx, q, q_pieces, kv[0], kv[1], ctx.pieces(src, local), out, lse)
        if pending is not None:
            with timer.wait(step):
                kv = pending.wait()
    timer.finish(ctx.spec.record_timing)
    return out, lse


def backward(
    ctx: RingContext, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
    n, rank, local = ctx.world_size, ctx.rank, q.shape[2]
    timer = ctx.timer("backward")
    q_pieces = ctx.pieces(rank, local)
    delta = delta_of(dout, out)
    dq = torch.zeros(q.shape, dtype=delta.dtype, device=q.device)
    d_extras: list[Tensor | None] = [None] * len(ctx.score_extras)
    kv = [k, v]
    travelling = None  # Pending for the dK/dV accumulators arriving from rank-1
    dkv: list[Tensor] = []
    for step in range(n):
        src = (rank - step) % n
        kv_pending = ctx.comm.ring_shift(kv, step) if step < n - 1 else None
        with timer.compute(step):
            _, dk, dv = grad_buffers(q, kv[0], kv[1])
            backward_pairs(ctx, dout, q, out, lse, delta, q_pieces, kv[0], kv[1], ctx.pieces(src, local),
                           dq, dk, dv, d_extras)
        if travelling is not None:
            with timer.wait(step):
                got = travelling.wait()
            dk += got[0]
            dv += got[1]
        dkv = [dk, dv]
        if n > 1:
            travelling = ctx.comm.ring_shift(dkv, step, channel=1, what="dK/dV")
        if kv_pending is not None:
            with timer.wait(step):
                kv = kv_pending.wait()
    if travelling is not None:
        with timer.wait(n - 1):
            dkv = travelling.wait()
    d_extras = reduce_extras(ctx, d_extras, n)
    timer.finish(ctx.spec.record_timing)
    return dq, dkv[0], dkv[1], d_extras
