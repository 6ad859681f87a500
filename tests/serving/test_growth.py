"""A compiled sharded KV cache that grows (``serving/growth.py``, ``CompiledShardedLayer.reserve``) on one
process: the doubling rule, entries kept at their local index, the call length prepare grows to, and a
compiled conversation on one rank that grows twice and is followed by one of another prompt length (the
decode rule with a dynamic prefill length). Over 2 ranks: tests/models/test_generate_multiturn.py."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringcompile.errors import OptionError, ShapeMismatchError
from ringcompile.runtime.cache_append import shard_capacity
from ringcompile.runtime.cache_layout import CacheLayout

pytest.importorskip("transformers")


@settings(max_examples=60, deadline=None)
@given(current=st.integers(1, 300), needed=st.integers(0, 5000))
def test_grown_length_is_the_least_doubling_that_holds_the_call(current, needed):
    from ringcompile.serving.growth import grown_length

    got = grown_length(current, needed)
    ratio = got // current
    assert got % current == 0 and ratio & (ratio - 1) == 0         # current * 2^k
    assert got >= needed and (got == current or got // 2 < needed)


def test_grown_length_rejects_an_empty_cache():
    from ringcompile.serving.growth import grown_length

    with pytest.raises(OptionError, match="at least one"):
        grown_length(0, 4)


def _layer_filled(rank: int, world: int, max_len: int, prefill: int, total: int, monkeypatch):
    from ringcompile.serving import compiled_cache
    from ringcompile.serving.compiled_cache import CompiledShardedLayer

    monkeypatch.setattr(compiled_cache, "cache_gather", lambda *a: (None, None))   # no ranks here
    g = torch.Generator().manual_seed(10 + rank)
    k, v = (torch.randn(2, 2, total, 4, generator=g) for _ in range(2))
    layer = CompiledShardedLayer(rank, world, max_cache_len=max_len)
    layer.update(k[:, :, :prefill], v[:, :, :prefill])
    return layer, k, v


@pytest.mark.parametrize("rank", [0, 2])
def test_reserve_keeps_every_entry_at_its_local_index_and_appends_go_on(rank, monkeypatch):
    """Past the preallocated shard an append raises; after ``reserve`` the shard is the layout's size for
    the new length, the old entries are where they were, and appends fill exactly the layout's slots."""
    from ringcompile.serving.growth import reserve

    world, prefill, first, total = 3, 7, 12, 40
    layer, k, v = _layer_filled(rank, world, first, prefill, total, monkeypatch)
    for t in range(prefill, first):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    held = layer.keys.clone()
    with pytest.raises(ShapeMismatchError, match="preallocated"):
        for t in range(first, first + world):       # every rank's next entry is past its shard
            layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    layer.crop(first)
    cache = type("Cache", (), {"layers": [layer]})()
    assert reserve(cache, first) is None and reserve(cache, 25) == 48
    assert layer.max_cache_len == 48 and layer.keys.shape[-2] == shard_capacity(world, prefill, 48)[rank]
    assert torch.equal(layer.keys[:, :, :held.shape[-2]], held)
    assert not bool(layer.keys[:, :, held.shape[-2]:].any())
    assert bool((layer.slots[held.shape[-2]:] == -1).all())
    for t in range(first, total):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    slots = CacheLayout(world, prefill, "contiguous", "round_robin").slots(rank, total)
    assert layer.slots[:len(slots)].tolist() == slots and layer.filled() == len(slots)
    assert torch.equal(layer.keys[:, :, :len(slots)], k[:, :, slots])
    assert torch.equal(layer.values[:, :, :len(slots)], v[:, :, slots])
    with pytest.raises(OptionError, match="compiled=True"):
        reserve(type("Cache", (), {"layers": []})(), 10)


def test_call_length_is_the_conversation_plus_what_the_call_may_generate():
    from transformers import GenerationConfig

    from ringcompile.serving.auto_cache import call_length

    n = int(torch.randint(5, 30, ()))
    ids = torch.randint(0, 64, (2, n))
    model = type("Model", (), {"generation_config": GenerationConfig(max_length=n + 50)})()
    assert call_length(model, (), {"input_ids": ids, "max_new_tokens": 7}) == n + 7
    assert call_length(model, (ids,), {}) == n + 50                     # the model's max_length
    assert call_length(model, (ids,), {"generation_config": GenerationConfig(max_new_tokens=3)}) == n + 3
    assert call_length(model, (ids,), {"max_length": n - 1}) == n
    assert call_length(model, (), {"inputs_embeds": torch.randn(2, n, 8), "max_new_tokens": 2}) == n + 2
    assert call_length(model, (), {}) is None


def test_a_growing_compiled_conversation_then_another_prompt_length_match_eager(caplog):
    """One rank: turn 1 sized 15 slots, turns 2 and 3 grown (30, 60) by ``reserve``; then a new
    conversation with a shorter prompt (Dynamo makes the prefill length dynamic: the decode rule must
    still rewrite). Tokens and logits equal the eager model with HF's DynamicCache, every attention over
    the cache is rewritten, and the compiled graphs stay bounded (no graph per turn or per growth)."""
    import torch._dynamo
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from ringcompile import backend
    from ringcompile.serving.growth import reserve
    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=64, intermediate_size=64)).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (1, n), generator=g) for n in (11, 7)]
    chunks = [torch.randint(3, 64, (1, n), generator=g) for n in (5, 9)]
    new = 4
    name = "cache" if "cache" in inspect.signature(model.generate).parameters else "past_key_values"

    def run(make_cache, grow):
        out = []
        for p, prompt in enumerate(prompts):
            seq, cache = prompt, make_cache(prompt.shape[1] + new)
            for chunk in ([None, *chunks] if p == 0 else [None]):
                if chunk is not None:
                    seq = torch.cat([seq, chunk], 1)
                if grow:
                    reserve(cache, seq.shape[1] + new)
                with torch.no_grad():
                    res = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq),
                                         max_new_tokens=new, do_sample=False, pad_token_id=0, **{name: cache},
                                         output_logits=True, return_dict_in_generate=True)
                out.append((res.sequences, torch.stack(res.logits, 1)))
                seq = res.sequences
        return out

    want = run(lambda n: DynamicCache(), False)
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    before = len(backend.HISTORY)
    with caplog.at_level(logging.WARNING, logger="ringcompile"):
        got = run(lambda n: sharded_cache(2, 0, 1, max_cache_len=n, compiled=True), True)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for (seq, logits), (want_seq, want_logits) in zip(got, want, strict=True):
        assert torch.equal(seq, want_seq)
        assert float((logits - want_logits).abs().max()) < 1e-4
    decisions = [d for e in backend.HISTORY[before:] for d in e.decisions if d.stage == "decode"]
    assert decisions and all(d.outcome in ("decode_attention", "chunk_cache_attention") for d in decisions), [
        (d.outcome, d.reason) for d in decisions]
    assert len(backend.HISTORY) - before <= 6, len(backend.HISTORY) - before


def test_an_update_outside_a_compiled_graph_at_two_ranks_warns_once(monkeypatch, caplog):
    """Dynamo's eager fallback (recompile limit, graph break) would otherwise attend the gathered cache
    silently."""
    from ringcompile.serving import compiled_cache

    monkeypatch.setattr(compiled_cache, "_WARNED_EAGER", [])
    with caplog.at_level(logging.WARNING, logger="ringcompile"):
        layer, k, v = _layer_filled(1, 2, 12, 5, 7, monkeypatch)
        layer.update(k[:, :, 5:6], v[:, :, 5:6])
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "outside a compiled graph at world size 2" in warned[0], warned
