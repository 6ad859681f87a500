"""The rewritten graph itself: one op call per site, (B, H, S, D) operands, the old subgraph gone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ringcompile import backend
from ringcompile.ops import RingCall

aten = torch.ops.aten
RING = torch.ops.ringcompile.ring_attention.default


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, *args, dynamic=False):
    out = torch.compile(fn, backend="ring", options={"inner": "eager"}, dynamic=dynamic)(*args)
    return out, backend.HISTORY[-1].graph


def _calls(gm):
    return [RingCall.from_node(n) for n in gm.graph.nodes if n.op == "call_function" and n.target is RING]


def test_old_subgraph_is_removed_and_operands_are_bhsd():
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)

    def fn(q, k, v):  # (B, S, H, D) inputs, GQA by repeat_interleave, einsum products
        k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    out, gm = _compile(fn, q, k, v)
    torch.testing.assert_close(out.double(), fn(q.double(), k.double(), v.double()), atol=1e-5, rtol=1e-5)
    (call,) = _calls(gm)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.softmax.int not in targets and aten.einsum.default not in targets
    assert aten.repeat_interleave.self_int not in targets  # K/V are never repeated
    qv, kv, vv = (a.meta["val"] for a in (call.q, call.k, call.v))
    assert tuple(qv.shape) == (2, 4, 10, 8)
    assert tuple(kv.shape) == (2, 2, 10, 8) and tuple(vv.shape) == (2, 2, 10, 8)
    assert call.seq_len == 10
    spec = call.spec
    assert spec.scale == pytest.approx(1 / math.sqrt(8)) and spec.mask is None and spec.dropout_p == 0


def test_dynamic_seq_len_is_a_symbolic_size_node():
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    _, gm = _compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v,
                     dynamic=True)
    (call,) = _calls(gm)
    seq_len = call.seq_len
    assert isinstance(seq_len, torch.fx.Node) and seq_len.target == aten.sym_size.int
    assert seq_len.args == (call.k, 2)
    assert call.spec.mask.kind == "causal"


def test_dropout_gets_a_seed_node_only_when_training():
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))

    def train(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    def evaluate(q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1), -1), 0.1, training=False) @ v

    _, gm = _compile(train, q, k, v)
    (call,) = _calls(gm)
    assert call.dropout_seed.target == aten.randint.low and call.spec.dropout_p == pytest.approx(0.1)
    _, gm = _compile(evaluate, q, k, v)
    (call,) = _calls(gm)
    assert call.dropout_seed is None and call.spec.dropout_p == 0


def test_output_dtype_and_3d_layout_restored():
    q, k, v = (torch.randn(6, 9, 4, dtype=torch.bfloat16) for _ in range(3))

    def fn(q, k, v):
        p = F.softmax(torch.bmm(q, k.transpose(1, 2)).float() * 0.5, dim=-1)
        return torch.bmm(p, v.float())  # float32 output from bfloat16 inputs

    out, gm = _compile(fn, q, k, v)
    assert out.dtype == torch.float32 and out.shape == (6, 9, 4)
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref = torch.softmax(q64 @ k64.transpose(1, 2) * 0.5, dim=-1) @ v64
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
    (call,) = _calls(gm)
    assert tuple(call.q.meta["val"].shape) == (6, 1, 9, 4)


def test_ring_output_keeps_the_memory_order_of_the_sdpa_it_replaces():
    """CPU SDPA can return (B, H, S, D) with (B, S, H, D) strides and models ``view`` it as such
    (afmoe); the rewrite gives the ring output the same order, so such views stay valid."""
    import torch.fx as fx

    from ringcompile.passes import rewrite

    gen = torch.Generator().manual_seed(5)
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.randn(2, 3, 5, 4, generator=gen)  # contiguous (B, H, S, D): the ring output
    graph.output(x)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    anchor = next(n for n in gm.graph.nodes if n.op == "output")
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    b = rewrite._Builder(gm, anchor)
    old = torch.empty(2, 5, 3, 4).transpose(1, 2)  # what SDPA returned: (B, H, S, D), S-major memory
    out = rewrite._match_memory_order(b, x, old)
    assert out is not x
    assert rewrite._memory_order(out.meta["val"]) == rewrite._memory_order(old) == [0, 2, 1, 3]
    value = torch.randn(2, 3, 5, 4, generator=gen)
    anchor.args = (out,)
    gm.recompile()
    result = gm(value)
    assert torch.equal(result, value) and result.stride() == old.stride()
    result.transpose(1, 2).view(2, 5, 12)  # the model's view now works
    assert rewrite._match_memory_order(b, x, torch.empty(2, 3, 5, 4)) is x  # same order: no copy


def _grads_of(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("through_view", [False, True])
def test_output_written_in_place_later_is_a_copy(through_view):
    """Nystromformer adds ``conv(v)`` into the attention output in place; the op saved that output for
    backward, so the rewrite hands the graph a copy and backward equals eager (no version error)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, x = (torch.randn(2, 3, 8, 4, generator=gen, dtype=torch.float64) for _ in range(4))

    def fn(q, k, v, x):
        o = (q @ k.transpose(-1, -2) / 2).softmax(-1) @ v
        if through_view:
            o.transpose(1, 2)[:, 1:] += x.transpose(1, 2)[:, 1:]  # a write into a view of the output
        else:
            o += x * 2
        return o.sin()

    compiled = torch.compile(fn, backend="ring", options={"inner": "eager"}, dynamic=False)
    out, grads = _grads_of(compiled, (q, k, v, x))
    ref, ref_grads = _grads_of(fn, (q, k, v, x))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
    gm = backend.HISTORY[-1].graph
    assert len(_calls(gm)) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.clone.default in targets  # the in-place write lands in the copy


def test_output_not_written_in_place_gets_no_copy():
    from ringcompile.passes.rewrite import mutated_in_place

    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    _, gm = _compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v).relu(), q, k, v)
    assert len(_calls(gm)) == 1
    ring = next(n for n in gm.graph.nodes if n.target is RING)
    assert not mutated_in_place(ring)
    assert aten.clone.default not in {n.target for n in gm.graph.nodes if n.op == "call_function"}
