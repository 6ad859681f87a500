"""Softmax-invariant row shifts (``passes/rules/shift.py``) and Inkling2's cast sink cat (``sinks.py``).

Both were unsharded in the zoo: MiMo-V2-Flash's ``w - w.max(-1, keepdim=True).values`` on its layers
without sinks ("the score matrix is also used outside the softmax"), Inkling2's ``cat([w, sinks],
-1).float()`` ("no q.k^T matmul reaches the softmax"). World size 1 and two gloo ranks, every spelling
against float64 eager on the unsharded input (logits, loss, every parameter's gradient); the shifts the
softmax is not invariant to, or whose values are read elsewhere, are declined with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))
from row_shift_cases import compare, shifted_attention  # noqa: E402

import ringcompile  # noqa: E402
from ringcompile import backend  # noqa: E402

B, H, S, D = 2, 3, 10, 4
EXACT = 1e-12
# the model rounds the softmax input to float32 on purpose (``.float()``) where the op computes in float64
ROUNDED = 1e-6


@pytest.fixture
def fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_right(res: dict, tol: float, pattern: str) -> None:
    assert res["sites"] == [(pattern, True)] and not res["reasons"], res
    assert res["out"] < tol and res["loss"] < tol, res
    assert all(e < tol for e in res["grads"].values()), res


@pytest.mark.parametrize("spelling", ["max_values", "amax", "detach", "unsqueeze", "positive_dim"])
def test_row_shift_without_sinks_is_dropped_world_1(fresh, spelling):
    _assert_right(compare(spelling), EXACT, "matmul")


def test_cast_between_the_shift_and_the_softmax_world_1(fresh):
    """A float32 model whose shifted scores are cast to float64 for the softmax (the op computes in the
    inputs' dtype: float32, so the tolerance is float32's)."""
    _assert_right(compare("max_values", cast=torch.float64, dtype=torch.float32), 1e-5, "matmul")


@pytest.mark.parametrize("cast, tol", [(torch.float64, EXACT), (None, ROUNDED)])
def test_inkling_cast_sink_cat_world_1(fresh, cast, tol):
    """Relative-position bias + per-query sinks, ``cat(...).float()`` (None) or a cast to the model dtype."""
    res = compare("inkling", cast=cast)
    _assert_right(res, tol, "matmul+sink")
    assert {"sink_proj.weight", "bias.proj", "bias.linear.weight"} <= set(res["grads"])


def test_inkling_gradients_reach_the_bias_and_the_sinks(fresh):
    """The reference's bias-bank, bias-state and sink gradients are not trivially zero (so the relative
    errors above test something)."""
    from row_shift_cases import ShiftLM, V

    torch.manual_seed(0)
    model = ShiftLM("inkling", torch.float64).double()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    logits, loss = model(ids, ids)
    grads = torch.autograd.grad(logits.sum() * 1e-2 + loss,
                                [model.bias.proj, model.bias.linear.weight, model.sink_proj.weight])
    assert all(g.abs().max() > 1e-6 for g in grads)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    return q, k, v, torch.full((S, S), -1e9).triu(1)[None, None]


def _run_world_1(fn, seed: int):
    args = _inputs(seed)
    out = torch.compile(fn, backend="ring", options={"inner": "eager"})(*args)
    ref = fn(*(a.double() for a in args))
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,),
                    strict=True):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=2e-5)
    return backend.HISTORY[-1], ringcompile.explain(fn, *args)


def _reasons(report) -> list[str]:
    return [n.reason for n in report.not_rewritten]


def test_max_over_the_wrong_dim_declines_and_stays_right(fresh):
    """A max over the query dim varies along each row: dropping it would change the softmax."""
    entry, report = _run_world_1(lambda q, k, v, m: shifted_attention(q, k, v, m, "wrong_dim"), 1)
    assert not any(s.rewritten for s in entry.sites)
    assert any("not over the softmax dim 3" in r and r.endswith("[rule softmax-row-shift]")
               for r in _reasons(report)), report


def test_a_router_with_a_wrong_dim_shift_is_not_attention(fresh):
    """A MoE router shifted by its max over the tokens: not attention, so reported as such (no warning),
    never declined by the shift rule."""
    gate = torch.randn(D, 5, generator=torch.Generator().manual_seed(11))

    def fn(x):
        logits = x.reshape(-1, D) @ gate
        return torch.softmax(logits - logits.amax(0, keepdim=True), -1)

    x = torch.randn(B, S, D)
    report = ringcompile.explain(fn, x)
    assert report.not_rewritten == [], report
    torch.testing.assert_close(torch.compile(fn, backend="ring", options={"inner": "eager"})(x), fn(x))


def test_max_over_more_dims_than_the_softmax_declines(fresh):
    """A max over (q, kv) is constant along each row, but eager's exp may underflow whole rows far below
    it (0 / 0): not dropped."""
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5 + m
        return torch.softmax(w - w.amax((-2, -1), keepdim=True), -1) @ v

    entry, report = _run_world_1(fn, 8)
    assert not any(s.rewritten for s in entry.sites)
    assert any("not by the row max over the softmax dim 3 alone" in r and "[rule softmax-row-shift]" in r
               for r in _reasons(report)), report


def test_row_max_without_keepdim_broadcast_along_rows_declines(fresh):
    """``w - w.amax(-1)`` (no keepdim) broadcasts the (B, H, S) maxima along the key dim when B == 1 and
    H == S: a different number per column, not a per-row constant."""
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5 + m
        return torch.softmax(w - w.amax(-1), -1) @ v

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, S, S, D, generator=g) for _ in range(3))
    m = torch.full((S, S), -1e9).triu(1)[None, None]
    out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v, m)
    torch.testing.assert_close(out.double(), fn(q.double(), k.double(), v.double(), m.double()),
                               atol=2e-5, rtol=2e-5)
    reasons = _reasons(ringcompile.explain(fn, q, k, v, m))
    assert any("not as one column per row" in r for r in reasons), reasons


def test_shifted_scores_read_elsewhere_decline(fresh):
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5 + m
        shifted = w - w.max(-1, keepdim=True).values
        return torch.softmax(shifted, -1) @ v, shifted.clamp_min(-5).mean()

    entry, report = _run_world_1(fn, 3)
    assert not any(s.rewritten for s in entry.sites)
    assert any("shifted scores (sub) are also used outside the softmax" in r
               for r in _reasons(report)), report


def test_row_max_read_elsewhere_declines(fresh):
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5 + m
        top = w.amax(-1, keepdim=True)
        return torch.softmax(w - top, -1) @ v, top

    entry, report = _run_world_1(fn, 4)
    assert not any(s.rewritten for s in entry.sites)
    assert any("row max of the scores (amax) is also used outside the shift" in r
               for r in _reasons(report)), report


def test_max_of_another_tensor_is_a_score_term(fresh):
    """The row max of the mask, not of the shifted scores: left to the chain, which lifts it as an
    ordinary per-row score term (the site is right whether or not the softmax is invariant to it)."""
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5
        bias = m + q.sum(-1, keepdim=True)
        return torch.softmax(w + m - bias.amax(-2, keepdim=True), -1) @ v

    entry, report = _run_world_1(fn, 5)
    assert not any("softmax-row-shift" in r for r in _reasons(report)), report


def test_shift_with_a_logsumexp_of_the_unshifted_scores(fresh):
    """GraniteSWA's lse read plus a shift: the logsumexp of the unshifted scores is the op's lse."""
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5 + m
        lse = torch.logsumexp(w, -1, keepdim=True)
        return (torch.softmax(w - w.amax(-1, keepdim=True), -1) @ v) * torch.sigmoid(lse - 0.5)

    entry, _ = _run_world_1(fn, 6)
    assert [s.pattern for s in entry.sites if s.rewritten] == ["matmul+lse"], (entry.sites, entry.rejected)


def test_logsumexp_of_the_shifted_scores_is_not_the_ops_lse(fresh):
    """logsumexp(w - max) = lse - max: not the op's lse, so the shift is declined (the values are read)."""
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5 + m
        shifted = w - w.amax(-1, keepdim=True)
        return (torch.softmax(shifted, -1) @ v) * torch.sigmoid(torch.logsumexp(shifted, -1, keepdim=True))

    entry, report = _run_world_1(fn, 7)
    assert not any(s.rewritten for s in entry.sites)
    assert any("also used outside the softmax" in r for r in _reasons(report)), report


