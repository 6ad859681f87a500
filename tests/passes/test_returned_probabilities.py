"""Attention whose probabilities are also returned from the graph (LongT5's decoder layers: a graph break
makes each layer its own frame, which returns its attention weights to the caller).

The site is rewritten (p @ v by the ring) and the returned probabilities are still computed by the
original ops; with active dropout it declines (the returned ones would not match the ring's dropout).
World size 1 against float64 eager on fresh random inputs: output, probabilities and q/k/v gradients.
"""

from __future__ import annotations

import pytest
import torch

from ringcompile import backend
from ringcompile.passes.rules.softmax import RETURNED_NOTE

B, H, S, D = 2, 4, 16, 8


def returns_weights(q, k, v, bias):
    w = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5 + bias, dim=-1)
    w = torch.nn.functional.dropout(w, p=0.0, training=False)
    return w @ v, w


def returns_weights_dropout(q, k, v, bias):
    w = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5 + bias, dim=-1)
    w = torch.nn.functional.dropout(w, p=0.25, training=True)
    return w @ v, w


@pytest.fixture
def fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(1, H, S, S, generator=g, dtype=torch.float64)
    return q, k, v, bias


def test_returned_probabilities_rewritten_and_right(fresh):
    args = _inputs(1)
    out, w = torch.compile(returns_weights, backend="ring", options={"inner": "eager"})(*args)
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None, entry.fallback_reason
    assert [s.rewritten for s in entry.sites] == [True], (entry.sites, entry.rejected)
    assert backend.rewritten_op_count(entry.graph) == 1
    assert RETURNED_NOTE in entry.sites[0].notes
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    r_out, r_w = returns_weights(*ref_args)
    torch.testing.assert_close(out, r_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, r_w, atol=1e-12, rtol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    gw = torch.randn(w.shape, generator=torch.Generator().manual_seed(8), dtype=w.dtype)
    ((out * g).sum() + (w * gw).sum()).backward()
    ((r_out * g).sum() + (r_w * gw).sum()).backward()
    for a, r in zip(args[:3], ref_args[:3], strict=True):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-12, rtol=1e-12)


def test_returned_probabilities_with_dropout_decline(fresh):
    torch.compile(returns_weights_dropout, backend="ring", options={"inner": "eager"})(*_inputs(2))
    entry = backend.HISTORY[-1]
    assert not any(s.rewritten for s in entry.sites)
    reasons = [r.reason for r in entry.rejected] + [s.reason or "" for s in entry.sites]
    assert any("returned from the graph and dropout is active" in r for r in reasons), reasons
