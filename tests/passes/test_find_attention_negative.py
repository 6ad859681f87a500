"""Attention-like graphs that must NOT be rewritten: left alone, with a reason, and still correct."""

from __future__ import annotations

import pytest
import torch

import ringcompile
from ringcompile import backend

B, H, S, D = 2, 3, 12, 8


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_left_alone(fn, *args, reason_contains: str):
    compiled = torch.compile(fn, backend="ring", options={"inner": "eager"})
    out = compiled(*args)
    entry = backend.HISTORY[-1]
    assert not any(s.rewritten for s in entry.sites)
    assert backend.rewritten_op_count(entry.graph) == 0
    ref = fn(*[a.double() for a in args])
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o.double(), r, atol=1e-5, rtol=1e-5)
    report = ringcompile.explain(fn, *args)
    assert report.sites == [] or not any(s.rewritten for s in report.sites), report
    reasons = [n.reason for n in report.not_rewritten]
    assert any(reason_contains in r for r in reasons), reasons
    assert reason_contains in str(report)


def test_softmax_over_query_dim():
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))

    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-2) @ v

    _check_left_alone(fn, q, k, v, reason_contains="not the key dim")


def test_score_matrix_used_elsewhere():
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))

    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.3
        return torch.softmax(s, -1) @ v, s.mean()

    _check_left_alone(fn, q, k, v, reason_contains="also used outside the softmax")


def test_probabilities_read_inside_the_graph():
    # (probabilities only returned from the graph are a site: tests/passes/test_returned_probabilities.py)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))

    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1)
        return p @ v, p.amax(-1)

    _check_left_alone(fn, q, k, v, reason_contains="also used outside the matmul with v")


def test_softmax_not_followed_by_matmul():
    q, k = torch.randn(B, H, S, D), torch.randn(B, H, S, D)

    def fn(q, k):
        return torch.softmax(q @ k.transpose(-2, -1), -1).sum(-1)

    _check_left_alone(fn, q, k, reason_contains="not a matmul with v")


def test_matmul_with_weight_matrix_is_not_attention():
    x, w, v = torch.randn(B, S, D), torch.randn(D, S), torch.randn(B, S, D)

    def fn(x, w, v):
        return torch.softmax(x @ w, -1) @ v

    _check_left_alone(fn, x, w, v, reason_contains="not batched like q and k")


def test_cross_attention_lengths_differ():
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, H, S + 4, D), torch.randn(B, H, S + 4, D)

    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v

    _check_left_alone(fn, q, k, v, reason_contains="lengths differ")



def test_score_flattened_before_the_softmax():
    """Scores reshaped to (B*H*S, S) for the softmax: not a head split, so left alone."""
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))

    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)).reshape(B * H * S, S)
        return torch.softmax(s, dim=-1).reshape(B, H, S, S) @ v

    _check_left_alone(fn, q, k, v, reason_contains="reshaped between")
