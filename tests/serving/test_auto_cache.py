"""``ringcompile.serving.prepare`` on one process: which caches it replaces and how it sizes them
(tokens over 2 ranks: tests/models/test_generate_compiled.py, case llama_prepared)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=64, intermediate_size=64)


def test_fresh_caches_are_sized_and_filled_or_foreign_ones_kept():
    from transformers import DynamicCache, StaticCache

    from ringcompile.errors import OptionError
    from ringcompile.serving.auto_cache import _fresh_cache_length

    n = int(torch.randint(3, 9, ()))
    ids = torch.randint(0, 64, (2, n))
    assert _fresh_cache_length(None, None, (), {"input_ids": ids, "max_new_tokens": 5}) == n + 5
    assert _fresh_cache_length(DynamicCache(), 40, (), {"input_ids": ids}) == 40
    assert _fresh_cache_length(StaticCache(config=_config(), max_cache_len=17), 40, (ids,), {}) == 17
    with pytest.raises(OptionError, match="max_new_tokens"):
        _fresh_cache_length(None, None, (ids,), {})
    used = DynamicCache()
    used.update(torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8), 0)
    assert _fresh_cache_length(used, 40, (ids,), {}) is None      # multi-turn: the caller's cache is kept

    class MyCache(DynamicCache):
        pass

    assert _fresh_cache_length(MyCache(), 40, (ids,), {}) is None


def test_prepare_on_one_rank_keeps_generate_and_rejects_an_empty_cache_length():
    from transformers import LlamaForCausalLM

    from ringcompile.errors import OptionError
    from ringcompile.serving import prepare

    model = LlamaForCausalLM(_config())
    generate = model.generate
    assert prepare(model) is model and model.generate == generate
    with pytest.raises(OptionError, match="at least one slot"):
        prepare(model, max_cache_len=0)


def test_prepare_warns_for_a_plain_cache_that_already_holds_tokens(monkeypatch, caplog):
    """Multi-turn with HF's own cache: prepare cannot shard it after the fact; it is kept (correct) and
    a WARNING says so. Our compiled sharded cache is recognised for reuse. (World size 2 stood in.)"""
    import logging
    import types

    from transformers import DynamicCache, LlamaForCausalLM

    from ringcompile.serving import auto_cache
    from ringcompile.serving.compiled_cache import CompiledShardedLayer

    two_ranks = types.SimpleNamespace(rank=0, world_size=2)
    monkeypatch.setattr(auto_cache, "resolve_group", lambda group: two_ranks)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    ids = torch.randint(0, 64, (1, int(torch.randint(3, 7, ()))))
    used = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=used)
    auto_cache.prepare(model)
    more = torch.cat([ids, torch.randint(0, 64, (1, 2))], 1)
    with caplog.at_level(logging.WARNING, logger="ringcompile"), torch.no_grad():
        out = model.generate(input_ids=more, past_key_values=used, max_new_tokens=1, do_sample=False)
    assert out.shape[1] == more.shape[1] + 1
    assert any("already holds tokens" in r.getMessage() for r in caplog.records), caplog.records
    assert not auto_cache._is_compiled_sharded(used)
    sharded = DynamicCache()
    sharded.layers = [CompiledShardedLayer(0, 2, 8) for _ in range(2)]
    assert auto_cache._is_compiled_sharded(sharded)
