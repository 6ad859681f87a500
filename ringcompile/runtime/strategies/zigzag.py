"""Zigzag ring: the ring schedule over the zigzag layout (rank r holds chunks r and 2N-1-r).

Under a causal mask every rank then does the same work per step: each piece pair is
either fully kept, diagonal, or skipped, and the skipped ones balance across ranks.
The schedule itself is the ring's; only the layout (and so the pieces) differ.
"""

from __future__ import annotations

from ringcompile.errors import OptionError

from . import ring
from .common import RingContext


def _check(ctx: RingContext) -> None:
    if ctx.layout != "zigzag":
        raise OptionError(f"strategy 'zigzag' needs shards in the zigzag layout, got layout {ctx.layout!r}: "
                          "shard with layout='zigzag' or use strategy 'ring'")


def forward(ctx: RingContext, q, k, v):
    _check(ctx)
    return ring.forward(ctx, q, k, v)


def backward(ctx: RingContext, dout, q, k, v, out, lse):
    _check(ctx)
    return ring.backward(ctx, dout, q, k, v, out, lse)
