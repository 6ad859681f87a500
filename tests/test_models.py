"""The built-in models compile with backend="ring": attention found, logits, loss and grads match."""

from __future__ import annotations

import pytest
import torch

from ringcompile import backend
from ringcompile.models import ModelConfig, build_model, repeat_kv
from ringcompile.runtime import local


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(local, "DEFAULT_BLOCK", 8)
    yield
    torch._dynamo.reset()


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(repeat_kv(x, 2), x.repeat_interleave(2, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("name,mask,groups", [("llama", "causal", 2), ("gpt2", "causal", 1)])
def test_model_training_step_matches_eager(name, mask, groups):
    cfg = ModelConfig(layers=1, max_seq=64, kv_heads=2 if name == "llama" else 4)
    model = build_model(name, cfg, seed=1).double()
    reference = build_model(name, cfg, seed=1).double()
    ids = torch.randint(0, cfg.vocab, (2, 19))
    compiled = torch.compile(model, backend="ring", options={"inner": "eager"})
    logits, loss = compiled(ids, labels=ids)
    loss.backward()
    sites = backend.HISTORY[-1].sites
    assert [(s.mask_description, s.gqa_groups, s.rewritten) for s in sites] == [(mask, groups, True)]
    ref_logits, ref_loss = reference(ids, labels=ids)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(loss, ref_loss, atol=1e-9, rtol=1e-7)
    for (pname, p), (_, r) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-8, rtol=1e-6, msg=pname)
