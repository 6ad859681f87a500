"""Random compositions of attention spellings: every one is found, described and computed right.

Each example draws a layout, matmul spelling, scale spelling, softmax spelling, mask kind, GQA
ratio, dtype and sequence length (often not a multiple of the block size) and builds the function.

* ``test_rewrite_property``: at scale (``REWRITE_EXAMPLES``, 500 per CI run; set the environment
  variable ``RING_REWRITE_EXAMPLES`` to 10000 for a long run). The function is traced with ``make_fx``
  into the pre-dispatch aten graph the normalize stage produces, the find_attention and rewrite stages
  run on it, and the rewritten graph is run and compared with the function run eagerly in float64;
  the site's description (pattern, mask kind, scale, GQA groups, layout) must be the drawn one.
* ``test_random_attention_spellings``: a few examples end to end, through Dynamo and backend="ring".
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import ringcompile
from ringcompile import backend
from ringcompile.options import Options
from ringcompile.passes import PipelineState, run_pipeline, stages_through
from ringcompile.runtime import local

BLOCK = 8
REWRITE_EXAMPLES = int(os.environ.get("RING_REWRITE_EXAMPLES", "500"))


def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def build(layout: str, matmul: str, scale: str, softmax: str, mask: str, groups: int, repeat: str):
    """An attention function in the drawn spelling; inputs are (q, k, v, key_mask)."""

    def fn(q, k, v, key_mask):
        if layout == "bshd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.permute(0, 2, 1, 3)
        if groups > 1:
            if repeat == "repeat_kv":
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
            else:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        d = q.shape[-1]
        if scale == "prescale":
            q = q * (1.0 / math.sqrt(d))
        if matmul == "einsum":
            s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        elif matmul == "matmul":
            s = torch.matmul(q, k.transpose(-2, -1))
        elif matmul == "bmm":
            n, sq = q.shape[0] * q.shape[1], q.shape[2]
            s = torch.bmm(q.reshape(n, sq, d), k.reshape(n, sq, d).transpose(1, 2))
        else:
            s = q @ k.transpose(-2, -1)
        if scale == "mul":
            s = s * (1.0 / math.sqrt(d))
        elif scale == "div":
            s = s / math.sqrt(d)
        if matmul != "bmm":  # masks index (b, h, q, kv); the 3-D form stays unmasked
            n_q = s.shape[-2]
            if mask == "causal":
                upper = torch.triu(torch.ones(n_q, n_q, dtype=torch.bool, device=s.device), 1)
                s = s.masked_fill(upper, float("-inf"))
            elif mask == "padding":
                s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        if softmax == "dtype":
            p = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        elif softmax == "float_type_as":
            p = s.float().softmax(-1).type_as(q)
        else:
            p = s.softmax(-1)
        if matmul == "bmm":
            n, sq = q.shape[0] * q.shape[1], q.shape[2]
            out = torch.bmm(p, v.reshape(n, sq, v.shape[-1])).reshape(v.shape[0], v.shape[1], sq, -1)
        elif matmul == "einsum":
            out = torch.einsum("bhqk,bhkd->bhqd", p, v)
        else:
            out = p @ v
        return out.transpose(1, 2) if layout == "bshd" else out

    return fn


# what each example draws: one attention spelling, its dtype and its sequence length
SPELLINGS = dict(
    layout=st.sampled_from(["bhsd", "bshd"]),
    matmul=st.sampled_from(["operator", "matmul", "einsum", "bmm"]),
    scale=st.sampled_from(["mul", "div", "prescale", "none"]),
    softmax=st.sampled_from(["plain", "dtype", "float_type_as"]),
    mask=st.sampled_from(["none", "causal", "padding"]),
    groups=st.sampled_from([1, 2, 4]),
    repeat=st.sampled_from(["repeat_kv", "repeat_interleave"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seq=st.integers(min_value=3, max_value=3 * BLOCK + 5),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=8, deadline=None)
@given(**SPELLINGS)
def test_random_attention_spellings(layout, matmul, scale, softmax, mask, groups, repeat, dtype, seq, seed):
    if matmul == "bmm":
        groups = 1  # the 3-D form carries no head dim to group over
        mask = "none"
    fn = build(layout, matmul, scale, softmax, mask, groups, repeat)
    gen = torch.Generator().manual_seed(seed)
    heads_kv, batch, dim = 4 // groups, 2, 8

    def make(heads):
        shape = (batch, seq, heads, dim) if layout == "bshd" else (batch, heads, seq, dim)
        return torch.randn(shape, generator=gen).to(dtype)

    q, k, v = make(4), make(heads_kv), make(heads_kv)
    key_mask = torch.rand(batch, seq, generator=gen) > 0.4
    key_mask[:, 0] = True  # every query keeps at least one key
    if mask == "causal":
        key_mask[:] = True
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "DEFAULT_BLOCK", BLOCK)
        torch._dynamo.reset()
        out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v, key_mask)
        entry = backend.HISTORY[-1]
        assert entry.fallback_reason is None, entry.fallback_reason
        assert backend.rewritten_op_count(entry.graph) == 1, (entry.sites, entry.rejected)
        ref = fn(q.double(), k.double(), v.double(), key_mask)
        tol = 2e-5 if dtype == torch.float32 else 4e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        report = ringcompile.explain(fn, q, k, v, key_mask)
        torch._dynamo.reset()
    assert len(report.sites) == 1 and report.sites[0].rewritten, report
    site = report.sites[0]
    assert site.mask == mask, report
    assert site.score_mod == "none", report
    assert site.gqa_groups == groups, report
    assert site.layout == ("3d" if matmul == "bmm" else layout), report
    expected_scale = 1.0 if scale in ("none", "prescale") else 1.0 / math.sqrt(dim)
    assert site.scale == pytest.approx(expected_scale), report


# ---------------------------------------------------------------------------- the property at scale

_AFTER_NORMALIZE = stages_through("rewrite")[1:]  # find_attention, rewrite: what runs on the aten graph
_OPTIONS = Options.from_mapping({"inner": "eager"})


def _inputs(layout, groups, dtype, seq, batch, heads_kv, dim, seed):
    gen = torch.Generator().manual_seed(seed)

    def make(heads):
        shape = (batch, seq, heads, dim) if layout == "bshd" else (batch, heads, seq, dim)
        return torch.randn(shape, generator=gen).to(dtype)

    key_mask = torch.rand(batch, seq, generator=gen) > 0.4
    key_mask[:, 0] = True  # every query keeps at least one key
    return make(heads_kv * groups), make(heads_kv), make(heads_kv), key_mask


@pytest.fixture(scope="module")
def small_blocks():
    """8-token blocks for the whole module: tiny sequences still cut into several blocks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "DEFAULT_BLOCK", BLOCK)
        yield


