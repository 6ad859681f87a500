"""``prepare(model)``: ``generate`` gets a compiled sharded KV cache without the user building one.

HF computes positions and mask sizes from the cache object in Python, so the backend alone cannot
shard a cache it never sees (docs/ARCHITECTURE.md "Serving"). The opt-in is explicit and visible:
``prepare`` wraps ``model.generate`` (that instance only) so that a call whose cache is absent, or a
fresh (empty) ``DynamicCache`` / ``StaticCache``, runs with ``sharded_cache(..., compiled=True)``
instead, sized for the call: the StaticCache's ``max_cache_len``, else ``prepare``'s
``max_cache_len``, else prompt length + ``max_new_tokens``. A cache that already holds tokens
(multi-turn), another cache class, or one rank, is passed through unchanged: a compiled sharded
cache from an earlier turn is reused (its later chunks run as ``chunk_cache_attention``), grown
first when the call can reach past its length (``serving/growth.py``: the conversation so far plus
``max_new_tokens``, the old length doubled until it fits; so ``max_cache_len`` is only the first
turn's size); a plain HF cache that already holds tokens cannot be sharded after the fact, so it
stays (the gathered fallback, correct) with a WARNING. The sharded cache is
what ``generate`` returns (``past_key_values``); a fresh cache the caller passed stays empty.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ringcompile.errors import OptionError
from ringcompile.log import get_logger
from ringcompile.runtime.group import resolve_group

from .growth import compiled_layers, reserve
from .hf import _require_transformers, sharded_cache

log = get_logger(__name__)
_CACHE_KWARGS = ("cache", "past_key_values")


def prepare(model: Any, max_cache_len: int | None = None, *, group: Any = None, timeout: float = 60.0) -> Any:
    """Make ``model.generate`` use a compiled sharded KV cache over ``group`` (default: the world) when
    it would otherwise start from an empty HF cache; returns ``model``. Compile the forward with
    ``backend="ring"`` (``model.forward = torch.compile(model.forward, backend="ring")``) as usual."""
    _require_transformers()
    if max_cache_len is not None and max_cache_len < 1:
        raise OptionError(f"prepare(max_cache_len={max_cache_len}): the cache needs at least one slot")
    if getattr(model.generate, "_ringcompile_prepared", False):
        return model
    resolved = resolve_group(group)
    rank, world = resolved.rank, resolved.world_size
    if world == 1:
        log.info("ringcompile.serving.prepare: one rank, generate keeps HF's own cache")
        return model
    plain_generate = model.generate
    layers = model.config.get_text_config().num_hidden_layers
    default_kwarg = _cache_kwarg(model)

    @functools.wraps(plain_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        name = next((k for k in _CACHE_KWARGS if k in kwargs), default_kwarg)
        cache = kwargs.get(name)
        length = _fresh_cache_length(cache, max_cache_len, args, kwargs)
        if length is None and cache is not None and not _is_compiled_sharded(cache):
            log.warning("ringcompile.serving.prepare: generate got a %s that already holds tokens or is not "
                        "HF's own class; it is kept unsharded (every rank holds the whole cache; correct). "
                        "Start the conversation with no cache (or a fresh one) so prepare shards it",
                        type(cache).__name__)
        if length is not None:
            kwargs[name] = sharded_cache(layers, rank, world, group=group, timeout=timeout,
                                         max_cache_len=length, compiled=True)
        elif _is_compiled_sharded(cache):
            _grow_for_call(model, cache, args, kwargs)
        return plain_generate(*args, **kwargs)

    generate._ringcompile_prepared = True  # type: ignore[attr-defined]
    model.generate = generate
    return model


def _is_compiled_sharded(cache: Any) -> bool:
    """A cache of ``sharded_cache(..., compiled=True)`` (from an earlier turn): reused, grown if needed."""
    return bool(compiled_layers(cache))


def _grow_for_call(model: Any, cache: Any, args: tuple, kwargs: dict) -> None:
    """Grow a reused compiled sharded cache to the most slots this generate call can reach."""
    needed = call_length(model, args, kwargs)
    if needed is None:
        log.info("ringcompile.serving.prepare: the call's length is unknown (no input_ids); the sharded "
                 "cache is not grown")
        return
    grown = reserve(cache, needed)
    if grown is not None:
        log.info("ringcompile.serving.prepare: the sharded KV cache grew to %d slots (this call reaches %d)",
                 grown, needed)


def call_length(model: Any, args: tuple, kwargs: dict) -> int | None:
    """The most cache slots a ``generate`` call can reach: its prompt (the whole conversation) plus
    ``max_new_tokens``, else its ``max_length``, from the call's arguments or generation config (as HF
    resolves them); None when there is no prompt tensor."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        ids = kwargs.get("inputs_embeds")
        if not isinstance(ids, torch.Tensor):
            return None
        prompt = ids.shape[1]
    else:
        prompt = ids.shape[-1]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is not None:
        return prompt + int(new)
    length = kwargs.get("max_length", getattr(config, "max_length", None))
    return None if length is None else max(int(length), prompt)


def _cache_kwarg(model: Any) -> str:
    """``cache`` in transformers versions whose forward takes it (``past_key_values`` is deprecated
    there), else ``past_key_values``."""
    import inspect

    try:
        return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _fresh_cache_length(cache: Any, max_cache_len: int | None, args: tuple, kwargs: dict) -> int | None:
    """The global slots for a sharded cache replacing ``cache``; None: keep ``cache`` as it is."""
    from transformers.cache_utils import DynamicCache, StaticCache

    if cache is not None and (type(cache) not in (DynamicCache, StaticCache) or cache.get_seq_length() > 0):
        return None
    if isinstance(cache, StaticCache):
        return int(cache.get_max_length() if hasattr(cache, "get_max_length") else cache.max_cache_len)
    if max_cache_len is not None:
        return max_cache_len
    ids = kwargs.get("input_ids", args[0] if args else None)
    new = kwargs.get("max_new_tokens")
    if not isinstance(ids, torch.Tensor) or not isinstance(new, int):
        raise OptionError("ringcompile.serving.prepare: generate needs max_new_tokens (or prepare(model, "
                          "max_cache_len=M)) to size the sharded KV cache")
    return ids.shape[-1] + new
