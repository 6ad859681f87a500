"""A sharded KV cache layer a compiled forward can trace: shapes fixed, no per-token Python ints.

``ShardedCacheLayer`` (``serving/hf.py``) decides ownership with Python ints, on which Dynamo would
guard (a recompile per token), and returns the bare shard, which only the ``"ring_decode"``
attention function understands. This layer is what ``sharded_cache(..., compiled=True)`` builds for
``m.forward = torch.compile(m.forward, backend="ring")``:

* the shard is preallocated at the prefill for ``max_cache_len`` global slots (this rank's most
  entries under the layout: the prefill in the planner's causal layout, round_robin appends, about
  max_cache_len / N);
* the global length is a 0-d tensor (HF's StaticLayer does the same), so the step's positions are
  tensor arithmetic, and the write is the opaque op ``ringcompile::cache_append``;
* the prefill's ``update`` returns the prompt's own K/V (the cache was empty), so the prefill graph
  is plain causal self-attention that the backend ring-shards along the sequence as any other (TTFT
  scales with N). The cache stores its prefill in the layout the planner gives that graph
  (``cache_codes.causal_layout``: zigzag when 2N divides the prompt, else contiguous), so the sharding
  pass hands ``cache_append`` this rank's K/V shard as it is (no gather; padding is not stored);
* later ``update``s return ``ringcompile::cache_gather``: the whole cache at global slots, shaped
  like HF's StaticCache (masks are sized ``max_cache_len``). The backend's decode rewrite
  (``passes/rules/decode.py``) turns an SDPA reading it into ``decode_attention`` on the shard; any
  attention it cannot rewrite reads the gathered cache (correct, with a WARNING); a later prompt
  chunk (multi-turn) reading it becomes ``chunk_cache_attention`` (pass-KV / pass-Q);
* ``crop`` (speculative decoding's rollback) drops this rank's slots >= n in place;
* ``reserve`` (outside a graph, ``serving/growth.py``) grows the shard for a longer ``max_cache_len``:
  an entry's local index depends only on its slot, so the entries are copied where they were.
"""

from __future__ import annotations

from typing import Any

import torch

from ringcompile.cache_codes import COMPILED_PREFILL_LAYOUT, causal_layout
from ringcompile.errors import OptionError
from ringcompile.log import get_logger
from ringcompile.runtime.cache_append import cache_append, cache_gather, shard_capacity, shard_layout
from ringcompile.runtime.cache_layout import CacheLayout

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - transformers is optional
    DynamicLayer = None  # type: ignore[assignment,misc]

Tensor = torch.Tensor
log = get_logger(__name__)
_WARNED_EAGER: list[bool] = []


