"""Runs a block-kernel pair over a grid of chunk pairs, as the ring does: the kernel tests' shared harness."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ringcompile.kernels.reference import merge_partials


def blockwise_attention(
    forward: Callable, backward: Callable | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    dout: torch.Tensor | None, cuts: Sequence[tuple[int, int]], **kw,
) -> tuple[torch.Tensor, ...]:
    """(out, lse) merged over every (q chunk, kv chunk) pair, then, given ``dout``, (dq, dk, dv)
    accumulated pair by pair from the final out/lse. Chunks carry their global offsets."""
    outs, lses = [], []
    for q0, q1 in cuts:
        out = lse = None
        for k0, k1 in cuts:
            o, s = forward(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], q_offset=q0, kv_offset=k0, **kw)
            out, lse = merge_partials(out, lse, o, s)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    if dout is None or backward is None:
        return out, lse
    acc = out.dtype
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc) for t in (q, k, v))
    for q0, q1 in cuts:
        for k0, k1 in cuts:
            g = backward(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], out[:, :, q0:q1], dout[:, :, q0:q1],
                         lse[:, :, q0:q1], q_offset=q0, kv_offset=k0, **kw)
            dq[:, :, q0:q1] += g[0]
            dk[:, :, k0:k1] += g[1]
            dv[:, :, k0:k1] += g[2]
    return out, lse, dq, dk, dv
