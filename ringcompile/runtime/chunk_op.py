"""``torch.ops.ringcompile.chunk_cache_attention``: a later prompt chunk against the sharded cache.

What the decode rule (``passes/rules/decode.py``) emits for an SDPA over a gathered sharded cache
whose query length is not statically 1 (multi-turn / chunked prefill: the chunk's K/V were appended
by ``cache_append`` before the read). The compiled graph around it runs replicated, so the op gets
every query: rank r takes its contiguous ceil(C/N) of them (padded with slot -1, which see nothing),
runs ``chunk_prefill.chunk_attention`` (pass-KV or pass-Q, ``method="auto"``: the cost model's
``choose_chunk_method``), and all-gathers the outputs back to a replicated (B, Hq, C, Dv). The causal
offset of the chunk comes from its query slots (``positions``: the cache's length before the chunk
plus 0..C-1); the model's own boolean mask (HF's, sized ``max_cache_len``) is passed whole and
sliced to each rank's rows, and is the whole rule, as in one process (``whole_mask``: no causal rule of
ours, unwritten slots are zero keys; see ``decode``). A query length of 1 at run time (a dynamic graph
serving decode too) takes ``decode_attention``'s path.
"""

from __future__ import annotations

import torch

from ringcompile import op_support
from ringcompile.cache_codes import layout_from_code

from .cache_layout import CacheLayout

Tensor = torch.Tensor


def _rows(x: Tensor, start: int, stop: int, rows: int, fill: float | int | bool) -> Tensor:
    """x[..., start:stop, :] along dim -2 (q, mask) padded with ``fill`` to ``rows`` rows."""
    part = x[..., start:stop, :]
    if part.shape[-2] == rows:
        return part
    shape = list(part.shape)
    shape[-2] = rows - part.shape[-2]
    return torch.cat([part, part.new_full(shape, fill)], -2)


@torch.library.custom_op("ringcompile::chunk_cache_attention", mutates_args=(), **op_support.SYNCING)
def chunk_cache_attention(q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor,
                          slot_mask: Tensor | None, scale: float, group_name: str, timeout: float,
                          layout: list[int], method: str, window: int = -1) -> Tensor:
    """Replicated chunk queries q (B, Hq, C, D) at ``q_slots`` (C,) against this rank's shard; every
    rank returns the full output (B, Hq, C, Dv). ``window`` (-1: none) is a sliding window the mask
    also applies (``passes/rules/window.py``): shards outside it are skipped before any work."""
    from .chunk_prefill import chunk_attention
    from .communicator import RingCommunicator
    from .decode import decode_attention, filled_prefix
    from .group import SINGLE, resolve_group

    if group_name == "single":
        resolved = SINGLE
    else:
        from .collectives import group_by_name

        resolved = resolve_group(group_by_name(group_name))
    world, rank = resolved.world_size, resolved.rank
    cl = CacheLayout(world, *layout_from_code(layout)) if layout else None
    comm = RingCommunicator(resolved, timeout, device=q.device)
    C = q.shape[2]
    with op_support.device_guard(q.device), torch.no_grad():
        if C == 1 or world == 1:
            return decode_attention(q, k, v, kv_slots=kv_slots, q_slots=q_slots, slot_mask=slot_mask,
                                    window=None if window < 0 else window, scale=scale, layout=cl, comm=comm,
                                    whole_mask=True)
        q_slots = q_slots.reshape(-1).to(device=q.device, dtype=torch.long)
        c = -(-C // world)
        start, stop = min(C, rank * c), min(C, (rank + 1) * c)
        mine_q = _rows(q, start, stop, c, 0.0)
        mine_slots = torch.cat([q_slots[start:stop], q_slots.new_full((c - (stop - start),), -1)])
        mine_mask = None
        if slot_mask is not None:
            full = slot_mask.expand(*slot_mask.shape[:-2], C, slot_mask.shape[-1])
            mine_mask = _rows(full, start, stop, c, False)
        k, v, kv_slots = filled_prefix(k, v, kv_slots)
        out = chunk_attention(mine_q, k, v, q_slots=mine_slots, kv_slots=kv_slots,
                              cache_len=int(q_slots.max()) + 1, method=method, scale=scale, layout=cl,
                              comm=comm, slot_mask=mine_mask, window=None if window < 0 else window,
                              whole_mask=True)
        parts = comm.all_gather(out.contiguous(), 0, "chunk attention output all_gather").wait()
        return torch.cat(parts, 2)[:, :, :C]


@chunk_cache_attention.register_fake
def _(q, k, v, kv_slots, q_slots, slot_mask, scale, group_name, timeout, layout, method, window=-1):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