class CompiledShardedLayer(DynamicLayer if DynamicLayer is not None else object):  # type: ignore[misc]
    """One layer's preallocated K/V shard on this rank; the model sees the global cache shape."""

    is_compileable = False   # True would make generate compile forward itself (with Inductor)
    is_croppable = True

    def __init__(self, rank: int, world: int, max_cache_len: int, group_name: str = "default",
                 timeout: float = 60.0) -> None:
        super().__init__()
        self.rank, self.world, self.max_cache_len = rank, world, max_cache_len
        self.group_name = "single" if world == 1 else group_name
        self.timeout = timeout
        self.prefill_len: int | None = None
        self.prefill_layout = COMPILED_PREFILL_LAYOUT
        self.cumulative_length = torch.zeros((), dtype=torch.long)

    @property
    def layout(self) -> CacheLayout | None:
        return None if self.prefill_len is None else shard_layout(self.world, self.prefill_len,
                                                                  self.prefill_layout)

    def _allocate(self, key_states: Tensor, value_states: Tensor) -> None:
        n = key_states.shape[-2]
        if n > self.max_cache_len:
            raise ValueError(f"sharded cache holds {self.max_cache_len} slots; the prompt has {n}")
        self.prefill_len = n
        self.prefill_layout = causal_layout(n, self.world)     # the prefill graph's layout (the planner's)
        capacity = shard_capacity(self.world, n, self.max_cache_len, self.prefill_layout)[self.rank]
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(B, H, capacity, D)
        self.values = value_states.new_zeros(B, H, capacity, value_states.shape[-1])
        self.slots = torch.full((capacity,), -1, dtype=torch.long, device=key_states.device)
        self.cumulative_length = self.cumulative_length.to(key_states.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        prefill = self.prefill_len is None
        if self.world > 1 and not torch.compiler.is_compiling():
            _warn_eager_once(self.world)
        if prefill:
            self._allocate(key_states, value_states)
        n = key_states.shape[-2]
        positions = torch.arange(n, device=key_states.device) + self.cumulative_length
        cache_append(self.keys, self.values, self.slots, key_states, value_states, positions, self.rank,
                     self.world, self.prefill_len, self.prefill_layout, prefill)
        self.cumulative_length.add_(n)
        if prefill:     # the cache was empty: attention over it is the prompt's self-attention (ring-sharded)
            return key_states, value_states
        return cache_gather(self.keys, self.values, self.slots, positions, self.max_cache_len,
                            self.prefill_len, self.group_name, self.timeout, self.prefill_layout)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the global slots at and after the new length on this rank (speculative decoding's
        rollback). ``tokens_to_remove`` <= 0 removes that many tokens (HF >= 5); > 0 is the legacy
        absolute length. In place (the shard stays preallocated): dropped entries get slot -1 and zeros,
        and since an entry's local index depends only on its slot, later appends refill them."""
        if not self.is_initialized:
            return
        length = int(self.cumulative_length)
        new_len = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        if new_len < 0:
            raise OptionError(f"cannot crop {-tokens_to_remove} tokens from a cache of {length} slots; pass "
                              "-k with k <= the cache length (or the new length, > 0)")
        if new_len >= length:
            return
        drop = self.slots >= new_len
        self.keys[:, :, drop] = 0
        self.values[:, :, drop] = 0
        self.slots[drop] = -1
        self.cumulative_length.fill_(new_len)

    def reserve(self, max_cache_len: int) -> bool:
        """Hold at least ``max_cache_len`` global slots (call outside a compiled graph; True: it grew).
        A preallocated shard is reallocated to this rank's entries under the layout for the new length
        and its entries copied to the same local indices (a local index depends only on the slot);
        the new entries are unwritten (slot -1). The compiled graphs see new shapes: Dynamo recompiles
        once and then treats the length as dynamic (``serving/growth.py``)."""
        if max_cache_len <= self.max_cache_len:
            return False
        self.max_cache_len = max_cache_len
        if self.prefill_len is None:
            return True
        capacity = shard_capacity(self.world, self.prefill_len, max_cache_len, self.prefill_layout)[self.rank]
        held = self.keys.shape[-2]
        keys = self.keys.new_zeros(*self.keys.shape[:2], capacity, self.keys.shape[-1])
        values = self.values.new_zeros(*self.values.shape[:2], capacity, self.values.shape[-1])
        slots = self.slots.new_full((capacity,), -1)
        keys[:, :, :held], values[:, :, :held], slots[:held] = self.keys, self.values, self.slots
        self.keys, self.values, self.slots = keys, values, slots
        return True

    def filled(self) -> int:
        """Entries written on this rank (outside a graph: reads the slots buffer)."""
        return int((self.slots >= 0).sum()) if self.is_initialized else 0

    def get_seq_length(self) -> Tensor | int:
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.prefill_len is None:     # the prefill attends only its own keys (see update)
            return query_length, 0
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len


def _warn_eager_once(world: int) -> None:
    """A step outside any compiled graph reads the gathered cache (``cache_gather``'s own implementation):
    correct, but not sharded attention; say so once per process (Dynamo's eager fallback is otherwise
    silent here: its recompile limit, or a graph break in the forward)."""
    if _WARNED_EAGER:
        return
    _WARNED_EAGER.append(True)
    log.warning("ringcompile: a compiled sharded KV cache was updated outside a compiled graph at world "
                "size %d (the forward is not compiled with backend='ring', or Dynamo ran it eagerly: a graph "
                "break or torch._dynamo.config.recompile_limit); such steps attend the gathered cache "
                "(correct; every rank gathers the whole cache)", world)
