"""HF generate with ``m.forward = torch.compile(m.forward, backend="ring")`` over a sharded KV cache
(``sharded_cache(..., compiled=True)``) on 2 gloo ranks, batch 2 with left padding: greedy tokens equal
one process (eager, HF's own cache), each rank holds about 1/N of the cache, every SDPA over the cache
(and HF's eager softmax chain with its additive float mask) became decode_attention, the prefill graph
was ring-sharded along the sequence, and the compiled graphs do not grow with the number of generated
tokens (prefill + one decode graph). HF's own cache (none passed) and ``serving.prepare``; Qwen2 (MQA).
Mistral (window), GPT-2 and the Inductor inner compiler with RING_SLOW=1 (the others use inner="eager"
for the suite's time budget)."""

from __future__ import annotations

import math
import os

import pytest
from harness import run_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.multirank
WORLD = 2
SLOW = (["mistral", "mistral_eager_attention", "llama_inductor", "gpt2"] if os.environ.get("RING_SLOW") == "1"
        else [])


def _check_same_tokens_and_sharded(name: str, per_rank: list[dict]) -> None:
    from generate_compiled_cases import MAX_CACHE

    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, f"{name}: {errors[0]}"
    for rank, r in enumerate(per_rank):
        assert r["same_tokens"], (name, rank, r)
        assert r["logit_error"] < 1e-4, (name, rank, r)
        assert r["graphs"] <= 2, (name, rank, r)              # one prefill graph, one decode graph
        assert r["cache_bytes"] <= r["slot_bytes"] * (math.ceil(MAX_CACHE / WORLD) + 1), (name, rank, r)
        assert all(f <= math.ceil(r["global_len"] / WORLD) for f in r["filled"]), (name, rank, r)
    filled = [sum(r["filled"]) for r in per_rank]
    assert sum(filled) == per_rank[0]["global_len"] * len(per_rank[0]["filled"]), (name, filled)


def _check_plain_cache(per_rank: list[dict]) -> None:
    """HF's own cache (none passed): same tokens, the cache gathered, ONE WARNING saying what to pass."""
    from ringcompile.passes.rules.decode import PLAIN_CACHE_REASON

    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, f"llama_plain_cache: {errors[0]}"
    for r in per_rank:
        assert r["same_tokens"] and r["logit_error"] < 1e-4, r
        assert len(r["warnings"]) == 1 and PLAIN_CACHE_REASON in r["warnings"][0], r["warnings"]
        declined = [d for d in r["decisions"] if PLAIN_CACHE_REASON in d[3]]
        assert len(declined) >= 2, r["decisions"]          # both layers of every decode graph named


def _check_prepared(per_rank: list[dict]) -> None:
    """``prepare(model)``: no cache, or a fresh StaticCache, becomes the compiled sharded cache."""
    from generate_cases import NEW, PROMPT
    from generate_compiled_cases import MAX_CACHE

    errors = [r["error"] for r in per_rank if "error" in r]
    assert not errors, f"llama_prepared: {errors[0]}"
    for r in per_rank:
        for label, want_len in (("none", PROMPT + NEW), ("static", MAX_CACHE)):
            got = r[label]
            assert got["same_tokens"] and got["logit_error"] < 1e-4, (label, got)
            assert got["sharded"] and got["max_cache_len"] == want_len and not got["warnings"], (label, got)
            assert all(f <= math.ceil((PROMPT + NEW - 1) / WORLD) for f in got["filled"]), (label, got)
    for label in ("none", "static"):
        filled = [sum(r[label]["filled"]) for r in per_rank]
        assert sum(filled) == (PROMPT + NEW - 1) * len(per_rank[0][label]["filled"]), (label, filled)


def _check_prefill_kept_local(name: str, per_rank: list[dict], layout: str, padded: int) -> None:
    """The prefill graph's K/V reach every layer's cache_append as this rank's shard (no gather), told the
    graph's layout, which is the cache's; each rank then holds its slots of the prompt, padding dropped."""
    for r in per_rank:
        assert r["prefill_layouts"] == [layout] and r["cache_layouts"] == [layout], (name, r)
        writes = r["cache_writes"]
        assert len(writes) == 2, (name, writes)                       # one per layer
        for w in writes:
            assert w["seq_layout"] == layout and w["gathered"] == [False, False], (name, w)
            assert w["local_len"] == [padded // WORLD] * 2, (name, w)


def _check_forced_layout(per_rank: list[dict]) -> None:
    """layout="contiguous" forced on a 12-token prompt whose cache stores zigzag: the K/V are gathered for
    cache_append (today's behaviour, correct), and the tokens are still one process's."""
    for r in per_rank:
        assert r["prefill_layouts"] == ["contiguous"] and r["cache_layouts"] == ["zigzag"], r
        assert [w["seq_layout"] for w in r["cache_writes"]] == ["", ""], r["cache_writes"]
        assert all(w["gathered"] == [True, True] for w in r["cache_writes"]), r["cache_writes"]


def test_compiled_generate_over_a_sharded_cache_matches_one_process():
    cases = ["llama", "llama_zigzag", "llama_forced_contiguous", "llama_eager_attention", "llama_plain_cache",
             "llama_prepared", "qwen2", *SLOW]
    results = run_cases("generate_compiled_cases", cases, world=WORLD,
                        timeout=500.0)
    _check_plain_cache(results.pop("llama_plain_cache"))
    _check_prepared(results.pop("llama_prepared"))
    for name, layout, padded in (("llama", "contiguous", 12), ("llama_zigzag", "zigzag", 12),
                                 ("qwen2", "contiguous", 12)):
        assert "error" not in results[name][0], results[name][0]["error"]
        _check_prefill_kept_local(name, results[name], layout, padded)
    forced = results["llama_forced_contiguous"]
    assert "error" not in forced[0], forced[0]["error"]
    _check_forced_layout(forced)
    for name, per_rank in results.items():
        _check_same_tokens_and_sharded(name, per_rank)
        for r in per_rank:
            # prefill graph: both layers ring-sharded; decode graph: both layers decode_attention (SDPA
            # with a bool mask, or HF's eager chain with its additive float mask)
            assert r["graphs"] == 2 and r["ring_rewrites"] == 2 and r["decode_rewrites"] == 2, (name, r)
            assert r["sharded_graphs"] == 1, (name, r)
            assert not r["unsharded"] and not r["warnings"], (name, r)
