"""A sequence-sharded prompt chunk against a sharded KV cache: pass-Q or pass-KV.

Chunked / multi-turn prefill: the new chunk's queries are sharded over the ranks (rank r holds
``q`` at global slots ``q_slots``), and the cache (the earlier turns plus this chunk's own K/V,
appended by each rank to its shard before the call) is sharded too. Two ways to bring them
together (arXiv 2411.01783, section 3):

* ``pass_kv``: the cache shards travel around the ring as the training ring's K/V do: at step s
  rank r attends its own queries against the shard of rank r - s while that shard (K, V and their
  slots packed in one message, padded to the longest shard with slots in every query's future)
  moves on to rank r + 1, so the transfer hides under the compute when the chunk is long enough;
  partials are merged by log-sum-exp in fp32 as they arrive. Moves 2 * Hkv * T * D elements per
  rank in N - 1 steps.
* ``pass_q``: the queries travel (an all_gather of q and their slots), each rank attends every
  query against its own shard, and the partial (out, lse) go back to the queries' owners (one
  all_to_all) to be merged by log-sum-exp in fp32. Moves Hq * C * (D + Dv + 1) elements per
  rank, independent of the cache length: the larger cache stays put.

``cost_model.decode.choose_chunk_method`` picks the one predicted faster (pass-KV's transfers
overlap its compute; pass-Q's do not but move fewer bytes for a short chunk on a long cache).
Both are preceded by the same metadata check as decode (``decode.check_cache_agrees``).
"""

from __future__ import annotations

from typing import Any

import torch

from ringcompile.errors import OptionError, ShapeMismatchError
from ringcompile.kernels.reference import merge_partials

from .cache_layout import CacheLayout
from .communicator import Communicator, RingCommunicator
from .decode import _problems, check_cache_agrees, local_partial, merge_across, metadata, with_unwritten
from .group import resolve_group

Tensor = torch.Tensor
METHODS = ("pass_q", "pass_kv", "auto")
NEVER = 1 << 62  # slot given to padding entries of a gathered cache: in every query's future


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, *, q_slots: Tensor, kv_slots: Tensor, cache_len: int,
                    method: str = "auto", key_padding: Tensor | None = None, window: int | None = None,
                    scale: float | None = None, layout: CacheLayout | None = None, group: Any = None,
                    mesh_dim: int | str | None = None, comm: Communicator | None = None,
                    timeout: float = 60.0, profile: Any = None, slot_mask: Tensor | None = None,
                    whole_mask: bool = False) -> Tensor:
    """This rank's output (B, Hq, c, Dv) for its chunk queries q (B, Hq, c, D) at ``q_slots`` (c,)
    against the sharded cache (this rank's k/v at ``kv_slots``; ``cache_len`` global slots).
    Every rank must pass the same c (pad with slot -1: such rows see nothing and return 0).
    ``method="auto"`` asks the cost model with ``profile`` (default: the device's default profile).
    ``slot_mask`` (bool, True = keep; (B or 1, 1 or Hq, c, >= cache_len) over global slots) is this
    rank's rows of a model's own mask (see ``decode.local_partial``); ``whole_mask``: that mask is the
    whole rule, as one process applies it to the gathered cache (``decode``'s module docstring)."""
    if method not in METHODS:
        raise OptionError(f"chunk method must be one of {list(METHODS)}, got {method!r}")
    if comm is None:
        comm = RingCommunicator(resolve_group(group, mesh_dim), timeout, device=q.device)
    kv_slots = kv_slots.to(device=q.device, dtype=torch.long).reshape(-1)
    q_slots = q_slots.to(device=q.device, dtype=torch.long).reshape(-1)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    problem = _problems(q, k, v, kv_slots, q_slots.clamp_min(0), key_padding, cache_len)
    if comm.world_size == 1:
        if problem is not None:
            raise ShapeMismatchError(f"rank 0: {problem}")
        part = local_partial(q, k, v, kv_slots, q_slots, scale=scale, key_padding=key_padding, window=window,
                             slot_mask=slot_mask, whole_mask=whole_mask)
        return with_unwritten(part.out, part.lse, slot_mask, cache_len, whole_mask)[0].to(q.dtype)
    meta = metadata(q, k, v, kv_slots, q_slots[:0], cache_len, window, key_padding, problem is None)
    lengths = check_cache_agrees(comm, meta, layout)      # q slots differ per rank: not compared
    if problem is not None:
        raise ShapeMismatchError(f"rank {comm.rank}: {problem}")
    if method == "auto":
        from ringcompile.cost_model.decode import choose_chunk_method
        from ringcompile.cost_model.profiles import default_profile_name

        prof = default_profile_name(str(q.device)) if profile is None else profile
        method = choose_chunk_method(q_len=q.shape[2] * comm.world_size, cache_len=cache_len,
                                     heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[-1],
                                     elem_bytes=q.element_size(), world_size=comm.world_size,
                                     batch=q.shape[0], dtype=q.dtype,
                                     profile=prof)
    with torch.no_grad():
        if method == "pass_kv":
            out, lse = _pass_kv(comm, q, k, v, kv_slots, q_slots, lengths, scale, key_padding, window,
                                slot_mask, whole_mask)
        else:
            out, lse = _pass_q(comm, q, k, v, kv_slots, q_slots, scale, key_padding, window, slot_mask,
                               whole_mask)
        out, _ = with_unwritten(out, lse, slot_mask, cache_len, whole_mask)
    return out.to(q.dtype)


