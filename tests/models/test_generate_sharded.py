"""HF generate with the KV cache sharded over gloo ranks (eager: ``ringcompile.serving.hf``): greedy
tokens equal one process, logits within fp32 rounding, and each rank holds ~1/N of the cache, for
Llama (GQA; also with shards preallocated StaticCache-style), Mistral (sliding window shorter than
the sequence), Qwen2 (MQA) and GPT-2, batch 2 with left padding, at N = 2 and 4 (each N one spawn
running every family); `cache.crop` rollback (speculative / assisted decoding) at N = 4."""

from __future__ import annotations

import math

import pytest
from harness import run_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.multirank
STATIC_SLOTS = 24   # generate_cases.llama_static's max_cache_len


FAMILIES = ["llama", "mistral", "qwen2", "gpt2", "llama_static"]
ROLLBACK = ["llama_rollback", "llama_static_rollback", "llama_assisted"]   # run in the N = 4 spawn
_SPAWNED: dict[int, dict] = {}


def spawned(world: int) -> dict:
    """Every case of this world size from one spawn (the spawn and imports cost more than a case)."""
    if world not in _SPAWNED:
        names = FAMILIES + (ROLLBACK if world == 4 else [])
        _SPAWNED[world] = run_cases("generate_cases", names, world=world, timeout=300.0)
    return _SPAWNED[world]


@pytest.mark.parametrize("world", [2, 4])
def test_same_tokens_as_one_process_with_a_sharded_cache(world):
    results = {name: spawned(world)[name] for name in FAMILIES}
    for name, per_rank in results.items():
        errors = [r["error"] for r in per_rank if "error" in r]
        assert not errors, f"{name}: {errors[0]}"
        for rank, r in enumerate(per_rank):
            assert r["same_tokens"], (name, rank, r)
            assert r["logit_error"] < 1e-4, (name, rank, r)
            slots = r["global_len"]                  # prompt + new tokens but the last (never fed back)
            per_slot = r["full_bytes"] / slots
            assert r["filled_bytes"] <= per_slot * math.ceil(slots / world), (name, rank, r)
            allocated = STATIC_SLOTS if name.endswith("_static") else slots
            assert r["cache_bytes"] <= per_slot * math.ceil(allocated / world), (name, rank, r)
        assert sum(r["filled_bytes"] for r in per_rank) == per_rank[0]["full_bytes"], name


def test_crop_rolls_the_sharded_cache_back_like_one_process():
    """Speculative decoding's rollback at N = 4: crop by 3 tokens, continue on other tokens, crop into the
    prompt, continue again (dynamic and preallocated shards); and HF assisted generation with a random
    draft model (rejected drafts crop the sharded cache) gives plain greedy's tokens."""
    results = {name: spawned(4)[name] for name in ROLLBACK}
    for name, per_rank in results.items():
        errors = [r["error"] for r in per_rank if "error" in r]
        assert not errors, f"{name}: {errors[0]}"
        for rank, r in enumerate(per_rank):
            assert r["same_tokens"], (name, rank, r)
            if name == "llama_assisted":
                assert r["tokens_cropped"] > 0, (name, rank, r)    # drafts were rejected: crop ran
                continue
            assert r["logit_error"] < 1e-4, (name, rank, r)
            assert r["shard_len"] == r["layout_len"] and r["slots_below_len"], (name, rank, r)
