"""Ring attention: K/V shards travel rank -> rank+1 while the current shard is computed.

Forward: N steps; at step s rank r holds the K/V of rank r-s. A shard travels as
``ceil(local / spec.block_size)`` chunks (the last one shorter; one chunk, the whole shard,
when ``block_size`` is None or >= the local length), each its own message on its own
channel. For chunk j of step s a rank waits for that chunk (received during step s-1),
immediately forwards it to rank+1 and posts the receive of chunk j of the next shard, then
computes its queries against it: compute starts as soon as the first chunk has arrived while
the later chunks, and the next shard's, are in flight. Pairs the mask removes entirely (e.g.
causal steps from later ranks) are skipped, not computed; the chunks still travel.

Backward: K/V chunks travel the same way; the fp32 dK/dV accumulators of each chunk travel
with it, one hop behind: chunk j's accumulator moves on as soon as this rank has added its
chunk-j contribution, and one final hop returns every accumulator to its owner.

Deadlock freedom: every transfer is asynchronous and each rank posts and waits them in the
same (step, chunk) order, so every wait depends only on transfers posted earlier in that
order; the communicator's rank-parity ordering makes each exchange safe even for N = 2.
Works on any layout: ``pieces_in`` gives each chunk's pieces with their global offsets.
"""

from __future__ import annotations

import torch

from ringcompile.errors import OptionError

from ..communicator import Pending
from .common import (
    RingContext,
    backward_pairs,
    delta_of,
    empty_outputs,
    forward_pairs,
    pieces_in,
    reduce_extras,
)

Tensor = torch.Tensor
KV_STREAM, GRAD_STREAM = 0, 1


def chunk_spans(local: int, chunk: int | None) -> list[tuple[int, int]]:
    """Local token ranges [lo, hi) of the transfer chunks of a shard of ``local`` tokens."""
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise OptionError(f"block_size (K/V tokens per ring transfer) must be a positive int, got {chunk!r}")
    if chunk is None or chunk >= local or local == 0:
        return [(0, local)]
    return [(lo, min(lo + chunk, local)) for lo in range(0, local, chunk)]


def _channel(stream: int, j: int) -> int:
    """One message channel (gloo tag) per chunk and stream; chunk 0 keeps channels 0 and 1."""
    return 2 * j + stream


def _label(what: str, j: int, n_chunks: int) -> str:
    return what if n_chunks == 1 else f"{what} chunk {j}/{n_chunks}"


def _own_chunks(k: Tensor, v: Tensor, spans: list[tuple[int, int]]) -> list[list[Tensor] | Pending]:
    return [[k[:, :, lo:hi], v[:, :, lo:hi]] for lo, hi in spans]


def _take_chunk(ctx: RingContext, timer, current: list, arriving: list, j: int, step: int) -> list[Tensor]:
    """Chunk j of the shard held at ``step``: waited for if still arriving, then (before the last
    step) forwarded at once to rank+1 while chunk j of the next shard is received into ``arriving``."""
    kv = current[j]
    current[j] = None  # let the buffer go once computed
    if isinstance(kv, Pending):
        with timer.wait(step, "K/V", j):
            kv = kv.wait()
    if step < ctx.world_size - 1:
        arriving.append(ctx.comm.ring_shift(kv, step, channel=_channel(KV_STREAM, j),
                                            what=_label("K/V", j, len(current))))
    return kv


def forward(ctx: RingContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    n, rank, local = ctx.world_size, ctx.rank, q.shape[2]
    timer = ctx.timer("forward", q, k)
    out, lse = empty_outputs(q, v)
    q_pieces = ctx.pieces(rank, local)
    spans = chunk_spans(local, ctx.spec.block_size)
    current = _own_chunks(k, v, spans)  # chunks of the shard held at this step (Pending: still arriving)
    for step in range(n):
        pieces = ctx.pieces((rank - step) % n, local)
        arriving: list[list[Tensor] | Pending] = []
        for j, (lo, hi) in enumerate(spans):
            kv = _take_chunk(ctx, timer, current, arriving, j, step)
            with timer.compute(step, j):
                forward_pairs(ctx, q, q_pieces, kv[0], kv[1], pieces_in(pieces, lo, hi), out, lse)
        current = arriving
    timer.finish(ctx.spec.record_timing)
    return out, lse


def backward(
    ctx: RingContext, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
    n, rank, local = ctx.world_size, ctx.rank, q.shape[2]
    timer = ctx.timer("backward", q, k)
    q_pieces = ctx.pieces(rank, local)
    delta = delta_of(dout, out)
    acc = delta.dtype
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    d_extras: list[Tensor | None] = [None] * len(ctx.score_extras)
    spans = chunk_spans(local, ctx.spec.block_size)
    current = _own_chunks(k, v, spans)
    # per chunk: the dK/dV accumulator arriving from rank-1 (Pending); with n == 1, the result itself
    travelling: list[Pending | list[Tensor] | None] = [None] * len(spans)
    for step in range(n):
        pieces = ctx.pieces((rank - step) % n, local)
        arriving: list[list[Tensor] | Pending] = []
        for j, (lo, hi) in enumerate(spans):
            kv = _take_chunk(ctx, timer, current, arriving, j, step)
            with timer.compute(step, j):
                dk = torch.zeros(kv[0].shape, dtype=acc, device=kv[0].device)
                dv = torch.zeros(kv[1].shape, dtype=acc, device=kv[1].device)
                backward_pairs(ctx, dout, q, out, lse, delta, q_pieces, kv[0], kv[1],
                               pieces_in(pieces, lo, hi), dq, dk, dv, d_extras)
            prior = travelling[j]
            if isinstance(prior, Pending):
                with timer.wait(step, "dK/dV", j):
                    got = prior.wait()
                dk += got[0]
                dv += got[1]
            travelling[j] = (ctx.comm.ring_shift([dk, dv], step, channel=_channel(GRAD_STREAM, j),
                                                 what=_label("dK/dV", j, len(spans)))
                             if n > 1 else [dk, dv])
        current = arriving
    owned = []
    for item in travelling:  # the last hop brought each chunk's accumulator home
        if isinstance(item, Pending):
            with timer.wait(n - 1, "dK/dV"):
                item = item.wait()
        owned.append(item)
    if len(owned) == 1:
        dk, dv = owned[0]
    else:
        dk = torch.cat([g[0] for g in owned], dim=2)
        dv = torch.cat([g[1] for g in owned], dim=2)
    d_extras = reduce_extras(ctx, d_extras, n)
    timer.finish(ctx.spec.record_timing)
    return dq, dk, dv, d_extras