def _pad_len(x: Tensor, dim: int, length: int, value: float | int = 0) -> Tensor:
    if x.shape[dim] == length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_full(shape, value)], dim)


def _pass_kv(comm: Communicator, q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor,
             lengths: list[int], scale: float, key_padding: Tensor | None, window: int | None,
             slot_mask: Tensor | None = None, whole_mask: bool = False) -> tuple[Tensor, Tensor]:
    """Rotate the cache shards around the ring (each padded to the longest, padding in every query's
    future), attending the one in hand while the next arrives; merge the partials as they come."""
    longest, n, d = max(lengths), comm.world_size, k.shape[-1]
    held_kv = torch.cat([_pad_len(k, 2, longest), _pad_len(v, 2, longest)], -1)   # one message: K | V
    held_slots = _pad_len(kv_slots, 0, longest, NEVER)
    out = lse = None
    for step in range(n):
        pending = None
        if step < n - 1:                              # the next shard travels while this one is attended
            pending = comm.ring_shift([held_kv, held_slots], step, what="pass-KV cache shard")
        size = lengths[(comm.rank - step) % n]        # the shard in hand is rank r - step's
        part = local_partial(q, held_kv[:, :, :size, :d], held_kv[:, :, :size, d:], held_slots[:size],
                             q_slots, scale=scale, key_padding=key_padding, window=window,
                             slot_mask=slot_mask, whole_mask=whole_mask)
        out, lse = merge_partials(out, lse, part.out, part.lse)
        if pending is not None:
            held_kv, held_slots = pending.wait()
    return out, lse


def _pass_q(comm: Communicator, q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor,
            scale: float, key_padding: Tensor | None, window: int | None,
            slot_mask: Tensor | None = None, whole_mask: bool = False) -> tuple[Tensor, Tensor]:
    """Gather the queries, attend them against the local shard, send each owner its partials, merge."""
    c, n = q.shape[2], comm.world_size
    all_q = torch.cat(comm.all_gather(q, 0, "pass-Q query all_gather").wait(), 2)
    all_slots = torch.cat(comm.all_gather(q_slots, 0, "pass-Q slot all_gather").wait())
    all_mask = None
    if slot_mask is not None:      # the queries' mask rows travel with them (as uint8: gloo has no bool)
        rows = comm.all_gather(slot_mask.to(torch.uint8), 0, "pass-Q mask all_gather").wait()
        all_mask = torch.cat(rows, -2).to(torch.bool)
    part = local_partial(all_q, k, v, kv_slots, all_slots, scale=scale, key_padding=key_padding,
                         window=window, slot_mask=all_mask, whole_mask=whole_mask)
    packed = torch.cat([part.out, part.lse.unsqueeze(-1)], -1)
    back = comm.all_to_all([packed[:, :, r * c:(r + 1) * c] for r in range(n)], 0,
                           "pass-Q partial (out, lse) all_to_all").wait()
    stacked = torch.stack(back)
    return merge_across(stacked[..., :-1], stacked[..., -1])