@pytest.mark.timeout(max(600, 2 * REWRITE_EXAMPLES))  # the suite's 600 s guard, scaled for a long run
@settings(max_examples=REWRITE_EXAMPLES, deadline=None)
@given(**SPELLINGS, batch=st.integers(1, 2), heads_kv=st.integers(1, 2), dim=st.sampled_from([4, 8, 16]))
def test_rewrite_property(small_blocks, layout, matmul, scale, softmax, mask, groups, repeat, dtype, seq,
                          batch, heads_kv, dim, seed):
    if matmul == "bmm":
        groups, mask = 1, "none"  # the 3-D form carries no head dim to group over, nor a mask
    fn = build(layout, matmul, scale, softmax, mask, groups, repeat)
    inputs = _inputs(layout, groups, dtype, seq, batch, heads_kv, dim, seed)
    if mask == "causal":
        inputs[3][:] = True
    gm = make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*inputs)
    state = run_pipeline(PipelineState(gm, _OPTIONS), _AFTER_NORMALIZE)

    assert not state.rejected, state.rejected
    (site,) = state.sites
    assert site.rewritten, site.reason
    assert backend.rewritten_op_count(state.graph) == 1, state.graph.graph
    assert not any("softmax" in str(n.target) for n in state.graph.graph.nodes), state.graph.graph
    assert site.pattern == ("matmul" if matmul == "operator" else matmul)
    assert site.mask_description == mask
    assert site.score_description == "none"
    assert site.gqa_groups == groups
    assert site.layout == ("3d" if matmul == "bmm" else layout)
    expected_scale = 1.0 if scale in ("none", "prescale") else 1.0 / math.sqrt(dim)
    assert site.scale == pytest.approx(expected_scale)

    out = state.graph(*inputs)
    q, k, v, key_mask = inputs
    ref = fn(q.double(), k.double(), v.double(), key_mask)
    tol = 2e-5 if dtype == torch.float32 else 4e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
