"""The two opaque ops a compiled graph sees around a sharded, preallocated KV cache layer.

``ringcompile::cache_append`` writes a step's new K/V into this rank's preallocated shard at the
slots the ``CacheLayout`` gives it (contiguous prefill, then ``round_robin`` appends). It decides
ownership from the ``positions`` tensor inside the op, so Dynamo never sees (or guards on) a Python
int that changes per token: one decode graph serves every step.

``ringcompile::cache_gather`` is what the model's attention reads: the whole cache (B, H, max_len, D)
at global slots, zeros where nothing is stored yet (HF's StaticCache has zeros there too). Its own
implementation all-gathers the shards, so an attention the backend does not rewrite still computes
the right answer (the gathered fallback). ``passes/rules/decode.py`` replaces an SDPA reading it by
``torch.ops.ringcompile.decode_attention`` on the local shard, so nothing is gathered. Its
arguments carry everything that rewrite needs (the shard, its slots, the query positions, the
layout, the group).

A shard's ``slots`` buffer holds each entry's global slot, -1 for entries not written yet; entries
are written in increasing slot order, so the filled ones are a prefix.
"""

from __future__ import annotations

import torch

from ringcompile import op_support
from ringcompile.cache_codes import COMPILED_POLICY as POLICY
from ringcompile.cache_codes import COMPILED_PREFILL_LAYOUT as PREFILL_LAYOUT
from ringcompile.errors import ShapeMismatchError

from . import chunk_op as _chunk_op  # noqa: F401  (registers chunk_cache_attention, which the decode rule emits)
from . import decode_op as _decode_op  # noqa: F401  (registers decode_attention, which the decode rule emits)
from .cache_layout import CacheLayout

Tensor = torch.Tensor


def shard_layout(world: int, prefill_len: int) -> CacheLayout:
    """The layout a compiled sharded cache uses: the prefill's contiguous shards, round_robin after."""
    return CacheLayout(world, prefill_len, PREFILL_LAYOUT, POLICY)


def shard_capacity(world: int, prefill_len: int, max_len: int) -> list[int]:
    """Every rank's preallocated entries for ``max_len`` global slots after a ``prefill_len`` prefill."""
    return shard_layout(world, prefill_len).lengths(max_len)


@torch.library.custom_op("ringcompile::cache_append", mutates_args=("keys", "values", "slots"))
def cache_append(keys: Tensor, values: Tensor, slots: Tensor, new_k: Tensor, new_v: Tensor,
                 positions: Tensor, rank: int, world: int, prefill_len: int) -> None:
    """Store the entries of new_k / new_v (B, H, n, D) at global slots ``positions`` (n,) that this rank
    owns into its shard keys / values (B, H, capacity, D); ``slots`` (capacity,) records their slots."""
    layout = shard_layout(world, prefill_len)
    ts = [int(t) for t in positions.reshape(-1).tolist()]
    if len(ts) != new_k.shape[-2]:
        raise ShapeMismatchError(f"cache_append got {new_k.shape[-2]} new entries but {len(ts)} positions")
    mine, local = [], []
    for j, t in enumerate(ts):
        if layout.owner(t) == rank:
            mine.append(j)
            local.append(layout.lengths(t)[rank])   # this rank's entries below t = t's local index
    if not mine:
        return
    if local[-1] >= keys.shape[-2]:
        raise ShapeMismatchError(f"rank {rank}: sharded cache slot {ts[mine[-1]]} is past the shard's "
                                 f"{keys.shape[-2]} preallocated entries; build the cache with a larger "
                                 "max_cache_len")
    src = torch.tensor(mine, dtype=torch.long, device=new_k.device)
    dst = torch.tensor(local, dtype=torch.long, device=keys.device)
    keys.index_copy_(2, dst, new_k.index_select(2, src).to(keys.dtype))
    values.index_copy_(2, dst, new_v.index_select(2, src).to(values.dtype))
    slots.index_copy_(0, dst, torch.tensor([ts[j] for j in mine], dtype=slots.dtype, device=slots.device))


@cache_append.register_fake
def _(keys, values, slots, new_k, new_v, positions, rank, world, prefill_len):
    return None


def _gather_rows(t: Tensor, rows: int, group_name: str, timeout: float) -> list[Tensor]:
    """Every rank's ``t`` padded (dim -2 for 4-D, dim 0 for 1-D) to ``rows``, all-gathered."""
    from .collectives import group_by_name
    from .communicator import RingCommunicator
    from .group import resolve_group

    dim = 2 if t.dim() == 4 else 0
    pad = rows - t.shape[dim]
    if pad:
        shape = list(t.shape)
        shape[dim] = pad
        filler = t.new_full(shape, -1) if t.dim() == 1 else t.new_zeros(shape)
        t = torch.cat([t, filler], dim)
    comm = RingCommunicator(resolve_group(group_by_name(group_name)), timeout, device=t.device)
    return comm.all_gather(t.contiguous(), 0, "sharded KV cache all_gather (gathered fallback)").wait()


@torch.library.custom_op("ringcompile::cache_gather", mutates_args=(), **op_support.SYNCING)
def cache_gather(keys: Tensor, values: Tensor, slots: Tensor, positions: Tensor, max_len: int,
                 prefill_len: int, group_name: str, timeout: float) -> tuple[Tensor, Tensor]:
    """The whole cache (B, H, max_len, D) from every rank's shard (zeros at unwritten slots).

    ``positions`` (the step's query slots) is not read here: it is carried for the decode rewrite."""
    B, H, _, D = keys.shape
    full_k = keys.new_zeros(B, H, max_len, D)
    full_v = values.new_zeros(B, H, max_len, values.shape[-1])
    if group_name == "single":
        parts = [(keys, values, slots)]
    else:
        from .collectives import group_by_name

        world = torch.distributed.get_world_size(group_by_name(group_name))
        rows = max(shard_capacity(world, prefill_len, max_len))
        ks, vs, ss = (_gather_rows(t, rows, group_name, timeout) for t in (keys, values, slots))
        parts = list(zip(ks, vs, ss, strict=True))
    for k, v, s in parts:
        filled = s >= 0
        at = s[filled]
        full_k[:, :, at] = k[:, :, filled]
        full_v[:, :, at] = v[:, :, filled]
    return full_k, full_v


@cache_gather.register_fake
def _(keys, values, slots, positions, max_len, prefill_len, group_name, timeout):
    B, H, _, D = keys.shape
    return keys.new_empty(B, H, max_len, D), values.new_empty(B, H, max_len, values.shape[-1])
