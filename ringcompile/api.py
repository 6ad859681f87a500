"""Public functions for users who shard by hand: ``ring_attention``, ``shard``, ``gather``.

``ring_attention`` takes LOCAL shards (B, H, S_local, D) and FlexAttention-style mods over
GLOBAL indices, builds an AttentionSpec (cached, so repeated calls reuse one registry entry)
and calls ``torch.ops.ringcompile.ring_attention``: the same op the compiler emits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .errors import CommunicationError
from .runtime.group import TWO_LEVEL_DIMS, factored_mesh, resolve_group, wait_work
from .runtime.layouts import check_layout, shard_tensor, unshard_tensor
from .runtime.user_spec import build_spec, cached_spec, check_gqa

Tensor = torch.Tensor
__all__ = ["build_spec", "check_gqa", "gather", "ring_attention", "shard"]
def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False, mask_mod: Callable | None = None,
    score_mod: Callable | None = None, scale: float | None = None, enable_gqa: bool = False,
    strategy: str = "auto", group: Any = None, layout: str | None = None, kernel: str = "auto",
    timeout: float = 300.0, seq_len: int | None = None, mesh_dim: int | str | tuple | None = None,
    block_size: int | None = None, record_timing: bool = False, node_size: int | None = None,
) -> Tensor:
    """Attention of this rank's query shard against the whole (sharded) sequence; differentiable.

    q (B, Hq, S_local, D), k/v (B, Hkv, S_local, D) are this rank's shards in ``layout``
    (default: "zigzag" for strategy "zigzag", else "contiguous"; make them with ``shard``).
    ``seq_len`` is the true global length when the shards were padded (default S_local x N).
    Mods take global indices. Returns the local output shard (B, Hq, S_local, D).
    ``strategy="hybrid"`` with ``group=<2-D DeviceMesh>, mesh_dim=(outer_dim, inner_dim)``: an
    all-to-all over heads inside the inner dimension (a node), the ring across the outer one; shards
    are cut in the flattened order (rank = outer_rank * inner + inner_rank), as ``shard`` does with
    the same ``group`` / ``mesh_dim``. Or a 1-D group (None: the default) with ``node_size=``: the
    world factored as world / node_size nodes x node_size ranks, in rank order (built once).
    """
    check_gqa(q, k, enable_gqa)
    if node_size is not None:
        group = factored_mesh(group, node_size, timeout)
        mesh_dim = TWO_LEVEL_DIMS if group is not None else None
    spec, key = cached_spec(is_causal, mask_mod, score_mod, scale, strategy, group, mesh_dim, layout,
                            kernel, timeout, block_size, record_timing)
    if seq_len is None:
        world = 1 if strategy == "local" else resolve_group(group, mesh_dim).world_size
        seq_len = q.shape[2] * world
    out, _ = torch.ops.ringcompile.ring_attention(q, k, v, [], [], int(seq_len), key)
    return out


def shard(x: Tensor, dim: int, layout: str = "contiguous", group: Any = None, *,
          mesh_dim: int | str | tuple | None = None, seq_len: int | None = None) -> Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (zero-padded when it does not divide)."""
    g = resolve_group(group, mesh_dim)
    layout = check_layout(layout)
    return shard_tensor(x, dim, g.world_size, g.rank, layout, seq_len)


class _Gather(torch.autograd.Function):
    """Forward: all-gather and reassemble. Backward: the gradient of the (replicated) full tensor is
    the same on every rank, so each rank keeps its own slice (no reduction)."""

    @staticmethod
    def forward(ctx, x, dim, layout, seq_len, group, timeout):
        parts = [torch.empty_like(x) for _ in range(group.world_size)]
        work = dist.all_gather(parts, x.contiguous(), group=group.group, async_op=True)
        try:
            wait_work(work, group.group, timeout)
        except Exception as e:
            raise CommunicationError(f"rank {group.rank}: gather all_gather failed or timed out after "
                                     f"{timeout:g} s ({e})") from e
        ctx.setup = (dim, layout, seq_len, group)
        return unshard_tensor(parts, dim, layout, seq_len)

    @staticmethod
    def backward(ctx, grad):
        dim, layout, seq_len, group = ctx.setup
        local = shard_tensor(grad, dim, group.world_size, group.rank, layout, seq_len)
        return local, None, None, None, None, None


def gather(x: Tensor, dim: int, layout: str = "contiguous", group: Any = None, seq_len: int | None = None, *,
           mesh_dim: int | str | tuple | None = None, timeout: float = 300.0) -> Tensor:
    """The full tensor from every rank's shard ``x`` (first ``seq_len`` positions); differentiable."""
    g = resolve_group(group, mesh_dim)
    layout = check_layout(layout)
    dim = dim % x.dim()
    seq_len = x.shape[dim] * g.world_size if seq_len is None else seq_len
    if g.is_single:
        return x.narrow(dim, 0, seq_len)
    return _Gather.apply(x, dim, layout, seq_len, g, timeout)
