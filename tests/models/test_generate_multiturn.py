"""Multi-turn generate and crop with ``m.forward = torch.compile(m.forward, backend="ring")`` over a
compiled sharded KV cache on 2 gloo ranks (one spawn), tiny HF Llama (GQA), batch 2 with left padding:
turn 1, then turn 2 with a new prompt chunk appended to the same cache (query length > 1 against the
cache: ``chunk_cache_attention``, pass-KV and pass-Q each), then ``crop`` and more decoding, then a
turn 3 chunk of another length; tokens
and logits equal one process doing the same steps. Also after a zigzag prefill (a 12-token prompt)."""

from __future__ import annotations

import math

import pytest
from harness import run_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.multirank
WORLD = 2


def test_multiturn_and_crop_over_a_compiled_sharded_cache_match_one_process():
    both = run_cases("multiturn_cases", ["multiturn", "multiturn_zigzag"], world=WORLD, timeout=400.0)
    results = both["multiturn"]
    errors = [r["error"] for r in results + both["multiturn_zigzag"] if "error" in r]
    assert not errors, errors[0]
    zigzag = both["multiturn_zigzag"]     # a zigzag prefill (12 tokens), then chunks and crop over it
    for r in zigzag:
        assert r["layouts"] == ["zigzag"] and r["same_tokens"] == [True] * 4 and r["logit_error"] < 1e-4, r
        assert all(f <= math.ceil(r["global_len"] / WORLD) + 1 for f in r["filled"]), r
    assert sum(sum(r["filled"]) for r in zigzag) == zigzag[0]["global_len"] * len(zigzag[0]["filled"]), zigzag
    for method in ("pass_kv", "pass_q"):
        per_rank = [r[method] for r in results]
        for rank, r in enumerate(per_rank):
            assert r["same_tokens"] == [True, True, True, True], (method, rank, r)
            assert r["logit_error"] < 1e-4, (method, rank, r)
            assert r["chunk_calls"] >= 4, (method, rank, r)        # turn 2's chunk, in both layers
            assert set(r["cost_model_choice"]) <= {"pass_kv", "pass_q"} and r["cost_model_choice"], r
            assert not r["unsharded"], (method, rank, r)
            assert all(f <= math.ceil(r["global_len"] / WORLD) + 1 for f in r["filled"]), (method, rank, r)
        if method == "pass_kv":         # the first run compiled the chunk graph: both layers rewritten
            assert all(r["chunk_rewrites"] == 2 for r in per_rank), per_rank
        filled = [sum(r["filled"]) for r in per_rank]        # every kept slot on exactly one rank
        assert sum(filled) == per_rank[0]["global_len"] * len(per_rank[0]["filled"]), (method, filled)
    for r in results:          # prepare: turn 2 reuses turn 1's compiled sharded cache, no WARNING
        got = r["prepared"]
        assert got["same_tokens"] == [True, True] and got["logit_error"] < 1e-4, got
        assert got["reused"] and got["sharded"] and not got["warnings"], got
