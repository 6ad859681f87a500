"""Serving long contexts with a sharded KV cache (see docs/ARCHITECTURE.md "Serving")."""
