"""HF ``generate`` with a KV cache sharded over the ranks, in eager mode (no graph rewriting yet).

What the backend will insert into captured decode graphs, written out by hand so its semantics
are tested against HF itself:

* ``ShardedCacheLayer`` (a ``DynamicLayer``): every rank computes the step's new K/V (the model
  runs replicated), and the layer keeps only the slots ``CacheLayout`` gives this rank: the
  prefill's contiguous shard, then each appended token at its owner. It reports the GLOBAL length
  (``get_seq_length``, ``get_mask_sizes``), so HF's positions, ``cache_position`` and masks are the
  ones of one process.
* the attention function ``"ring_decode"`` (registered with HF's ``AttentionInterface``, with
  HF's eager mask builder as its mask): the queries of the step attend this rank's shard via
  ``runtime.decode.decode_attention``, with HF's own 4-D mask gathered at the shard's slots, and
  the partials are merged across ranks. Prefill goes through the same path (a chunk of queries).

Per-rank cache memory is ~1/N of one process; the dense layers still run replicated (a compiled
graph would shard the prefill's sequence, see docs/ARCHITECTURE.md "Serving").
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ringcompile.errors import MissingDependencyError, OptionError, UnsupportedPatternError
from ringcompile.runtime.cache_layout import CacheLayout
from ringcompile.runtime.decode import decode_attention

Tensor = torch.Tensor
ATTENTION_NAME = "ring_decode"
# key tensor returned by a layer's update -> that layer (the attention function gets only the tensor)
_LAYER_OF_KEYS: weakref.WeakValueDictionary[int, ShardedCacheLayer] = weakref.WeakValueDictionary()

try:
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - transformers is optional
    DynamicCache = DynamicLayer = None  # type: ignore[assignment,misc]


def _require_transformers() -> None:
    if DynamicLayer is None:
        raise MissingDependencyError("ringcompile.serving.hf needs transformers: pip install transformers")


@torch._dynamo.disable
def _refuse_under_compile() -> None:
    """Raised from eager code (a graph break), so Dynamo cannot swallow it and rerun the frame eagerly."""
    raise OptionError("sharded_cache() without compiled=True was traced by torch.compile: its layers decide "
                      "shard ownership with Python ints (a recompile per generated token) and need "
                      "attn_implementation='ring_decode'. Under torch.compile(..., backend='ring') use "
                      "sharded_cache(num_layers, rank, world, max_cache_len=M, compiled=True)")


class ShardedCacheLayer(DynamicLayer if DynamicLayer is not None else object):  # type: ignore[misc]
    """One layer's K/V shard on this rank; lengths and masks stay global."""

    def __init__(self, rank: int, world: int, policy: str = "shortest", group: Any = None,
                 timeout: float = 60.0) -> None:
        super().__init__()
        self.rank, self.world, self.policy, self.group, self.timeout = rank, world, policy, group, timeout
        self.layout: CacheLayout | None = None
        self.global_len = 0
        self.slots = torch.zeros(0, dtype=torch.long)
        self.q_slots = torch.zeros(0, dtype=torch.long)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            _refuse_under_compile()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, start = key_states.shape[-2], self.global_len
        if self.layout is None:                       # the first update is the prefill
            self.layout = CacheLayout(self.world, n, "contiguous", self.policy)
            mine = self.layout.slots(self.rank, n)
        else:
            mine = [t for t in range(start, start + n) if self.layout.owner(t) == self.rank]
        local = torch.tensor([t - start for t in mine], dtype=torch.long, device=key_states.device)
        self.keys = torch.cat([self.keys, key_states.index_select(-2, local)], dim=-2)
        self.values = torch.cat([self.values, value_states.index_select(-2, local)], dim=-2)
        self.slots = torch.cat([self.slots.to(key_states.device), local + start])
        self.q_slots = torch.arange(start, start + n, device=key_states.device)
        self.global_len = start + n
        _LAYER_OF_KEYS[id(self.keys)] = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.global_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.global_len + query_length, 0

    is_croppable = True   # assisted / speculative decoding rolls the cache back with crop

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the global slots at and after the new length on every rank (HF's rollback after a
        rejected draft). ``tokens_to_remove`` <= 0 removes that many tokens (HF >= 5); > 0 is the
        legacy absolute length (HF 4's ``crop(max_length)``). Slot ownership depends only on the
        slots before it, so the kept shards are exactly ``layout`` at the new length and later
        appends go where they would have gone."""
        new_len = self._cropped_length(tokens_to_remove)
        if new_len is None:
            return
        keep = torch.nonzero(self.slots < new_len).flatten().to(self.keys.device)
        self.keys = self.keys.index_select(-2, keep)
        self.values = self.values.index_select(-2, keep)
        self.slots = self.slots[self.slots < new_len]
        self.q_slots = self.q_slots[:0]
        self.global_len = new_len
        _LAYER_OF_KEYS[id(self.keys)] = self

    def _cropped_length(self, tokens_to_remove: int) -> int | None:
        """The global length after ``crop(tokens_to_remove)``; None when nothing changes."""
        new_len = tokens_to_remove if tokens_to_remove > 0 else self.global_len + tokens_to_remove
        if new_len < 0:
            raise OptionError(f"cannot crop {-tokens_to_remove} tokens from a cache of {self.global_len} "
                              "slots; pass -k with k <= the cache length (or the new length, > 0)")
        return None if self.layout is None or new_len >= self.global_len else new_len


class ShardedStaticLayer(ShardedCacheLayer):
    """A shard preallocated for ``max_cache_len`` global slots: this rank's most slots under the layout
    (about max_cache_len / N), allocated at the prefill and filled in place; returns views."""

    def __init__(self, rank: int, world: int, max_cache_len: int, policy: str = "shortest", group: Any = None,
                 timeout: float = 60.0) -> None:
        super().__init__(rank, world, policy, group, timeout)
        self.max_cache_len = max_cache_len
        self.filled = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            _refuse_under_compile()
        n, start = key_states.shape[-2], self.global_len
        if start + n > self.max_cache_len:
            raise ValueError(f"sharded static cache holds {self.max_cache_len} slots; {start + n} requested")
        if self.layout is None:
            self.layout = CacheLayout(self.world, n, "contiguous", self.policy)
            capacity = self.layout.lengths(self.max_cache_len)[self.rank]
            B, H, _, D = key_states.shape
            self.device = key_states.device
            self.keys = key_states.new_zeros(B, H, capacity, D)
            self.values = value_states.new_zeros(B, H, capacity, value_states.shape[-1])
            self.is_initialized = True
            mine = self.layout.slots(self.rank, n)
        else:
            mine = [t for t in range(start, start + n) if self.layout.owner(t) == self.rank]
        local = torch.tensor([t - start for t in mine], dtype=torch.long, device=key_states.device)
        self.keys[:, :, self.filled:self.filled + len(mine)] = key_states.index_select(-2, local)
        self.values[:, :, self.filled:self.filled + len(mine)] = value_states.index_select(-2, local)
        self.filled += len(mine)
        self.slots = torch.cat([self.slots.to(key_states.device), local + start])
        self.q_slots = torch.arange(start, start + n, device=key_states.device)
        self.global_len = start + n
        k, v = self.keys[:, :, :self.filled], self.values[:, :, :self.filled]
        self._views = (k, v)                         # keep the views alive for the registry
        _LAYER_OF_KEYS[id(k)] = self
        return k, v

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        """As ``ShardedCacheLayer.crop``, in place: the kept entries move to the front of the
        preallocated shard (they already are: local order is slot order) and ``filled`` shrinks, so
        the next update overwrites the stale ones."""
        new_len = self._cropped_length(tokens_to_remove)
        if new_len is None:
            return
        keep = torch.nonzero(self.slots < new_len).flatten().to(self.keys.device)
        m = keep.numel()
        self.keys[:, :, :m] = self.keys.index_select(-2, keep)
        self.values[:, :, :m] = self.values.index_select(-2, keep)
        self.filled = m
        self.slots = self.slots[self.slots < new_len]
        self.q_slots = self.q_slots[:0]
        self.global_len = new_len


def sharded_cache(num_layers: int, rank: int, world: int, *, policy: str = "shortest", group: Any = None,
                  timeout: float = 60.0, max_cache_len: int | None = None, compiled: bool = False):
    """A ``DynamicCache`` whose layers hold only this rank's shard (pass as ``past_key_values``);
    with ``max_cache_len`` each shard is preallocated (StaticCache-style, ~max_cache_len / N per rank).

    ``compiled=True`` (needs ``max_cache_len``; ``policy`` is then round_robin): layers a forward compiled
    with ``backend="ring"`` traces without a recompile per token (``serving/compiled_cache.py``); the
    model keeps its own attention implementation."""
    _require_transformers()
    register()
    cache = DynamicCache()
    if compiled:
        if max_cache_len is None:
            raise OptionError("sharded_cache(compiled=True) needs max_cache_len (the shards are preallocated "
                              "so a compiled decode step has fixed shapes)")
        from ringcompile.runtime.collectives import group_name_of

        from .compiled_cache import CompiledShardedLayer

        name = group_name_of(group)
        cache.layers = [CompiledShardedLayer(rank, world, max_cache_len, name, timeout)
                        for _ in range(num_layers)]
    elif max_cache_len is not None:
        cache.layers = [ShardedStaticLayer(rank, world, max_cache_len, policy, group, timeout)
                        for _ in range(num_layers)]
    else:
        cache.layers = [ShardedCacheLayer(rank, world, policy, group, timeout) for _ in range(num_layers)]
    cache.layer_class_to_replicate = None
    return cache


def ring_decode_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[Tensor, None]:
    """HF attention-interface function: the step's queries against this rank's shard, merged over ranks."""
    layer = _LAYER_OF_KEYS.get(id(key))
    if layer is None or key is not getattr(layer, "_views", (layer.keys,))[0]:
        raise UnsupportedPatternError("ring_decode attention needs a cache from "
                                      "ringcompile.serving.hf.sharded_cache (pass it to generate as cache= / "
                                      "past_key_values=)")
    keep = None
    if attention_mask is not None:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    out = decode_attention(query, key, value, kv_slots=layer.slots, q_slots=layer.q_slots,
                           cache_len=layer.global_len, slot_mask=keep, scale=scaling, window=window,
                           layout=layer.layout, group=layer.group, timeout=layer.timeout)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"ring_decode"`` with HF's attention and mask interfaces (idempotent)."""
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, ring_decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
