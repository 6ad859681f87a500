"""HF generate with ``m.forward = torch.compile(m.forward, backend="ring")`` over a sharded KV cache
(``sharded_cache(..., compiled=True)``) on gloo ranks: greedy tokens equal one process (eager, HF's
own cache), each rank holds about 1/N of the cache, every attention over the cache became
decode_attention, and the compiled graphs do not grow with the number of generated tokens."""

from __future__ import annotations

import math

import pytest
from harness import run_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.multirank


def test_compiled_llama_generate_with_a_sharded_cache_matches_one_process():
    from generate_compiled_cases import MAX_CACHE

    world = 2
    results = run_cases("generate_compiled_cases", ["llama"], world=world, timeout=400.0)
    for name, per_rank in results.items():
        errors = [r["error"] for r in per_rank if "error" in r]
        assert not errors, f"{name}: {errors[0]}"
        for rank, r in enumerate(per_rank):
            assert r["same_tokens"], (name, rank, r)
            assert r["logit_error"] < 1e-4, (name, rank, r)
            assert r["graphs"] <= 3, (name, rank, r)          # prefill + decode (+ one automatic-dynamic)
            assert r["decode_rewrites"] == 2 * r["graphs"], (name, rank, r)   # 2 layers in each graph
            assert not r["unsharded"], (name, rank, r)
            assert r["cache_bytes"] <= r["slot_bytes"] * math.ceil(MAX_CACHE / world + 1), (name, rank, r)
            assert all(f <= math.ceil(r["global_len"] / world) for f in r["filled"]), (name, rank, r)
        filled = [sum(r["filled"]) for r in per_rank]
        assert sum(filled) == per_rank[0]["global_len"] * len(per_rank[0]["filled"]), (name, filled)
