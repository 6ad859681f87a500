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
