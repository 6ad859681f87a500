"""Hypothesis: random compositions of mask spellings and score mods, extracted and checked in float64."""

from __future__ import annotations

import math
import operator

import torch
from _mods_harness import check_chain
from hypothesis import given, settings
from hypothesis import strategies as st

from ringcompile.mods import index_grid
from ringcompile.passes.classify_mods import classify_keep, to_sympy
from ringcompile.passes.index_lift import ModGraphBuilder
from ringcompile.passes.mods import _as_bool

B, H, D = 2, 2, 4
f64 = torch.float64
NEG_INF = float("-inf")

CAUSAL = ["none", "triu_fill", "arange_additive", "tril_buffer", "full_min_triu"]
PADDING = ["none", "bool_fill", "hf_additive"]
SCALE = ["none", "mul", "div_sqrt"]


def build(causal: str, window: int | None, padding: str, alibi: bool, bias: bool, cap: float | None,
          scale: str):
    """An attention function using the drawn spellings (score mods first, then masks)."""
    def fn(q, k, v, am, slopes, dense, buf):
        n = q.size(2)
        qi = torch.arange(n)[:, None]
        ki = torch.arange(k.size(2))[None, :]
        s = q @ k.transpose(-2, -1)
        if scale == "mul":
            s = s * 0.7
        elif scale == "div_sqrt":
            s = s / math.sqrt(q.size(-1))
        if alibi:
            s = s + slopes[:, None, None] * (ki - qi).to(q.dtype)[None]
        if bias:
            s = s + dense
        if cap is not None:
            s = torch.tanh(s / cap) * cap
        fmin = torch.finfo(q.dtype).min
        if causal == "triu_fill":
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), NEG_INF)
        elif causal == "arange_additive":
            s = s + torch.zeros(n, n, dtype=q.dtype).masked_fill(~(ki <= qi), fmin)
        elif causal == "tril_buffer":
            s = torch.where(buf[:, :, :n, :n].bool(), s, fmin)
        elif causal == "full_min_triu":
            s = s + torch.full((n, n), fmin, dtype=q.dtype).triu(1)
        if window is not None:
            s = s.masked_fill(qi - ki >= window, NEG_INF)
        if padding == "bool_fill":
            s = s.masked_fill(~am.bool()[:, None, None, :], NEG_INF)
        elif padding == "hf_additive":
            s = s + (1.0 - am[:, None, None, :].to(q.dtype)) * fmin
        return s.softmax(-1) @ v

    return fn


@settings(max_examples=15)
@given(causal=st.sampled_from(CAUSAL), window=st.sampled_from([None, 1, 2, 4]),
       padding=st.sampled_from(PADDING),
       alibi=st.booleans(), bias=st.booleans(), cap=st.sampled_from([None, 2.0, 5.0]),
       scale=st.sampled_from(SCALE), S=st.integers(3, 11), mode=st.sampled_from(["fake", "symbolic"]),
       seed=st.integers(0, 2**16))
def test_random_compositions(causal, window, padding, alibi, bias, cap, scale, S, mode, seed):
    torch.manual_seed(seed)
    if causal == "none":
        window = None
    q, k, v = (torch.randn(B, H, S, D, dtype=f64) for _ in range(3))
    am = (torch.rand(B, S) > 0.3).long()
    am[:, 0] = 1
    slopes = torch.rand(H, dtype=f64)
    dense = torch.randn(B, H, S, S, dtype=f64)
    buf = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    fn = build(causal, window, padding, alibi, bias, cap, scale)

    index = None
    if causal != "none":
        index = f"sliding_window({window})" if window is not None else "causal"
    mask_parts = [p for p in (index, "padding" if padding != "none" else None) if p]
    score_parts = [p for p, on in (("alibi", alibi), ("dense bias", bias),
                                   (f"softcap({cap:g})" if cap else "", cap is not None)) if on]
    ex = check_chain(fn, (q, k, v, am, slopes, dense, buf), mask=" & ".join(mask_parts) or "none",
                     score=" then ".join(score_parts) or "none", mode=mode, buffers={6: buf})
    if causal != "none" and window is None and padding == "none":
        assert ex.mask.kind == "causal"
    expected_scale = {"none": None, "mul": 0.7, "div_sqrt": 0.5}[scale]
    if cap is not None and not (alibi or bias):
        expected_scale = expected_scale or 1.0  # the softcap's division is folded into the scale
    if expected_scale is None:
        assert ex.scale is None
    else:
        assert math.isclose(ex.scale, expected_scale, rel_tol=1e-12)


# ---------------------------------------------------------------------------- classification soundness

_RELS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
         "!=": operator.ne}
_literal = st.tuples(st.sampled_from([1, 2, -1, -3]), st.integers(-3, 3), st.sampled_from(sorted(_RELS)))


@settings(max_examples=40)
@given(clauses=st.lists(st.lists(_literal, min_size=1, max_size=2), min_size=1, max_size=3))
def test_index_mask_classification_is_exact(clauses):
    """Random CNFs of relations on d = kv - q: 'causal'/'sliding_window' iff numerically so."""
    B = ModGraphBuilder(with_score=False)
    q, kv = B.role("q"), B.role("kv")
    keep = True
    for clause in clauses:
        c = False
        for alpha, gamma, rel in clause:
            e = B.add(B.mul(B.sub(kv, q), alpha), gamma)
            c = B.or_(c, B.call(_RELS[rel], e, 0))
        keep = B.and_(keep, c)
    gm = B.finish(keep)
    cls = classify_keep(_as_bool(to_sympy(gm)))
    grid = index_grid(1, 1, 0, 60, 0, 60)
    got = torch.as_tensor(gm(*grid)).expand(1, 1, 60, 60)
    d = grid[3] - grid[2]
    is_causal = torch.equal(got, (d <= 0).expand_as(got))
    assert (cls.index_only == "causal") == is_causal, (clauses, cls)
    windows = [w for w in range(1, 8) if torch.equal(got, ((d <= 0) & (d > -w)).expand_as(got))]
    assert (cls.index_only == "sliding_window" and cls.window in windows) == bool(windows), (clauses, cls)
