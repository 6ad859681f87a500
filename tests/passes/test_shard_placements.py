"""Placement rules without ranks: where a view moves the sequence factor, and which inputs carry it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ringcompile.errors import UnsupportedPatternError
from ringcompile.passes.placements import Shard, view_dim, view_groups
from ringcompile.passes.seq_dims import find_seq_dims
from ringcompile.spec import AttentionSpec, register_spec


def seq_index(shape, dim, inner, seq):
    """A tensor whose value at every element is the sequence position it belongs to."""
    idx = torch.arange(shape[dim]).div(inner, rounding_mode="floor") % seq
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return idx.view(view).expand(shape).contiguous()


@st.composite
def reshapes(draw):
    seq = draw(st.integers(2, 6))
    outer = draw(st.integers(1, 3))
    inner = draw(st.integers(1, 3))
    pre = draw(st.lists(st.integers(1, 3), max_size=2))
    post = draw(st.lists(st.integers(1, 3), max_size=2))
    a = [*pre, outer * seq * inner, *post]
    dim = len(pre)
    # a target shape: factor the numel into a random sequence of sizes
    n = math.prod(a)
    factors = []
    rest = n
    while rest > 1:
        divs = [d for d in range(2, rest + 1) if rest % d == 0]
        f = draw(st.sampled_from(divs))
        factors.append(f)
        rest //= f
    if draw(st.booleans()):
        factors.insert(draw(st.integers(0, len(factors))), 1)
    return a, dim, inner, seq, factors or [1]


@given(reshapes())
def test_view_dim_tracks_the_sequence_factor(case):
    a, dim, inner, seq, b = case
    x = seq_index(a, dim, inner, seq)
    y = x.reshape(b)
    out = view_dim(a, b, dim, inner, seq)
    if out is None:
        # the reshape splits the sequence factor: no single dim of b may carry it whole
        for o in range(len(b)):
            for inn in range(1, b[o] + 1):
                if b[o] % (seq * inn) == 0 and torch.equal(y, seq_index(b, o, inn, seq)):
                    raise AssertionError(f"view_dim missed dim {o} inner {inn}")
        return
    assert torch.equal(y, seq_index(b, out.dim, out.inner, seq)), (a, b, out)
    # and the mapping is symmetric: mapping back lands where we started
    back = view_dim(b, a, out.dim, out.inner, seq)
    assert back == Shard(dim, inner)


def test_view_groups_pairs_equal_products():
    assert view_groups([2, 3, 4], [6, 4]) == [([0, 1], [0]), ([2], [1])]
    assert view_groups([2, 12], [2, 3, 4]) == [([0], [0]), ([1], [1, 2])]


def _trace(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*args)


def test_seq_dims_found_from_attention_back_to_the_inputs():
    key = register_spec(AttentionSpec(name="t"))
    w = torch.randn(16, 8)

    def fn(ids, w, pos_table):
        B, S = ids.shape
        x = F.embedding(ids, w) + pos_table[:S]
        q = x.view(B, S, 2, 4).transpose(1, 2)
        return torch.ops.ringcompile.ring_attention(q, q, q, [], [], S, key)[0]

    gm = _trace(fn, torch.randint(0, 16, (2, 6)), w, torch.randn(10, 8))
    seeds = {n.name: s for n, s in find_seq_dims(gm, 6).items()}
    assert seeds == {"ids_1": Shard(1)}  # the (10, 8) table is sliced, not sharded: it is not a sequence


def test_seq_dims_conflict_raises():
    key = register_spec(AttentionSpec(name="t"))

    def fn(x):  # the same input used with the sequence on dim 1 and on dim 2
        q = x.unsqueeze(0)
        k = x.transpose(1, 2).unsqueeze(0)
        return torch.ops.ringcompile.ring_attention(q, k, k, [], [], 6, key)[0]

    gm = _trace(fn, torch.randn(2, 6, 6))
    try:
        find_seq_dims(gm, 6)
    except UnsupportedPatternError as e:
        assert "two dims" in str(e)
    else:
        raise AssertionError("expected UnsupportedPatternError")


def test_seq_dims_override_by_name():
    key = register_spec(AttentionSpec(name="t"))

    def fn(x, other):
        q = x.view(1, 1, 6, 4)
        return torch.ops.ringcompile.ring_attention(q, q, q, [], [], 6, key)[0] + other.sum()

    gm = _trace(fn, torch.randn(6, 4), torch.randn(6, 3))
    seeds = {n.name: s for n, s in find_seq_dims(gm, 6, {"other": 0}).items()}
    assert seeds == {"x_1": Shard(0), "other_1": Shard(0)}
