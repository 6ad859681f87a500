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


def test_explain_shows_sdpa_over_the_sharded_cache_as_decode_attention():
    import ringcompile

    model, kw = _decode_step_inputs("sdpa")
    report = ringcompile.explain(model, **kw)
    decode = [d for d in report.decisions if d.stage == "decode"]
    assert len(decode) == model.config.num_hidden_layers, str(report)
    assert all(d.outcome == "decode_attention" for d in decode)
    assert not report.not_rewritten, str(report)


def test_explain_names_an_attention_over_the_cache_it_cannot_rewrite():
    import ringcompile

    model, kw = _decode_step_inputs("eager")
    report = ringcompile.explain(model, **kw)
    assert not [d for d in report.decisions if d.stage == "decode"]
    reasons = [n.reason for n in report.not_rewritten]
    assert len(reasons) == model.config.num_hidden_layers, str(report)
    assert all("sharded KV cache left on the gathered cache" in r and "decode-softmax" in r for r in reasons)
