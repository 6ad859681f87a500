"""Multi-turn generate, crop, growth and assisted generation with ``m.forward = torch.compile(m.forward,
backend="ring")`` over a compiled sharded KV cache on gloo ranks, tiny HF models, against one process
doing the same steps (eager, HF's DynamicCache):

* N = 2 (one spawn): Llama (GQA), batch 2 with left padding: turn 1, turn 2 with a new prompt chunk
  appended to the same cache (query length > 1 against the cache: ``chunk_cache_attention``, pass-KV
  and pass-Q each), ``crop`` and more decoding, a turn 3 chunk of another length; Mistral (window 6,
  smaller than the cache) the same; ``prepare(model)`` without max_cache_len over 3 turns that pass
  turn 1's size (the cache grows by doubling; bounded graphs); assisted generation (a draft model,
  prompt lookup); the Llama conversation after a zigzag prefill (a 12-token prompt). Qwen2 (one KV head)
  and assisted generation through ``prepare`` with RING_SLOW=1.
* N = 4 (one spawn): turns 1 and 2 of the Llama conversation (the 5-token chunk split 2/2/1/0); the
  whole conversation with RING_SLOW=1.
"""

from __future__ import annotations

import math
import os

import pytest
from harness import run_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.multirank
SLOW = os.environ.get("RING_SLOW") == "1"
N2_CASES = ["multiturn", "multiturn_zigzag", "growing", "mistral", "assisted",
            *(["qwen2", "assisted_prepared"] if SLOW else [])]


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return run_cases("multiturn_cases", N2_CASES, world=2, timeout=900.0)


def _no_errors(name: str, per_rank: list[dict]) -> None:
    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, f"{name}: {errors[0]}"


def _check_forced_methods(per_rank: list[dict], world: int, turns: int = 4) -> None:
    """Each forced chunk method: same tokens and logits as one process, every chunk through the chunk op,
    nothing left unsharded, every kept slot on exactly one rank, about 1/N of them per rank."""
    for method in ("pass_kv", "pass_q"):
        results = [r[method] for r in per_rank]
        for rank, r in enumerate(results):
            assert r["same_tokens"] == [True] * turns, (method, rank, r)
            assert r["logit_error"] < 1e-4, (method, rank, r)
            assert r["chunk_calls"] >= (4 if turns == 4 else 2), (method, rank, r)  # each chunk, both layers
            assert set(r["cost_model_choice"]) <= {"pass_kv", "pass_q"} and r["cost_model_choice"], r
            assert not r["unsharded"], (method, rank, r)
            assert all(f <= math.ceil(r["global_len"] / world) + 1 for f in r["filled"]), (method, rank, r)
        if method == "pass_kv":         # the first run compiled the chunk graph: both layers rewritten
            assert all(r["chunk_rewrites"] == 2 for r in results), results
        filled = [sum(r["filled"]) for r in results]
        assert sum(filled) == results[0]["global_len"] * len(results[0]["filled"]), (method, filled)


def test_multiturn_and_crop_over_a_compiled_sharded_cache_match_one_process(two_ranks):
    results = two_ranks["multiturn"]
    _no_errors("multiturn", results)
    _check_forced_methods(results, 2)
    for r in results:          # prepare: turn 2 reuses turn 1's compiled sharded cache, no WARNING
        got = r["prepared"]
        assert got["same_tokens"] == [True, True] and got["logit_error"] < 1e-4, got
        assert got["reused"] and got["sharded"] and not got["warnings"], got


def test_chunks_and_crop_after_a_zigzag_prefill_match_one_process(two_ranks):
    zigzag = two_ranks["multiturn_zigzag"]     # a zigzag prefill (12 tokens), then chunks and crop over it
    _no_errors("multiturn_zigzag", zigzag)
    for r in zigzag:
        assert r["layouts"] == ["zigzag"] and r["same_tokens"] == [True] * 4 and r["logit_error"] < 1e-4, r
        assert all(f <= math.ceil(r["global_len"] / 2) + 1 for f in r["filled"]), r
    assert sum(sum(r["filled"]) for r in zigzag) == zigzag[0]["global_len"] * len(zigzag[0]["filled"]), zigzag


