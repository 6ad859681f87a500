"""A compiled sharded KV cache that grows between ``generate`` calls (DynamicCache-like serving).

``CompiledShardedLayer`` is preallocated so that a compiled decode step has fixed shapes (one graph
for every token). A later turn of a conversation may need more slots than the first was sized for.
How many a ``generate`` call can reach is known in Python before any graph runs: the conversation
so far (its ``input_ids``) plus ``max_new_tokens`` (or the call's ``max_length``). When that is more
than the cache holds, ``reserve`` grows every layer to ``grown_length(old, needed)``: the old length
doubled until it fits. That is a pure function of two lengths every rank knows (the same prompt
and generation arguments on every rank), so the ranks agree without a collective; and doubling
bounds the number of distinct cache sizes, hence of shapes the compiled graphs see, by
log2(final / first). Dynamo recompiles a graph once when the sizes first change and then keeps
them dynamic (measured by case ``growing`` in ``tests/models/multiturn_cases.py``).
"""

from __future__ import annotations

from typing import Any

from ringcompile.errors import OptionError


def grown_length(current: int, needed: int) -> int:
    """``current`` doubled until it holds ``needed`` global slots (``current`` itself if it does)."""
    if current < 1:
        raise OptionError(f"a sharded cache of {current} slots cannot grow by doubling; give it at least one")
    length = current
    while length < needed:
        length *= 2
    return length


def compiled_layers(cache: Any) -> list[Any]:
    """The ``CompiledShardedLayer``s of ``cache`` (all its layers), or [] when it is another cache."""
    from .compiled_cache import CompiledShardedLayer

    layers = list(getattr(cache, "layers", None) or [])
    return layers if layers and all(isinstance(layer, CompiledShardedLayer) for layer in layers) else []


def reserve(cache: Any, needed: int) -> int | None:
    """Grow every layer of a compiled sharded ``cache`` to hold ``needed`` global slots (outside a
    compiled graph); returns the new length, or None when it already held them."""
    layers = compiled_layers(cache)
    if not layers:
        raise OptionError(f"reserve() needs a cache of sharded_cache(..., compiled=True); got "
                          f"{type(cache).__name__}")
    current = min(layer.max_cache_len for layer in layers)
    if needed <= current:
        return None
    length = grown_length(current, needed)
    for layer in layers:
        layer.reserve(length)
    return length
