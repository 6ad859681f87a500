"""The ``ring`` backend end to end: options, fallback, dynamic shapes, training, the entry point."""

from __future__ import annotations

import logging
import math
import operator
import subprocess
import sys
import textwrap

import pytest
import torch

from ringcompile import OptionError, backend

B, H, S, D = 2, 4, 20, 8


pytestmark = pytest.mark.usefixtures("fresh_dynamo_small_blocks")


def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def attention(q, k, v):
    """Hand-written GQA attention in (B, S, H, D) layout (HF repeat_kv, divide by sqrt(d))."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (torch.softmax(s, dim=-1) @ v).transpose(1, 2)


def test_unknown_option_is_an_error_listing_valid_names():
    fn = torch.compile(attention, backend="ring", options={"inner": "eager", "blocksize": 4})
    with pytest.raises(Exception) as info:
        fn(*(torch.randn(B, S, H, D) for _ in range(3)))
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or getattr(exc, "inner_exception", None)
    errors = [e for e in chain if isinstance(e, OptionError)]
    assert errors, chain
    assert "blocksize" in str(errors[0]) and "block_size" in str(errors[0])


def test_bad_option_value_is_an_error():
    with pytest.raises(OptionError, match="inner"):
        backend.ring_backend(torch.fx.symbolic_trace(lambda x: x + 1), [torch.randn(2)],
                             options={"inner": "tvm"})


def test_internal_error_falls_back_to_the_original_graph(monkeypatch, caplog):
    from ringcompile.passes import find_attention as fa

    def broken(gm):
        raise RuntimeError("synthetic failure in discovery")

    monkeypatch.setattr(fa, "find_attention", broken)
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, 2, D), torch.randn(B, S, 2, D)
    with caplog.at_level(logging.WARNING, logger="ringcompile"):
        out = torch.compile(attention, backend="ring", options={"inner": "eager"})(q, k, v)
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason and "synthetic failure" in entry.fallback_reason
    assert any("falling back" in r.getMessage() for r in caplog.records)
    want = attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_dynamic_shapes_four_lengths_one_compile():
    calls = []

    def counting(gm, example_inputs):
        calls.append(1)
        return backend.ring_backend(gm, example_inputs, options={"inner": "eager"})

    compiled = torch.compile(attention, backend=counting, dynamic=True)
    for seq in (9, 16, 23, 40):
        q, k, v = torch.randn(B, seq, H, D), torch.randn(B, seq, 2, D), torch.randn(B, seq, 2, D)
        out = compiled(q, k, v)
        torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double()),
                                   atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    assert backend.rewritten_op_count(backend.HISTORY[-1].graph) == 1


def test_dynamic_model_with_float_module_attributes_is_rewritten_not_fallen_back():
    """dynamic=True turns float module attributes (nn.Embedding.norm_type) into .item() inputs."""
    from ringcompile.models import build_model

    model = build_model("llama").eval()
    calls = []

    def counting(gm, example_inputs):
        calls.append(1)
        return backend.ring_backend(gm, example_inputs, options={"inner": "eager"})

    compiled = torch.compile(model, backend=counting, dynamic=True)
    for seq in (12, 20, 33):
        ids = torch.randint(0, 100, (2, seq))
        torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None
    assert backend.rewritten_op_count(entry.graph) == len(model.layers)


class _NormedAttention(torch.nn.Module):
    """LayerNorm's eps becomes a 0-d tensor input read with .item() under dynamic=True."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16, eps=1e-5)

    def forward(self, x):
        q = self.norm(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_dynamic_float_attributes_are_pinned_with_a_runtime_check():
    model = _NormedAttention().double()
    compiled = torch.compile(model, backend="ring", options={"inner": "eager"}, dynamic=True)
    for seq in (10, 17, 23):
        x = torch.randn(2, seq, 16, dtype=torch.float64)
        torch.testing.assert_close(compiled(x), model(x))
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None and backend.rewritten_op_count(entry.graph) == 1
    assert "_assert_async" in entry.graph.code  # the pinned eps is checked at run time
    model.norm.eps = 1e-2  # a changed value must never be computed with the pinned one
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_training_gradients_match_eager(inner):
    q, k, v = torch.randn(B, S, H, D), torch.randn(B, S, 2, D), torch.randn(B, S, 2, D)
    w = torch.randn(H * D, 5)

    def loss_fn(q, k, v, w):
        out = attention(q, k, v).reshape(B, S, H * D)
        return (out @ w).tanh().sum()

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    loss = torch.compile(loss_fn, backend="ring", options={"inner": inner})(*leaves)
    loss.backward()
    assert backend.rewritten_op_count(backend.HISTORY[-1].graph) == 1 or inner == "inductor"
    assert any(s.rewritten for s in backend.HISTORY[-1].sites)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v, w)]
    ref = loss_fn(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


def test_entry_point_works_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import torch
        def f(q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v
        q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
        out = torch.compile(f, backend="ring", options={"inner": "eager"})(q, k, v)
        assert torch.allclose(out, f(q, k, v), atol=1e-5)
        import sys
        print("rewritten" if "ringcompile.backend" in sys.modules else "not loaded")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rewritten" in result.stdout


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_training_with_dropout_backward_uses_the_forward_mask(inner):
    """out = dropout(P) @ v is linear in v, so loss = <out, w> must equal <v.grad, v> exactly when the
    backward replays the forward's dropout mask (a different mask would break the identity)."""
    q, k = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    v = torch.randn(B, H, S, D, requires_grad=True)
    w = torch.randn(B, H, S, D)

    def fn(q, k, v, w):
        p = torch.nn.functional.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1), 0.4, training=True)
        return ((p @ v) * w).sum()

    loss = torch.compile(fn, backend="ring", options={"inner": inner})(q, k, v, w)
    loss.backward()
    assert [(s.dropout_p, s.rewritten) for s in backend.HISTORY[-1].sites] == [(0.4, True)]
    no_dropout = (torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1) @ v * w).sum()
    assert abs(loss.item() - no_dropout.item()) > 1e-3  # dropout was applied
    torch.testing.assert_close((v.grad.double() * v.detach().double()).sum(), loss.double(),
                               atol=1e-3, rtol=1e-4)


def cache_gather(x: torch.Tensor) -> torch.Tensor:
    """Stands in for ``ringcompile::cache_gather``: the backend looks for that name in a graph."""
    return x * 2


torch.fx.wrap("cache_gather")


def _graph_reading_a_cache() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(lambda x: cache_gather(x) + 1)


def _half_rewrite_then_fail(gm: torch.fx.GraphModule):
    """A decode rule that changes the graph and then raises (a bug half-way through a rewrite)."""
    add = next(n for n in gm.graph.nodes if n.target is operator.add)
    add.target = operator.sub
    gm.recompile()
    raise RuntimeError("failed half-way")


def test_a_decode_rewrite_failing_half_way_leaves_the_graph_untouched(monkeypatch, caplog):
    from ringcompile.passes.rules import decode

    gm = _graph_reading_a_cache()
    before = gm.code
    monkeypatch.setattr(decode, "rewrite_cache_attention", _half_rewrite_then_fail)
    x = torch.randn(3, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="ringcompile"):
        out, decided = backend.rewrite_cache_attention(gm)
    assert out is gm and decided == []
    assert gm.code == before
    torch.testing.assert_close(out(x), x * 2 + 1, rtol=0, atol=0)
    assert "failed half-way" in caplog.text