@pytest.mark.parametrize("family", ["mistral", pytest.param("qwen2", marks=pytest.mark.skipif(
    not SLOW, reason="RING_SLOW=1"))])
def test_chunks_of_windowed_and_one_kv_head_models_match_one_process(two_ranks, family):
    """Mistral: window 6 on a cache of up to 31 slots (whole shards fall out of it), read from HF's mask
    and passed to the decode and chunk ops (``passes/rules/window.py``); Qwen2: one KV head."""
    _no_errors(family, two_ranks[family])
    _check_forced_methods(two_ranks[family], 2)
    windowed = [r["pass_kv"]["windowed"] for r in two_ranks[family]]       # the first run compiled
    assert all(w >= 4 if family == "mistral" else w == 0 for w in windowed), windowed  # decode + chunk


def test_prepare_grows_the_cache_for_later_turns_with_bounded_graphs(two_ranks):
    """``prepare(model)`` sizes turn 1 for 15 slots; turn 2 reaches 24 (grown to 30), turn 3 37 (60).
    Same tokens and logits; the shard is the layout's for the grown length (about 1/N of it); the graphs
    are prefill + decode after turn 1, + the chunk graph and one decode recompile (the cache's sizes
    turn dynamic) after turn 2, and none more for turn 3's growth."""
    from ringcompile.runtime.cache_append import shard_capacity

    results = two_ranks["growing"]
    _no_errors("growing", results)
    for rank, r in enumerate(results):
        assert r["same_tokens"] == [True, True, True] and r["logit_error"] < 1e-4, (rank, r)
        assert [t["max_cache_len"] for t in r["turns"]] == [15, 30, 60], r["turns"]
        assert [t["capacity"] for t in r["turns"]] == [shard_capacity(2, 11, n)[rank] for n in (15, 30, 60)]
        assert all(f <= math.ceil(t["global_len"] / 2) for t in r["turns"] for f in t["filled"]), r["turns"]
        assert [t["graphs"] for t in r["turns"]] == [2, 4, 4], r["turns"]
        assert [t["dynamo_graphs"] for t in r["turns"]] == [2, 4, 4], r["turns"]
        assert r["outcomes"] == ["chunk_cache_attention", "decode_attention"], r
        assert not r["unsharded"] and not r["warnings"], r
    for t in range(3):
        filled = [sum(r["turns"][t]["filled"]) for r in results]
        assert sum(filled) == results[0]["turns"][t]["global_len"] * 2, (t, filled)


@pytest.mark.parametrize("label", ["assistant", "lookup", pytest.param("prepared", marks=pytest.mark.skipif(
    not SLOW, reason="RING_SLOW=1"))])
def test_assisted_generation_on_the_compiled_path_matches_plain_greedy(two_ranks, label):
    """A draft model / prompt lookup: the same tokens as plain greedy decoding in one process; candidates
    are verified by the chunk op and rejected ones cropped from the sharded cache; at most 3 graphs."""
    case = "assisted_prepared" if label == "prepared" else "assisted"
    _no_errors(case, two_ranks[case])
    for rank, per in enumerate(two_ranks[case]):
        r = per[label]
        assert r["same_tokens"] and r["sharded"], (label, rank, r)
        assert label == "prepared" or r["tokens_cropped"] > 0, (label, rank, r)
        assert "chunk_cache_attention" in r["outcomes"], (label, rank, r)
        assert r["graphs"] <= 3 and not r["unsharded"] and not r["warnings"], (label, rank, r)
        assert all(f <= math.ceil(r["global_len"] / 2) + 1 for f in r["filled"]), (label, rank, r)


def test_multiturn_at_four_ranks_matches_one_process():
    case = "llama_n4_full" if SLOW else "llama_n4"
    results = run_cases("multiturn_cases", [case], world=4, timeout=900.0)[case]
    _no_errors(case, results)
    _check_forced_methods(results, 4, turns=4 if SLOW else 2)
