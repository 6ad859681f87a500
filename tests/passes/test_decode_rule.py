"""The decode rule on one process: explain() of a forward over ``sharded_cache(..., compiled=True)``
shows each SDPA over the cache rewritten to decode_attention, and an attention it cannot rewrite
(HF's eager softmax chain) named with the reason. (Tokens against one process:
tests/models/test_generate_compiled.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "models"))


def _decode_step_inputs(attention: str):
    """A tiny Llama, its sharded cache filled by an eager prefill, and the inputs of one decode step."""
    from generate_cases import build

    from ringcompile.serving.hf import sharded_cache

    model, ids, mask = build("llama")
    model.set_attn_implementation(attention)
    cache = sharded_cache(model.config.num_hidden_layers, 0, 1, max_cache_len=16, compiled=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return model, dict(input_ids=logits[:, -1:].argmax(-1), attention_mask=mask, cache=cache, use_cache=True,
                       position_ids=mask.cumsum(1)[:, -1:] - 1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_explain_shows_attention_over_the_sharded_cache_as_decode_attention(attention):
    """SDPA (bool mask) and HF's eager chain softmax(q @ k^T * scale + float mask) @ v both rewritten."""
    import ringcompile

    model, kw = _decode_step_inputs(attention)
    report = ringcompile.explain(model, **kw)
    decode = [d for d in report.decisions if d.stage == "decode"]
    assert len(decode) == model.config.num_hidden_layers, str(report)
    assert all(d.outcome == "decode_attention" for d in decode)
    assert not report.not_rewritten, str(report)


def test_explain_names_an_eager_chain_over_the_cache_it_cannot_rewrite():
    """Returned attention weights (output_attentions=True) keep the chain on the gathered cache, named."""
    import ringcompile

    model, kw = _decode_step_inputs("eager")
    report = ringcompile.explain(model, **kw, output_attentions=True)
    assert not [d for d in report.decisions if d.stage == "decode"]
    reasons = [n.reason for n in report.not_rewritten]
    assert len(reasons) == model.config.num_hidden_layers, str(report)
    assert all("sharded KV cache left on the gathered cache" in r and "decode-softmax" in r for r in reasons)
    import torch._dynamo
    from ringcompile.passes.rules.decode import rewrite_cache_attention

    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model.forward, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(
            **kw, output_attentions=True)
    torch._dynamo.reset()
    done = rewrite_cache_attention(graphs[0])
    assert len(done) == model.config.num_hidden_layers and not any(d.rewritten for d in done), done
    assert all("returned attention weights" in d.reason for d in done), done


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_compiled_decode_step_on_one_process_matches_eager(attention):
    """The rewritten decode graph (world 1) gives the eager model's logits over the same cache contents."""
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    model, kw = _decode_step_inputs(attention)
    kw_eager = dict(kw, cache=copy.deepcopy(kw["cache"]))
    with torch.no_grad():
        want = model(**kw_eager).logits.double()
        forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
        got = forward(**kw).logits.double()
    torch._dynamo.reset()
    assert (got - want).abs().max().item() < 1e-4


def _plain_decode_step_inputs(static: bool):
    """A tiny Llama, HF's own (unsharded) cache filled by an eager prefill, one decode step's inputs."""
    from generate_cases import build
    from transformers import DynamicCache, StaticCache

    model, ids, mask = build("llama")
    cache = StaticCache(config=model.config, max_cache_len=16) if static else DynamicCache()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
    n = ids.shape[1]
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return model, dict(input_ids=logits[:, -1:].argmax(-1), attention_mask=mask, cache=cache,
                       use_cache=True, position_ids=mask.cumsum(1)[:, -1:] - 1,
                       cache_position=torch.tensor([n]))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic_cache", "static_cache"])
def test_explain_names_attention_over_an_unsharded_hf_cache(static):
    from ringcompile.passes.rules.decode import PLAIN_CACHE_REASON

    import ringcompile

    model, kw = _plain_decode_step_inputs(static)
    report = ringcompile.explain(model, **kw)
    reasons = [n.reason for n in report.not_rewritten]
    assert len(reasons) == model.config.num_hidden_layers, str(report)
    assert all(PLAIN_CACHE_REASON in r and "compiled=True" in r for r in reasons), reasons


def test_the_eager_sharded_cache_under_compile_raises_naming_the_compiled_cache():
    import torch._dynamo
    from generate_cases import build

    from ringcompile.errors import OptionError
    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    model, ids, mask = build("llama")
    forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    for max_cache_len in (None, 16):
        cache = sharded_cache(model.config.num_hidden_layers, 0, 1, max_cache_len=max_cache_len)
        with pytest.raises(OptionError, match="compiled=True"), torch.no_grad():
            forward(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    torch._dynamo.reset()
