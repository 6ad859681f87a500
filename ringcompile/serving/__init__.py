"""Serving long contexts with a sharded KV cache (see docs/ARCHITECTURE.md "Serving")."""

from .auto_cache import prepare
from .growth import reserve

__all__ = ["prepare", "reserve"]
