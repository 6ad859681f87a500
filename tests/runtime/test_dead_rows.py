"""Rows with every key masked by a claimed finite constant: outputs and grads on ALL rows match eager.

The mask form (the constant claimed as a mask) gives such rows lse = -inf; the op recomputes them
with the spec's ``DeadRowForm``. Reference: float64 eager softmax over the scores with the constant
filled in or added, on the unsharded input; fresh random inputs each case.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringcompile.mods import Mod
from ringcompile.runtime.simulated import simulated_ring_attention
from ringcompile.spec import DeadRowForm

MIN32 = torch.finfo(torch.float32).min
B, H, S, D = 2, 2, 8, 4


def _query_padding_keep(b, h, q, kv, pm):  # DeBERTa: mask[b, q] * mask[b, kv]
    return (pm[b, q] != 0) & (pm[b, kv] != 0)


def _left_padding_causal_keep(b, h, q, kv, pm):  # HF causal LM with left padding
    return (kv <= q) & (pm[b, kv] != 0)


def _key_bias(s, b, h, q, kv, kb):  # a learned per-(head, key) bias: a differentiable score extra
    return s + kb[h, kv]


def _padding(kind: str) -> torch.Tensor:
    pm = torch.ones(B, S, dtype=torch.long)
    if kind == "query":
        pm[0, 5:] = 0
        pm[1, 2:] = 0
    else:  # left padding
        pm[1, :3] = 0
    return pm


def _forms(keep_fn, c: float, additive: bool, with_bias: bool, bias_fn=_key_bias):
    """(mask Mod, score Mod or None, DeadRowForm) for the op; extras are [pm] + ([kb] if with_bias)."""
    mask = Mod(keep_fn, True, "custom", n_extras=1)
    score = Mod(bias_fn, False, "custom", n_extras=1) if with_bias else None

    def bias_form(s, b, h, q, kv, *extras):
        pm, rest = extras[0], extras[1:]
        if with_bias:
            s = bias_fn(s, b, h, q, kv, *rest)
        keep = keep_fn(b, h, q, kv, pm)  # masked pairs: eager's score minus the shift c
        masked = (s + c) - c if additive else torch.zeros_like(s)
        return torch.where(keep, s, masked)

    form = DeadRowForm(mask=None, score=Mod(bias_form, False, "custom", n_extras=2 if with_bias else 1),
                       score_idx=(0, 1) if with_bias else (0,), shift=c)
    return mask, score, form


def _eager(q, k, v, keep, c, additive, kb):
    s = (q @ k.transpose(-1, -2)) / D ** 0.5
    if kb is not None:
        s = s + kb[None, :, None, :]
    x = s + torch.where(keep, 0.0, c) if additive else s.masked_fill(~keep, c)
    return torch.softmax(x, -1) @ v


CASES = [  # (padding, c, additive)
    ("query", MIN32, False),
    ("query", MIN32, True),
    ("query", -10000.0, True),
    ("left", MIN32, False),
    ("left", MIN32, True),
    ("left", -10000.0, True),
]


STRATEGIES = [(1, "local", None), (2, "ring", None), (2, "zigzag", None), (2, "allgather", None),
              (2, "ulysses", None), (4, "hybrid", 2)]


@pytest.mark.parametrize("world,strategy,inner", STRATEGIES)
@pytest.mark.parametrize("padding,c,additive", CASES)
def test_dead_rows_match_eager(monkeypatch, world, strategy, inner, padding, c, additive):
    from ringcompile.runtime import dead_rows

    monkeypatch.setattr(dead_rows, "MASK_ELEMENTS", B * H * S * 3)  # the backward's mask scan in chunks
    torch.manual_seed(hash((world, strategy, padding, c, additive)) % 2**31)
    with_bias = padding == "query"
    keep_fn = _query_padding_keep if padding == "query" else _left_padding_causal_keep
    mask, score, form = _forms(keep_fn, c, additive, with_bias)
    pm = _padding(padding)
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kb = torch.randn(H, S, dtype=torch.float64, requires_grad=True) if with_bias else None
    layout = "zigzag" if strategy == "zigzag" else None
    out = simulated_ring_attention(q, k, v, world_size=world, strategy=strategy, layout=layout, mask=mask,
                                   mask_extras=[pm], score=score, score_extras=[kb] if with_bias else [],
                                   dead_rows=form, kernel="cpu", inner_size=inner)
    idx = torch.arange(S)
    keep = keep_fn(torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1),
                   idx.view(1, 1, -1, 1), idx.view(1, 1, 1, -1), pm)
    assert (~keep.any(-1)).any(), "the case must have rows with no kept key"
    ref = _eager(q, k, v, keep, c, additive, kb)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    dout = torch.randn_like(ref)
    inputs = [q, k, v] + ([kb] if with_bias else [])
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, inputs, dout)
    for name, g, w in zip("q k v kb".split(), got, want, strict=False):
        torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("world,strategy", [(1, "local"), (2, "ring")])
def test_no_second_pass_without_dead_rows(monkeypatch, world, strategy):
    """Rows that all keep a key: the bias form is never run (forward or backward), result as eager."""
    from ringcompile.runtime import dead_rows

    def never(*args):
        raise AssertionError("the bias-form pass ran although every row keeps a key")

    monkeypatch.setattr(dead_rows, "_bias_pass", never)
    torch.manual_seed(world)
    mask, score, form = _forms(_left_padding_causal_keep, MIN32, True, False)
    pm = torch.ones(B, S, dtype=torch.long)
    pm[1, 1:3] = 0  # padding inside the row: key 0 is kept by every query
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = simulated_ring_attention(q, k, v, world_size=world, strategy=strategy, mask=mask, mask_extras=[pm],
                                   dead_rows=form, kernel="cpu")
    idx = torch.arange(S)
    keep = _left_padding_causal_keep(torch.arange(B).view(-1, 1, 1, 1), 0, idx.view(1, 1, -1, 1),
                                     idx.view(1, 1, 1, -1), pm)
    ref = _eager(q, k, v, keep, MIN32, True, None)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    dout = torch.randn_like(ref)
    for g, w in zip(torch.autograd.grad(out, [q, k, v], dout), torch.autograd.grad(ref, [q, k, v], dout),
                    strict=True):
        torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("world,strategy,inner", [(1, "local", None), (2, "ring", None), (2, "zigzag", None),
                                                  (4, "hybrid", 2)])
@pytest.mark.parametrize("additive", [False, True])
def test_dead_rows_under_dropout_match_eager(world, strategy, inner, additive):
    """Attention dropout with dead rows: eager gives a dead row dropout(softmax(s + c)) (uniform weights
    for a fill), dropped with the same global keep mask as every other row. The bias-form pass runs the
    same strategy with the same seed on global indices, so it is exact: out and grads vs float64 eager."""
    from ringcompile.kernels.reference import attention_reference

    torch.manual_seed(1000 + world + int(additive))
    mask, score, form = _forms(_query_padding_keep, MIN32, additive, True)
    pm = _padding("query")
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kb = torch.randn(H, S, dtype=torch.float64, requires_grad=True)
    p, seed = 0.3, 4242
    layout = "zigzag" if strategy == "zigzag" else None
    out = simulated_ring_attention(q, k, v, world_size=world, strategy=strategy, layout=layout, mask=mask,
                                   mask_extras=[pm], score=score, score_extras=[kb], dead_rows=form,
                                   kernel="cpu", inner_size=inner, dropout_p=p, dropout_seed=seed)

    def eager_scores(s, b, h, qi, kv, pm_, kb_):  # the model's own ops: bias, then the constant
        s = s + kb_[h, kv]
        keep = _query_padding_keep(b, h, qi, kv, pm_)
        return s + torch.where(keep, 0.0, MIN32) if additive else s.masked_fill(~keep, MIN32)

    ref = attention_reference(q, k, v, score=Mod(eager_scores, False, "custom", n_extras=2),
                              score_extras=[pm, kb], dropout_p=p, dropout_seed=seed)
    plain = attention_reference(q, k, v, score=Mod(eager_scores, False, "custom", n_extras=2),
                                score_extras=[pm, kb])
    assert not torch.allclose(ref, plain), "dropout must drop something"
    _assert_matches(out, ref, {"q": q, "k": k, "v": v, "kb": kb})


def _assert_matches(out, ref, inputs: dict) -> None:
    """``out`` equals the float64 reference, and so do the gradients of every named input."""
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, list(inputs.values()), dout)
    want = torch.autograd.grad(ref, list(inputs.values()), dout)
    for name, g, w in zip(inputs, got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


def _batch_bias(s, b, h, q, kv, kbb):  # a learned per-(batch, head, key) bias: reads b
    return s + kbb[b, h, kv]


def _recording_strategies(monkeypatch, calls: list):
    """Wrap every strategy's forward/backward to record (phase, bias pass?, batch rows) per call."""
    import types

    from ringcompile.runtime import execute
    from ringcompile.runtime.strategies import STRATEGIES as REAL

    def wrap(name, phase, fn):
        def recorded(ctx, *tensors):
            q = tensors[0] if phase == "forward" else tensors[1]
            calls.append((phase, ctx.spec.dead_rows is None, q.shape[0]))
            return fn(ctx, *tensors)
        return recorded

    fake = {n: types.SimpleNamespace(forward=wrap(n, "forward", m.forward),
                                     backward=wrap(n, "backward", m.backward)) for n, m in REAL.items()}
    monkeypatch.setattr(execute, "STRATEGIES", fake)


