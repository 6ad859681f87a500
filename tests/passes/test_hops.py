"""Higher-order ops under ``backend="ring"`` in one process: custom autograd.Functions keep their backward,
scans and vmaps are refused with a reason, checkpoint / wrap / nested regions are descended into."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ringcompile import backend

B, H, S, D = 2, 2, 16, 8


pytestmark = pytest.mark.usefixtures("fresh_dynamo_small_blocks")


class ScaledStraightThrough(torch.autograd.Function):
    """Forward clamps; backward passes a scaled gradient straight through (not the clamp's derivative)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(-0.5, 0.5)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 0.5 + x * 0.0


def _attn(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _custom_fn_model(q, k, v, w):
    q = ScaledStraightThrough.apply(q @ w)
    return (_attn(q, k, v) * torch.cos(v)).sum()


def _grads(fn, inputs, compile_with=None, dtype=None):
    leaves = [(t.to(dtype) if dtype else t.clone()).requires_grad_(True) for t in inputs]
    call = torch.compile(fn, backend=compile_with[0], options=compile_with[1]) if compile_with else fn
    loss = call(*leaves)
    loss.backward()
    return loss, [t.grad for t in leaves]


def _inputs(*shapes):
    return [torch.randn(*s) * 2 for s in shapes]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_custom_autograd_function_keeps_its_backward(inner):
    inputs = _inputs((B, H, S, D), (B, H, S, D), (B, H, S, D), (D, D))
    loss, grads = _grads(_custom_fn_model, inputs, ("ring", {"inner": inner}))
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None and [s.rewritten for s in entry.sites] == [True]
    ref_loss, ref_grads = _grads(_custom_fn_model, inputs, dtype=torch.float64)
    # the plain derivative of clamp would zero most of q's gradient: the custom one must be used
    true_q = _grads(lambda q, k, v, w: (_attn((q @ w).clamp(-0.5, 0.5), k, v) * torch.cos(v)).sum(),
                    inputs, dtype=torch.float64)[1][0]
    assert (true_q - ref_grads[0]).abs().max() > 1e-2
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_attention_inside_a_custom_function_is_reported():
    class Wrapped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return _attn(q, k, v)

        @staticmethod
        def backward(ctx, g):
            return g, g, g

    q, k, v = (t.requires_grad_(True) for t in _inputs((B, H, S, D), (B, H, S, D), (B, H, S, D)))
    out = torch.compile(lambda q, k, v: Wrapped.apply(q, k, v) + 1, backend="ring",
                        options={"inner": "eager"})(q, k, v)
    torch.testing.assert_close(out, _attn(q, k, v) + 1)
    entry = backend.HISTORY[-1]
    assert entry.sites == [] and entry.fallback_reason is None
    assert [r.pattern for r in entry.rejected] == ["autograd_function_apply"]
    assert "keeps its own forward and backward" in entry.rejected[0].reason


def _associative_scan_model(x, k, v):
    from torch._higher_order_ops.associative_scan import associative_scan

    return _attn(associative_scan(lambda a, b: a + b, x, dim=2, combine_mode="generic"), k, v)


def _scan_model(x, k, v):
    from torch._higher_order_ops.scan import scan

    def step(carry, xs):
        carry = carry + xs
        return carry, carry.clone()

    return _attn(scan(step, torch.zeros_like(x[:, :, 0]), x, dim=2)[1], k, v)


@pytest.mark.parametrize(("model", "words"), [(_scan_model, ("higher_order.scan", "do not understand")),
                                              (_associative_scan_model, ("vmap",))])
def test_scans_are_refused_before_retracing_and_run(model, words):
    x, k, v = _inputs((B, H, S, D), (B, H, S, D), (B, H, S, D))
    out = torch.compile(model, backend="ring", options={"inner": "eager"})(x, k, v)
    torch.testing.assert_close(out, _attn(torch.cumsum(x, 2), k, v), atol=1e-5, rtol=1e-5)
    reason = backend.HISTORY[-1].fallback_reason
    assert reason is not None and all(w in reason for w in words), reason


def test_create_block_mask_inside_the_graph_is_rewritten_and_runs():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q, kv):
        return q >= kv

    def fn(q, k, v):
        mask = create_block_mask(causal, 1, 1, q.shape[2], k.shape[2], device="cpu")
        return flex_attention(q, k, v, block_mask=mask)

    q, k, v = _inputs((1, H, 128, D), (1, H, 128, D), (1, H, 128, D))
    with torch.no_grad():
        out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v)
    torch.testing.assert_close(out, _attn(q, k, v), atol=1e-5, rtol=1e-5)
    entry = backend.HISTORY[-1]  # the vmap of create_block_mask is dropped: the flex call is rewritten
    assert entry.fallback_reason is None and [s.rewritten for s in entry.sites] == [True]


def _ckpt_model(use_reentrant, context_fn=None):
    kwargs = {} if context_fn is None else {"context_fn": context_fn}

    def block(x, w):
        q, k, v = (x @ w).tanh(), x.sin(), x.cos()
        return _attn(q, k, v) * 2

    def fn(x, w):
        y = torch.utils.checkpoint.checkpoint(block, x, w, use_reentrant=use_reentrant, **kwargs)
        return (y * y).sum()

    return fn


def _save_mm_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    mm = {torch.ops.aten.mm.default, torch.ops.aten.matmul.default}
    return CheckpointPolicy.MUST_SAVE if op in mm else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("variant", ["non_reentrant", "reentrant", "selective"])
def test_attention_inside_checkpoint_is_rewritten(variant):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_mm_policy)
    fn = _ckpt_model(variant == "reentrant", context_fn if variant == "selective" else None)
    inputs = _inputs((B, H, S, D), (D, D))
    loss, grads = _grads(fn, inputs, ("ring", {"inner": "inductor"}))
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None and [s.rewritten for s in entry.sites] == [True]
    ring = [n for n in entry.graph.graph.nodes if n.target is torch.ops.ringcompile.ring_attention.default]
    assert ring and all(str(n.meta["recompute"]).endswith("MUST_SAVE") for n in ring)
    ref_loss, ref_grads = _grads(fn, inputs, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_nested_compile_region_is_inlined():
    region = torch.compiler.nested_compile_region(lambda q, k, v: _attn(q, k, v) * 2)

    def fn(q, k, v):
        return (region(q, k, v) + region(q + 1, k, v)).sum()

    inputs = _inputs((B, H, S, D), (B, H, S, D), (B, H, S, D))
    loss, grads = _grads(fn, inputs, ("ring", {"inner": "eager"}))
    entry = backend.HISTORY[-1]
    assert [s.rewritten for s in entry.sites] == [True, True]
    ref_loss, ref_grads = _grads(fn, inputs, dtype=torch.float64)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_attention_inside_cond_is_reported():
    def fn(q, k, v):
        return torch.cond(q.sum() > 0, _attn, lambda q, k, v: q + k + v, (q, k, v))

    q, k, v = _inputs((B, H, S, D), (B, H, S, D), (B, H, S, D))
    out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None
    assert [r.pattern for r in entry.rejected] == ["cond"] and "control flow" in entry.rejected[0].reason
