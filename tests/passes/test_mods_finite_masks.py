"""Finite negative constants (BERT's -10000) are masks only where they provably underflow exp()."""

from __future__ import annotations

import math

import torch
from _mods_harness import chain_ends, node_values, trace

from ringcompile.kernels.reference import attention_reference
from ringcompile.passes.classify_mods import masks_exactly
from ringcompile.passes.mods import extract_score_chain

f64 = torch.float64
B, H, S, D = 2, 2, 9, 4


def _inputs():
    am = (torch.rand(B, S) > 0.3).long()
    am[:, 0] = 1
    return (*(torch.randn(B, H, S, D, dtype=f64) for _ in range(3)), am)


def _extract_and_compare(fn, args):
    gm = trace(fn, *args)
    ex = extract_score_chain(*chain_ends(gm), dims=("b", "h", "q", "kv"))
    vals = node_values(gm, args, [*ex.mask_extras, *ex.score_extras])
    ours = attention_reference(*args[:3], scale=ex.scale or 1.0, mask=ex.mask, score=ex.score,
                               mask_extras=[vals[n] for n in ex.mask_extras],
                               score_extras=[vals[n] for n in ex.score_extras])
    torch.testing.assert_close(ours, fn(*args), atol=1e-9, rtol=1e-7)
    return ex


def test_bert_minus_10000_unbounded_scores_stay_an_exact_padding_bias():
    def fn(q, k, v, am):
        ext = (1.0 - am[:, None, None, :].to(q.dtype)) * -10000.0
        return (q @ k.transpose(-1, -2) / math.sqrt(D) + ext).softmax(-1) @ v

    ex = _extract_and_compare(fn, _inputs())
    assert ex.mask is None and ex.score.describe() == "padding bias"
    assert any("does not provably underflow" in n for n in ex.notes), ex.notes


def test_bert_minus_10000_after_softcap_is_a_padding_mask():
    def fn(q, k, v, am):
        s = torch.tanh(q @ k.transpose(-1, -2) / 30.0) * 30.0
        return (s + (1.0 - am[:, None, None, :].to(q.dtype)) * -10000.0).softmax(-1) @ v

    ex = _extract_and_compare(fn, _inputs())
    assert ex.mask.describe() == "padding" and ex.score.describe() == "softcap(30)"


def test_masks_exactly_condition():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        fmin = torch.finfo(dt).min
        assert masks_exactly(fmin, additive=True, dtype=dt, bound=None)
        assert masks_exactly(float("-inf"), additive=True, dtype=dt, bound=None)
        assert not masks_exactly(-10000.0, additive=True, dtype=dt, bound=None)
    # |s| <= 30: -10000 + 60 underflows; -100 + 60 does not (float32 limit ~ -103.97)
    assert masks_exactly(-10000.0, additive=True, dtype=torch.float32, bound=30.0)
    assert not masks_exactly(-100.0, additive=True, dtype=torch.float32, bound=30.0)
    assert masks_exactly(-140.0, additive=False, dtype=torch.float32, bound=30.0)
    assert float(torch.exp(torch.tensor(-140.0 + 30.0))) == 0.0


def test_claims_carry_a_dead_row_form_unless_the_mask_keeps_the_diagonal():
    """Query padding (rows can lose every key) gets the exact bias form; a causal finfo.min mask
    (every row keeps (q, q)) needs none and keeps its block skipping."""
    fmin = torch.finfo(f64).min

    def padded(q, k, v, am):
        m = (am[:, None, :, None] * am[:, None, None, :]).bool()
        return (q @ k.transpose(-1, -2)).masked_fill(~m, fmin).softmax(-1) @ v

    def causal(q, k, v, am):
        c = torch.full((S, S), fmin, dtype=q.dtype).triu(1)
        return (q @ k.transpose(-1, -2) + c).softmax(-1) @ v

    args = _inputs()
    ex = extract_score_chain(*chain_ends(trace(padded, *args)), dims=("b", "h", "q", "kv"))
    assert ex.mask is not None and ex.dead_rows is not None and ex.dead_rows.shift == fmin
    assert ex.dead_rows.mask is None and ex.dead_rows.score_idx == (0,)
    ex = extract_score_chain(*chain_ends(trace(causal, *args)), dims=("b", "h", "q", "kv"))
    assert ex.mask.describe() == "causal" and ex.dead_rows is None
