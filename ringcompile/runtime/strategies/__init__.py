"""One module per strategy; each defines ``forward(ctx, q, k, v)`` and ``backward(ctx, ...)``."""

from __future__ import annotations

from types import ModuleType

from . import allgather, hybrid, local, ring, ulysses, zigzag

STRATEGIES: dict[str, ModuleType] = {
    "local": local,
    "ring": ring,
    "zigzag": zigzag,
    "allgather": allgather,
    "ulysses": ulysses,
    "hybrid": hybrid,
}

NAMES = tuple(STRATEGIES)