@pytest.mark.parametrize("world,strategy,inner", STRATEGIES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_second_pass_runs_on_dead_batch_rows_only(monkeypatch, world, strategy, inner, dropout_p):
    """B=4, dead rows only in batch rows 1 and 3 (row 1's only on the last rank at world 2): the bias-form
    pass sees 2 batch rows (one pass of both, or one per row under dropout), never 4, and the result is
    still eager's on ALL rows, forward and backward: GQA (4 query / 2 kv heads), a learned bias indexed
    by (b, h, kv) with its gradient, dropout hashed on the original batch rows."""
    from ringcompile.kernels.reference import attention_reference

    Bb, Hq, Hkv = 4, 4, 2
    torch.manual_seed(7000 + 10 * world + int(dropout_p * 10) + len(strategy))
    mask, score, form = _forms(_query_padding_keep, MIN32, False, True, bias_fn=_batch_bias)
    pm = torch.ones(Bb, S, dtype=torch.long)
    pm[1, 5:] = 0
    pm[3, 2:] = 0
    q = torch.randn(Bb, Hq, S, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(Bb, Hkv, S, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kbb = torch.randn(Bb, Hq, S, dtype=torch.float64, requires_grad=True)
    seed = 99 if dropout_p else None
    calls: list = []
    _recording_strategies(monkeypatch, calls)
    layout = "zigzag" if strategy == "zigzag" else None
    out = simulated_ring_attention(q, k, v, world_size=world, strategy=strategy, layout=layout, mask=mask,
                                   mask_extras=[pm], score=score, score_extras=[kbb], dead_rows=form,
                                   kernel="cpu", inner_size=inner, enable_gqa=True, dropout_p=dropout_p,
                                   dropout_seed=seed)

    def eager_scores(s, b, h, qi, kv, pm_, kbb_):
        return _batch_bias(s, b, h, qi, kv, kbb_).masked_fill(~_query_padding_keep(b, h, qi, kv, pm_), MIN32)

    ref = attention_reference(q, k, v, score=Mod(eager_scores, False, "custom", n_extras=2),
                              score_extras=[pm, kbb], dropout_p=dropout_p, dropout_seed=seed)
    _assert_matches(out, ref, {"q": q, "k": k, "v": v, "kbb": kbb})
    per_pass = 1 if dropout_p else 2
    assert all(n == (per_pass if bias else Bb) for _, bias, n in calls), calls
    # rows the bias form ran on, summed over ranks: forward, then the backward's lse recompute + backward
    assert sum(n for ph, bias, n in calls if bias and ph == "forward") == 2 * 2 * world, calls
    assert sum(n for ph, bias, n in calls if bias and ph == "backward") == 2 * world, calls


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(0, S), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       world=st.sampled_from([1, 2]), dropout=st.booleans())
def test_any_pattern_of_dead_batch_rows_matches_eager(lengths, seed, world, dropout):
    """Query padding of any length per batch row (0: a whole row padded; S: none): the second pass
    runs on exactly the batch rows with a padded query, and out and grads are eager's on all rows."""
    from ringcompile.kernels.reference import attention_reference

    Bb = len(lengths)
    torch.manual_seed(seed)
    pm = (torch.arange(S).view(1, -1) < torch.tensor(lengths).view(-1, 1)).long()
    mask, score, form = _forms(_query_padding_keep, MIN32, True, True, bias_fn=_batch_bias)
    q, k, v = (torch.randn(Bb, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kbb = torch.randn(Bb, H, S, dtype=torch.float64, requires_grad=True)
    p, dseed = (0.25, seed) if dropout else (0.0, None)
    calls: list = []

    def eager_scores(s, b, h, qi, kv, pm_, kbb_):
        keep = _query_padding_keep(b, h, qi, kv, pm_)
        return _batch_bias(s, b, h, qi, kv, kbb_) + torch.where(keep, 0.0, MIN32)

    ref = attention_reference(q, k, v, score=Mod(eager_scores, False, "custom", n_extras=2),
                              score_extras=[pm, kbb], dropout_p=p, dropout_seed=dseed)
    dout = torch.randn_like(ref)
    with pytest.MonkeyPatch.context() as mp:  # forward and backward
        _recording_strategies(mp, calls)
        out = simulated_ring_attention(q, k, v, world_size=world, strategy="local" if world == 1 else "ring",
                                       mask=mask, mask_extras=[pm], score=score, score_extras=[kbb],
                                       dead_rows=form, kernel="cpu", dropout_p=p, dropout_seed=dseed)
        got = torch.autograd.grad(out, [q, k, v, kbb], dout)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-7)
    for g, w in zip(got, torch.autograd.grad(ref, [q, k, v, kbb], dout), strict=True):
        torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-6)
    n_dead = sum(n < S for n in lengths)
    bias_rows = [n for _, bias, n in calls if bias]
    assert sum(bias_rows) == 3 * world * n_dead, (lengths, calls)  # fwd, bwd's lse recompute, bwd
