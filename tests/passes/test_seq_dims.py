"""seq_dims on its own: the walk from the ring op back to the graph inputs finds each input's sequence dim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from ringcompile.errors import UnsupportedPatternError
from ringcompile.options import Options
from ringcompile.passes import PipelineState, run_pipeline, stages_through
from ringcompile.passes.placements import Shard
from ringcompile.passes.seq_dims import attention_ops, find_seq_dims, global_seq_len, input_name

_FIND_AND_REWRITE = stages_through("rewrite")[1:]


def _rewritten(fn, *args):
    gm = make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*args)
    state = run_pipeline(PipelineState(gm, Options.from_mapping({"inner": "eager"})), _FIND_AND_REWRITE)
    assert [s.rewritten for s in state.sites] == [True]
    return state.graph


def _projected(layout: str, heads: int, dim: int):
    """Self-attention over x (B, S, E) or its (S, B, E) transpose, heads split by view + transpose."""

    def fn(x, w):
        if layout == "sbe":
            x = x.transpose(0, 1)
        b, s, _ = x.shape
        q, k, v = (x @ w).view(b, s, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)

    return fn


@settings(max_examples=10)
@given(layout=st.sampled_from(["bse", "sbe"]), seq=st.integers(2, 12), heads=st.integers(1, 3),
       dim=st.sampled_from([2, 4]))
def test_the_sequence_dim_of_a_projected_input(layout, seq, heads, dim):
    x = torch.randn((2, seq, heads * dim) if layout == "bse" else (seq, 2, heads * dim))
    w = torch.randn(heads * dim, 3 * heads * dim)
    gm = _rewritten(_projected(layout, heads, dim), x, w)
    assert global_seq_len(attention_ops(gm)) == seq
    seeds = {input_name(p): pl for p, pl in find_seq_dims(gm, seq).items()}
    x_name, w_name = (p.name for p in gm.graph.find_nodes(op="placeholder"))
    assert seeds == {x_name: Shard(1 if layout == "bse" else 0)}  # the weight stays replicated


def test_bhsd_inputs_shard_at_dim_2_and_overrides_win():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    gm = _rewritten(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    names = [p.name for p in gm.graph.find_nodes(op="placeholder")]
    found = {p.name: pl for p, pl in find_seq_dims(gm, 6).items()}
    assert found == {n: Shard(2) for n in names}
    with pytest.raises(UnsupportedPatternError):
        find_seq_dims(gm, 6, overrides={names[0]: 7})  # out of range for a 4-D input


def test_two_attentions_over_different_lengths_disagree():
    a, b = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    sdpa = F.scaled_dot_product_attention
    gm = make_fx(lambda a, b: (sdpa(a, a, a), sdpa(b, b, b)), pre_dispatch=True, tracing_mode="fake")(a, b)
    state = run_pipeline(PipelineState(gm, Options.from_mapping({"inner": "eager"})), _FIND_AND_REWRITE)
    assert len(attention_ops(state.graph)) == 2
    with pytest.raises(UnsupportedPatternError, match="disagree"):
        global_seq_len(attention_ops(state.graph))
