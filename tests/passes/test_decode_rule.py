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
    import ringcompile
    from ringcompile.passes.rules.decode import PLAIN_CACHE_REASON

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


def _spelled(kind: str):
    """An attention over ``cache_gather`` (world 1) written one way: (fn, rewritten?, reason part)."""
    import torch.nn.functional as F

    def fn(q, keys, values, slots, positions, mask, bias):
        kk, vv = torch.ops.ringcompile.cache_gather(keys, values, slots, positions, 12, 7, "single", 10.0)
        if kind == "tile-order":     # query head h reads kv head h % 2 (aten's unsqueeze, at dim 1)
            kk = torch.ops.aten.unsqueeze.default(kk, 1).expand(-1, 2, -1, -1, -1).reshape(2, 4, 12, 8)
            vv = torch.ops.aten.unsqueeze.default(vv, 1).expand(-1, 2, -1, -1, -1).reshape(2, 4, 12, 8)
            s = torch.matmul(q, kk.transpose(2, 3)) * 0.3 + mask
            return torch.softmax(s, -1) @ vv
        kk = kk[:, :, None].expand(-1, -1, 2, -1, -1).reshape(2, 4, 12, 8)      # repeat_kv
        vv = vv[:, :, None].expand(-1, -1, 2, -1, -1).reshape(2, 4, 12, 8)
        if kind == "llama":
            s = torch.matmul(q, kk.transpose(2, 3)) * 0.3 + mask
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(F.dropout(p, p=0.0, training=False), vv)
        if kind == "div-mask-first":
            return (mask + q @ kk.transpose(-2, -1) / 8 ** 0.5).softmax(-1) @ vv
        if kind == "softcap":
            s = torch.tanh(torch.matmul(q, kk.transpose(2, 3)) / 5.0) * 5.0 + mask
            return torch.softmax(s, -1) @ vv
        s = torch.matmul(q, kk.transpose(2, 3)) * 0.3 + mask + bias           # two additive terms
        return torch.softmax(s, -1) @ vv
    return fn


@pytest.mark.parametrize("kind,rewritten,why", [
    ("llama", True, ""), ("div-mask-first", True, ""),
    ("softcap", False, "softcap"), ("two-terms", False, "more than one additive term"),
    ("tile-order", False, "head order")])
def test_eager_chain_spellings_over_the_gathered_cache(kind, rewritten, why):
    """Plain chains become decode_attention and equal float64 over the unsharded cache (additive mask with
    left padding); chains that are not plain stay on the gathered cache with their reason (still right)."""
    import math

    import torch._dynamo

    from ringcompile.passes.rules.decode import rewrite_cache_attention
    from ringcompile.runtime.cache_append import cache_append, shard_capacity

    g = torch.Generator().manual_seed(hash(kind) % 1000)
    T, M = 9, 12                                          # 7 prefill + 2 appended slots of 12
    full_k, full_v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    q, bias = torch.randn(2, 4, 1, 8, generator=g), 0.1 * torch.randn(2, 1, 1, M, generator=g)
    cap = shard_capacity(1, 7, M)[0]
    keys, values = torch.zeros(2, 2, cap, 8), torch.zeros(2, 2, cap, 8)
    slots = torch.full((cap,), -1, dtype=torch.long)
    cache_append(keys, values, slots, full_k[:, :, :7], full_v[:, :, :7], torch.arange(7), 0, 1, 7)
    for t in (7, 8):
        cache_append(keys, values, slots, full_k[:, :, t:t + 1], full_v[:, :, t:t + 1], torch.tensor([t]), 0,
                     1, 7)
    kept = torch.arange(M).view(1, -1) >= torch.tensor([[0], [3]])        # row 1 left-padded by 3
    kept = kept & (torch.arange(M) < T)
    mask = torch.zeros(2, 1, 1, M).masked_fill(~kept.view(2, 1, 1, M), torch.finfo(torch.float32).min)

    def heads(x):      # the kv head each query head reads, in the spelling's order
        return x.double().repeat(1, 2, 1, 1) if kind == "tile-order" else x.double().repeat_interleave(2, 1)

    scores = q.double() @ heads(full_k).transpose(-1, -2)
    if kind == "softcap":
        scores = torch.tanh(scores / 5.0) * 5.0
    else:
        scores = scores * (0.3 if kind in ("llama", "two-terms", "tile-order") else 1 / math.sqrt(8))
    scores = scores + mask[..., :T].double() + (bias[..., :T].double() if kind == "two-terms" else 0)
    want = torch.softmax(scores, -1) @ heads(full_v)

    done = []

    def backend(gm, example_inputs):
        done.extend(rewrite_cache_attention(gm))
        assert any("decode_attention" in str(n.target) for n in gm.graph.nodes) == rewritten
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(_spelled(kind), backend=backend)(q, keys, values, slots, torch.tensor([T - 1]), mask,
                                                        bias)
    torch._dynamo.reset()
    assert [d.rewritten for d in done] == [rewritten], done
    assert why in done[0].reason, done
    assert (got.double() - want).abs().max().item() < 1e-5
