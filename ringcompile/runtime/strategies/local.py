"""No communication: the tensors given are the whole sequence (world size 1, or a caller
that asked for ``local`` and passes full tensors on every rank)."""

from __future__ import annotations

import torch

from .common import (
    RingContext,
    backward_pairs,
    chunk_pieces,
    delta_of,
    empty_outputs,
    forward_pairs,
    grad_buffers,
)

Tensor = torch.Tensor


def _pieces(ctx: RingContext, q: Tensor):
    return chunk_pieces([(0, q.shape[2])], ctx.seq_len)


def forward(ctx: RingContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    timer = ctx.timer("forward", q, k)
    out, lse = empty_outputs(q, v)
    with timer.compute(0):
        forward_pairs(ctx, q, _pieces(ctx, q), k, v, _pieces(ctx, k), out, lse)
    timer.finish(ctx.spec.record_timing)
    return out, lse


def backward(ctx: RingContext, dout, q, k, v, out, lse):
    timer = ctx.timer("backward", q, k)
    dq, dk, dv = grad_buffers(q, k, v)
    d_extras: list[Tensor | None] = [None] * len(ctx.score_extras)
    with timer.compute(0):
        backward_pairs(ctx, dout, q, out, lse, delta_of(dout, out), _pieces(ctx, q), k, v, _pieces(ctx, k),
                       dq, dk, dv, d_extras)
    timer.finish(ctx.spec.record_timing)
    return dq, dk, dv, d_extras