def _sink_attention(q, k, v, m, col):
    w = q @ k.transpose(-1, -2) * 0.5 + m
    p = torch.softmax(torch.cat([w, col], -1).to(torch.float64), -1)[..., :-1].to(q.dtype)
    return p @ v


def test_sink_column_many_ops_deep_is_a_sink(fresh):
    """Inkling2's sink of a late layer is computed from hidden states hundreds of nodes deep: the check
    that the column does not read the scores gave up after 32 levels (and read it as "reads them")."""
    def fn(q, k, v, m):
        col = q.sum(-1, keepdim=True)
        for _ in range(40):
            col = (col * 0.9).tanh()
        return _sink_attention(q, k, v, m, col)

    entry, _ = _run_world_1(fn, 9)
    assert [s.pattern for s in entry.sites if s.rewritten] == ["matmul+sink"], (entry.sites, entry.rejected)


def test_sink_column_that_reads_the_scores_is_not_a_sink(fresh):
    """A column computed from the scores themselves is no sink logit: not rewritten, and right."""
    def fn(q, k, v, m):
        w = q @ k.transpose(-1, -2) * 0.5 + m
        p = torch.softmax(torch.cat([w, w.mean(-1, keepdim=True)], -1).to(torch.float64), -1)
        return p[..., :-1].to(q.dtype) @ v

    entry, report = _run_world_1(fn, 10)
    assert not any(s.rewritten for s in entry.sites) and report.not_rewritten, report


# ---------------------------------------------------------------------------- two gloo ranks

RANK_CASES = {"case_shift_max_values": (EXACT, "matmul"), "case_shift_detach": (EXACT, "matmul"),
              "case_inkling_float64": (EXACT, "matmul+sink"), "case_inkling_float": (ROUNDED, "matmul+sink")}


@pytest.fixture(scope="module")
def rank_results():
    from harness import run_cases

    return run_cases("row_shift_cases", [*RANK_CASES, "case_wrong_dim"], world=2, timeout=400)


@pytest.mark.multirank
@pytest.mark.parametrize("case", sorted(RANK_CASES))
def test_two_ranks_equal_float64_eager(rank_results, case):
    tol, pattern = RANK_CASES[case]
    for rank, res in enumerate(rank_results[case]):
        assert res is not None and "error" not in res, (rank, res)
        assert res["sharded"], res
        _assert_right(res, tol, pattern)


@pytest.mark.multirank
def test_two_ranks_wrong_dim_declines_and_stays_right(rank_results):
    for rank, res in enumerate(rank_results["case_wrong_dim"]):
        assert res is not None and "error" not in res, (rank, res)
        assert res["sites"] == [] and any("softmax-row-shift" in r for r in res["reasons"]), res
        assert res["out"] < EXACT and all(e < EXACT for e in res["grads"].values()), res
