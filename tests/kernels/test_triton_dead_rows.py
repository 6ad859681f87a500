"""The dead-row second pass on the Triton kernels: its batch-mapped mods lower, dropout hashes the rows.

The bias form runs on the dead batch rows only, with ``b`` mapped back to the original rows by one
more extra (``rows[b]``: a nested load in the generated kernel) and, under dropout, one row per pass
with ``dropout.batch_row_seed`` (the op's seed tensor, read on the device). Against float64 eager on
the full inputs, forward and gradients (learned (b, h, kv) bias included). Tiny shapes: interpreter.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_support import assert_close, triton_interpreter  # noqa: F401

from ringcompile.mods import Mod
from ringcompile.spec import DeadRowForm

simulated = pytest.importorskip("ringcompile.runtime.simulated")
MIN32 = torch.finfo(torch.float32).min
B, HQ, HKV, S, D = 4, 2, 1, 16, 16


def _keep(b, h, q, kv, pm):  # DeBERTa query padding
    return (pm[b, q] != 0) & (pm[b, kv] != 0)


def _bias(s, b, h, q, kv, kbb):
    return s + kbb[b, h, kv]


def _bias_form(s, b, h, q, kv, pm, kbb):  # eager's masked_fill(~keep, MIN32), shifted by -MIN32
    s = _bias(s, b, h, q, kv, kbb)
    return torch.where(_keep(b, h, q, kv, pm), s, s * 0.0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_dead_batch_rows_on_triton_match_float64(dropout_p, monkeypatch):
    from ringcompile.kernels.reference import attention_reference
    from ringcompile.runtime import execute

    kernels_seen: list[tuple[bool, int, str]] = []
    real = execute._context

    def spy(comm, q, mask_extras, score_extras, seq_len, spec, *rest):
        ctx = real(comm, q, mask_extras, score_extras, seq_len, spec, *rest)
        kernels_seen.append((spec.dead_rows is None, q.shape[0], ctx.kernels.name))
        return ctx

    monkeypatch.setattr(execute, "_context", spy)
    g = torch.Generator().manual_seed(31 + int(10 * dropout_p))
    q = torch.randn(B, HQ, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, HKV, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, HKV, S, D, generator=g, requires_grad=True)
    kbb = torch.randn(B, HQ, S, generator=g, requires_grad=True)
    pm = torch.ones(B, S, dtype=torch.long)
    pm[1, 11:] = 0
    pm[2, 3:] = 0
    mask = Mod(_keep, True, "custom", n_extras=1)
    score = Mod(_bias, False, "custom", n_extras=1)
    form = DeadRowForm(mask=None, score=Mod(_bias_form, False, "custom", n_extras=2), score_idx=(0, 1),
                       shift=MIN32)
    seed = 2**34 + 99 if dropout_p else None
    out = simulated.simulated_ring_attention(
        q, k, v, world_size=2, strategy="ring", mask=mask, mask_extras=[pm], score=score, score_extras=[kbb],
        dead_rows=form, enable_gqa=True, kernel="triton", timeout=300, dropout_p=dropout_p, dropout_seed=seed)

    def eager(s, b, h, qi, kv, pm_, kbb_):
        return _bias(s, b, h, qi, kv, kbb_).masked_fill(~_keep(b, h, qi, kv, pm_), MIN32)

    x64 = [t.detach().double().requires_grad_() for t in (q, k, v, kbb)]
    ref = attention_reference(*x64[:3], score=Mod(eager, False, "custom", n_extras=2),
                              score_extras=[pm, x64[3]], dropout_p=dropout_p, dropout_seed=seed)
    assert_close(out, ref, 2e-5, "out")
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, [q, k, v, kbb], dout)
    want = torch.autograd.grad(ref, x64, dout.double())
    for name, a, w in zip(("dq", "dk", "dv", "dkbb"), got, want, strict=True):
        assert_close(a, w, 5e-5, name)
    bias_passes = [(n, name) for is_bias, n, name in kernels_seen if is_bias]
    assert bias_passes and all(name == "triton" for _, name in bias_passes), kernels_seen
    assert all(n == (1 if dropout_p else 2) for n, _ in bias_passes), kernels_seen
