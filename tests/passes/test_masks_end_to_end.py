"""Each mask/score form through ``torch.compile(backend="ring")`` vs float64 eager, plus explain().

The compiled graph must hold the ring_attention op (the result came from the rewrite with the
extracted mods, not from a fallback), and explain() must describe the mask and score mod.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ringcompile
from ringcompile import backend
from ringcompile.runtime import local

B, H, S, D = 2, 2, 20, 8


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(local, "DEFAULT_BLOCK", 8)  # several blocks, so offsets matter
    yield
    torch._dynamo.reset()


def _qkv():
    return tuple(torch.randn(B, H, S, D) for _ in range(3))


def _padding():
    am = (torch.rand(B, S) > 0.3).long()
    am[:, 0] = 1
    return am


def run(fn, *args, mask: str, score: str = "none", atol: float = 2e-5):
    compiled = torch.compile(fn, backend="ring", options={"inner": "eager"})
    out = compiled(*args)
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None, entry.fallback_reason
    assert backend.rewritten_op_count(entry.graph) == 1, (entry.sites, entry.rejected)
    ref = fn(*[a.double() if a.is_floating_point() else a for a in args])
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    report = ringcompile.explain(fn, *args)
    (site,) = report.sites
    assert site.rewritten and (site.mask, site.score_mod) == (mask, score), report


def test_causal_triu_masked_fill():
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        m = torch.triu(torch.ones(q.size(2), k.size(2), dtype=torch.bool), 1)
        return s.masked_fill(m, float("-inf")).softmax(-1) @ v

    run(fn, *_qkv(), mask="causal")


class GPT2Attention(torch.nn.Module):
    """nanoGPT-style: a tril buffer sliced to T, where(mask, s, finfo.min)."""

    def __init__(self, block: int = 32):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = torch.where(self.bias[:, :, :T, :T].bool(), att, torch.finfo(att.dtype).min)
        return F.softmax(att, dim=-1) @ v


def test_causal_tril_buffer_module():
    m = GPT2Attention()
    compiled = torch.compile(m, backend="ring", options={"inner": "eager"})
    q, k, v = _qkv()
    out = compiled(q, k, v)
    assert backend.rewritten_op_count(backend.HISTORY[-1].graph) == 1
    ref = GPT2Attention().double()(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    (site,) = ringcompile.explain(m, q, k, v).sites
    assert site.rewritten and site.mask == "causal"


def test_causal_arange_additive_and_padding():
    def fn(q, k, v, am):
        qi = torch.arange(q.size(2))
        keep = (qi[None, :] <= qi[:, None])[None, None] & am[:, None, None, :].bool()
        add = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        return (torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5 + add).softmax(-1) @ v

    run(fn, *_qkv(), _padding(), mask="causal & padding")


def test_sliding_window():
    def fn(q, k, v):
        qi = torch.arange(q.size(2))[:, None]
        ki = torch.arange(k.size(2))[None, :]
        keep = (qi - ki < 5) & (ki <= qi)
        return (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")).softmax(-1) @ v

    run(fn, *_qkv(), mask="sliding_window(5)")


def test_padding_hf_additive():
    def fn(q, k, v, am):
        ext = (1.0 - am[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        return (q @ k.transpose(-1, -2) / math.sqrt(D) + ext).softmax(-1) @ v

    run(fn, *_qkv(), _padding(), mask="padding")


def test_dense_bias_and_softcap():
    def fn(q, k, v, bias):
        s = q @ k.transpose(-2, -1) * 0.3 + bias
        s = torch.tanh(s / 4.0) * 4.0
        m = torch.triu(torch.ones(q.size(2), q.size(2), dtype=torch.bool), 1)
        return s.masked_fill(m, float("-inf")).softmax(-1) @ v

    run(fn, *_qkv(), torch.randn(B, H, S, S), mask="causal", score="dense bias then softcap(4)")


def test_alibi():
    slopes = torch.tensor([0.5, 0.125])

    def fn(q, k, v, slopes):
        pos = torch.arange(k.size(2))
        bias = slopes[:, None, None] * (pos[None, :] - pos[:, None]).to(q.dtype)[None]
        causal = torch.triu(torch.ones(q.size(2), k.size(2), dtype=torch.bool), 1)
        s = (q @ k.transpose(-2, -1) / math.sqrt(D) + bias).masked_fill(causal, float("-inf"))
        return s.softmax(-1) @ v

    run(fn, *_qkv(), slopes, mask="causal", score="alibi")


def test_sdpa_bool_and_additive_masks():
    def bool_fn(q, k, v, am):
        qi = torch.arange(q.size(2))
        keep = (qi[None, :] <= qi[:, None])[None, None] & am[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    run(bool_fn, *_qkv(), _padding(), mask="causal & padding")
    torch._dynamo.reset()

    def add_fn(q, k, v):
        n = q.size(2)
        m = torch.full((n, n), float("-inf"), dtype=q.dtype).triu(1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    run(add_fn, *_qkv(), mask="causal")


class PaddedGPT2Attention(GPT2Attention):
    def forward(self, q, k, v, am):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = att.masked_fill(am[:, None, None, :] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def test_dynamic_lengths_do_not_recompile_masks():
    """Buffer-sliced causal + padding masks lift without specialising the sequence length."""
    m = PaddedGPT2Attention(block=64)
    compiled = torch.compile(m, backend="ring", dynamic=True, options={"inner": "eager"})
    before = len(backend.HISTORY)
    for n in (12, 17, 23):
        q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
        am = (torch.rand(B, n) > 0.3).long()
        am[:, 0] = 1
        out = compiled(q, k, v, am)
        ref = PaddedGPT2Attention(block=64).double()(q.double(), k.double(), v.double(), am)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    assert len(backend.HISTORY) - before == 1
    assert backend.rewritten_op_count(backend.HISTORY[-1].graph) == 1
    (site,) = backend.HISTORY[-1].sites
    assert site.mask_description == "causal & padding"
