"""The two opaque ops a compiled graph sees around a sharded, preallocated KV cache layer.

``ringcompile::cache_append`` writes a step's new K/V into this rank's preallocated shard at the
slots the ``CacheLayout`` gives it (the prefill in the prefill graph's sequence layout, then
``round_robin`` appends). It decides ownership from the ``positions`` tensor inside the op, so Dynamo
never sees (or guards on) a Python int that changes per token: one decode graph serves every step. At
the prefill it takes the graph's K/V shard as it is (``seq_layout``), so they are not gathered for it.

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
from .layouts import local_indices, padded_length

Tensor = torch.Tensor


def shard_layout(world: int, prefill_len: int, prefill_layout: str = PREFILL_LAYOUT) -> CacheLayout:
    """The layout a compiled sharded cache uses: the prefill's shards (in the prefill graph's sequence
    layout, ``cache_codes.causal_layout``), round_robin after."""
    return CacheLayout(world, prefill_len, prefill_layout, POLICY)


def shard_capacity(world: int, prefill_len: int, max_len: int, prefill_layout: str = PREFILL_LAYOUT
                   ) -> list[int]:
    """Every rank's preallocated entries for ``max_len`` global slots after a ``prefill_len`` prefill."""
    return shard_layout(world, prefill_len, prefill_layout).lengths(max_len)


def _local_entries(ts: list[int], n_local: int, rank: int, world: int, seq_layout: str) -> list[int]:
    """The global slot of each of this rank's ``n_local`` sequence-shard entries (``seq_layout`` over the
    ``len(ts)`` positions, padded), -1 for the padding past the true length."""
    padded = padded_length(len(ts), world, seq_layout)
    if n_local * world != padded:
        raise ShapeMismatchError(f"rank {rank}: cache_append got a {seq_layout} sequence shard of {n_local} "
                                 f"entries for {len(ts)} positions on {world} ranks (expected "
                                 f"{padded // world}); the cache's world size must be the graph's")
    at = local_indices(padded, world, rank, seq_layout).tolist()
    return [ts[i] if i < len(ts) else -1 for i in at]


@torch.library.custom_op("ringcompile::cache_append", mutates_args=("keys", "values", "slots"))
def cache_append(keys: Tensor, values: Tensor, slots: Tensor, new_k: Tensor, new_v: Tensor,
                 positions: Tensor, rank: int, world: int, prefill_len: int,
                 prefill_layout: str = PREFILL_LAYOUT, at_prefill: bool = False,
                 seq_layout: str = "") -> None:
    """Store the entries of new_k / new_v (B, H, n, D) at global slots ``positions`` (n,) that this rank
    owns into its shard keys / values (B, H, capacity, D); ``slots`` (capacity,) records their slots.

    ``at_prefill``: these are the prefill's K/V (slots 0..prefill_len-1), which the sharding pass may then
    hand over sharded. ``seq_layout`` "" : new_k / new_v hold all n entries (replicated). Else (the pass
    writes it, ``passes/placements.py`` LocalShardRule) they are this rank's shard of the padded sequence
    in that layout, which must be the cache's ``prefill_layout``: every entry is then this rank's own
    (padding past n is dropped), so nothing was gathered."""
    layout = shard_layout(world, prefill_len, prefill_layout)
    ts = [int(t) for t in positions.reshape(-1).tolist()]
    if seq_layout:
        entries = _local_entries(ts, new_k.shape[-2], rank, world, seq_layout)
    elif len(ts) != new_k.shape[-2]:
        raise ShapeMismatchError(f"cache_append got {new_k.shape[-2]} new entries but {len(ts)} positions")
    else:
        entries = ts
    mine, local = [], []
    for j, t in enumerate(entries):
        if t < 0:
            continue
        if layout.owner(t) == rank:
            mine.append(j)
            local.append(layout.lengths(t)[rank])   # this rank's entries below t = t's local index
        elif seq_layout:
            raise ShapeMismatchError(f"rank {rank}: cache_append got slot {t} in its {seq_layout} sequence "
                                     f"shard, but the cache's {prefill_layout} layout puts it on rank "
                                     f"{layout.owner(t)}: the shard must be in the cache's prefill layout")
    if not mine:
        return
    if max(local) >= keys.shape[-2]:
        raise ShapeMismatchError(f"rank {rank}: sharded cache slot {entries[mine[-1]]} is past the shard's "
                                 f"{keys.shape[-2]} preallocated entries; build the cache with a larger "
                                 "max_cache_len")
    src = torch.tensor(mine, dtype=torch.long, device=new_k.device)
    dst = torch.tensor(local, dtype=torch.long, device=keys.device)
    keys.index_copy_(2, dst, new_k.index_select(2, src).to(keys.dtype))
    values.index_copy_(2, dst, new_v.index_select(2, src).to(values.dtype))
    stored = torch.tensor([entries[j] for j in mine], dtype=slots.dtype, device=slots.device)
    slots.index_copy_(0, dst, stored)


@cache_append.register_fake
def _(keys, values, slots, new_k, new_v, positions, rank, world, prefill_len, prefill_layout=PREFILL_LAYOUT,
      at_prefill=False, seq_layout=""):
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
                 prefill_len: int, group_name: str, timeout: float, prefill_layout: str = PREFILL_LAYOUT
                 ) -> tuple[Tensor, Tensor]:
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
        rows = max(shard_capacity(world, prefill_len, max_len, prefill_layout))
        ks, vs, ss = (_gather_rows(t, rows, group_name, timeout) for t in (keys, values, slots))
        parts = list(zip(ks, vs, ss, strict=True))
    for k, v, s in parts:
        filled = s >= 0
        at = s[filled]
        full_k[:, :, at] = k[:, :, filled]
        full_v[:, :, at] = v[:, :, filled]
    return full_k, full_v


@cache_gather.register_fake
def _(keys, values, slots, positions, max_len, prefill_len, group_name, timeout,
      prefill_layout=PREFILL_LAYOUT):
    B, H, _, D = keys.shape
    return keys.new_empty(B, H, max_len, D), values.new_empty(B, H, max_len, values.shape[-1])
