"""HF generate with the KV cache sharded over gloo ranks (eager: ``ringcompile.serving.hf``): greedy
tokens equal one process, logits within fp32 rounding, and each rank holds ~1/N of the cache, for
Llama (GQA), Mistral (sliding window shorter than the sequence), Qwen2 (MQA) and GPT-2, batch 2 with
left padding, at N = 2 and 4 (N = 4: Mistral only, for the suite's time budget)."""

from __future__ import annotations

import math

import pytest
from harness import run_cases

pytest.importorskip("transformers")
pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("world, families", [(2, ["llama", "mistral", "qwen2", "gpt2"]),
                                             (4, ["mistral"])])
def test_same_tokens_as_one_process_with_a_sharded_cache(world, families):
    results = run_cases("generate_cases", families, world=world, timeout=240.0)
    for name, per_rank in results.items():
        errors = [r["error"] for r in per_rank if "error" in r]
        assert not errors, f"{name}: {errors[0]}"
        for rank, r in enumerate(per_rank):
            assert r["same_tokens"], (name, rank, r)
            assert r["logit_error"] < 1e-4, (name, rank, r)
            slots = r["global_len"]                  # prompt + new tokens but the last (never fed back)
            assert r["cache_bytes"] <= r["full_bytes"] * math.ceil(slots / world) / slots + 1, (name, rank, r)
        assert sum(r["cache_bytes"] for r in per_rank) == per_rank[0]["full_bytes"], name
