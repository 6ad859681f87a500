"""kernels/cpu.py against the block-math contract (kernels/reference.py) and a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from blockwise import blockwise_attention
from hypothesis import given
from hypothesis import strategies as st

from ringcompile import mods
from ringcompile.kernels import cpu, reference
from ringcompile.kernels.select import block_kernels
from ringcompile.spec import AttentionSpec

MASKS = ["none", "causal", "sliding", "padding", "causal+padding", "alibi", "causal+alibi", "softcap",
         "custom"]


def _mods(name: str, B: int, Hq: int, total: int, gen: torch.Generator):
    """(mask, score, mask_extras, score_extras) for a named case over ``total`` global positions."""
    mask = score = None
    mask_extras: list[torch.Tensor] = []
    score_extras: list[torch.Tensor] = []
    if "causal" in name:
        mask = mods.causal()
    if name == "sliding":
        mask = mods.sliding_window(5, is_causal=False)
    if "padding" in name:
        key_mask = torch.rand(B, total, generator=gen) > 0.3
        mask = mods.and_masks(mask, mods.key_padding()) if mask is not None else mods.key_padding()
        mask_extras = [key_mask]
    if "alibi" in name:
        score = mods.alibi()
        score_extras = [torch.rand(Hq, generator=gen) + 0.1]
    if name == "softcap":
        score = mods.softcap(3.0)
    if name == "custom":
        mask = mods.from_callable(lambda b, h, q, kv: (q + kv + h) % 3 != 0, True)
    return mask, score, mask_extras, score_extras


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 2e-4


def _assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, what
    assert a.dtype == b.dtype, what
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), what
    a = torch.where(torch.isneginf(a), torch.zeros_like(a), a)
    b = torch.where(torch.isneginf(b), torch.zeros_like(b), b)
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g}"


@given(
    B=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), D=st.sampled_from([8, 16]),
    sq=st.integers(1, 24), sk=st.integers(1, 24), q_offset=st.integers(0, 40), kv_offset=st.integers(0, 40),
    pad=st.one_of(st.none(), st.integers(0, 30)), mask_name=st.sampled_from(MASKS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2**31 - 1),
    dv=st.sampled_from([None, 4]),
)
def test_cpu_block_matches_reference(B, hkv, groups, D, sq, sk, q_offset, kv_offset, pad, mask_name, dtype,
                                     seed, dv):
    gen = torch.Generator().manual_seed(seed)
    Hq = hkv * groups
    q = torch.randn(B, Hq, sq, D, generator=gen).to(dtype)
    k = torch.randn(B, hkv, sk, D, generator=gen).to(dtype)
    v = torch.randn(B, hkv, sk, dv or D, generator=gen).to(dtype)  # a value head dim of its own: math path
    total = max(q_offset + sq, kv_offset + sk)
    seq_len = None if pad is None else max(1, total - pad)
    mask, score, mask_extras, score_extras = _mods(mask_name, B, Hq, total, gen)
    kw = dict(scale=D ** -0.5, q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len, mask=mask,
              score=score, mask_extras=mask_extras, score_extras=score_extras)
    tol = _tol(dtype)

    out_ref, lse_ref = reference.block_forward(q, k, v, **kw)
    out, lse = cpu.block_forward(q, k, v, **kw)
    _assert_close(out, out_ref, tol, "out")
    _assert_close(lse, lse_ref, tol, "lse")

    # "Final" out/lse as if other blocks contributed: lse only grows, some rows stay fully masked.
    acc = out_ref.dtype
    other = torch.randn(lse_ref.shape, generator=gen).to(acc) + 1.0
    other = other.masked_fill(torch.rand(lse_ref.shape, generator=gen) < 0.2, float("-inf"))
    final_lse = torch.logaddexp(lse_ref, other)
    final_out = torch.randn(out_ref.shape, generator=gen).to(acc)
    dout = torch.randn(out_ref.shape, generator=gen).to(dtype)
    g_ref = reference.block_backward(q, k, v, final_out, dout, final_lse, **kw)
    g = cpu.block_backward(q, k, v, final_out, dout, final_lse, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), g[:3], g_ref[:3], strict=True):
        _assert_close(a, b, tol, name)
    for a, b in zip(g[3], g_ref[3], strict=True):
        if b is None:
            assert a is None
        elif a is None:  # this pair does not touch the extra: the reference gives exact zeros
            assert float(b.abs().max()) == 0.0
        else:
            _assert_close(a, b, max(tol, _tol(b.dtype)), "d_score_extra")


@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "causal+alibi", "softcap"])
@pytest.mark.parametrize("gqa", [False, True])
def test_blockwise_cpu_equals_float64_attention(mask_name, gqa):
    """Four block pairs through the CPU kernels, merged, equal eager float64 attention and its grads."""
    gen = torch.Generator().manual_seed(hash((mask_name, gqa)) % 2**31)
    B, Hq, S, D = 2, 4, 40, 16
    hkv = 2 if gqa else Hq
    q = torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64)
    mask, score, mask_extras, score_extras = _mods(mask_name, B, Hq, S, gen)
    if mask_name == "padding":
        mask_extras[0][:, 0] = True  # every query keeps at least one key
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    expected = reference.attention_reference(qr, kr, vr, mask=mask, score=score, mask_extras=mask_extras,
                                             score_extras=score_extras, scale=0.3)
    dout = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(dout)

    q32, k32, v32, do32 = (t.float() for t in (q, k, v, dout))
    cuts = [(0, 17), (17, S)]
    kw = dict(scale=0.3, seq_len=S, mask=mask, score=score, mask_extras=mask_extras,
              score_extras=score_extras)
    out, lse, dq, dk, dv = blockwise_attention(cpu.block_forward, cpu.block_backward, q32, k32, v32, do32,
                                               cuts, **kw)
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=2e-5)
    for got, ref in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_chunked_math_path_matches_reference(monkeypatch):
    """Tiny tiles force many query chunks (and skipped, fully masked chunks) on both general paths."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(cpu, "MASK_TILE_ELEMENTS", 16)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen) for _ in range(3))
    for mask, score, extras in ((mods.sliding_window(4), None, []),
                                (mods.sliding_window(4), mods.alibi(), [torch.rand(2, generator=gen)])):
        kw = dict(scale=0.35, q_offset=50, kv_offset=38, mask=mask, score=score, score_extras=extras)
        o_ref, l_ref = reference.block_forward(q, k, v, **kw)
        o, lse = cpu.block_forward(q, k, v, **kw)
        _assert_close(o, o_ref, 1e-5, "out")
        _assert_close(lse, l_ref, 1e-5, "lse")
        dout = torch.randn(o.shape, generator=gen)
        g_ref = reference.block_backward(q, k, v, o_ref, dout, l_ref, **kw)
        g = cpu.block_backward(q, k, v, o_ref, dout, l_ref, **kw)
        for a, b in zip(g[:3], g_ref[:3], strict=True):
            _assert_close(a, b, 1e-5, "grad")


def test_causal_pieces_skip_and_split():
    """Causal pairs become fused pieces: fully kept, diagonal, split, or nothing at all."""
    plan = cpu.plan_pieces
    kw = dict(seq_len=None, mask=mods.causal(), score=None, dropout=False)
    assert plan(8, 8, q_offset=0, kv_offset=8, **kw) == []
    assert [p.kind for p in plan(8, 8, q_offset=8, kv_offset=0, **kw)] == ["full"]
    assert [p.kind for p in plan(8, 8, q_offset=4, kv_offset=4, **kw)] == ["diagonal"]
    assert [(p.kind, p.k0) for p in plan(8, 8, q_offset=6, kv_offset=4, **kw)] == [("full", 0),
                                                                                    ("diagonal", 2)]
    assert [(p.kind, p.q0) for p in plan(8, 8, q_offset=4, kv_offset=6, **kw)] == [("diagonal", 2)]
    assert plan(8, 8, q_offset=0, kv_offset=0, seq_len=0, mask=None, score=None, dropout=False) == []


def test_select_returns_cpu_kernels_on_cpu():
    kernels = block_kernels(AttentionSpec(mask=mods.causal()), torch.device("cpu"))
    assert kernels.name == "cpu"
    assert kernels.forward is cpu.block_forward and kernels.backward is cpu.block_backward


def test_non_finite_input_propagates():
    q, k, v = (torch.randn(1, 1, 6, 8) for _ in range(3))
    q[0, 0, 2, 3] = float("nan")
    out, _ = cpu.block_forward(q, k, v, scale=0.3, mask=mods.causal())
    ref, _ = reference.block_forward(q, k, v, scale=0.3, mask=mods.causal())
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(ref).any(-1))
    assert bool(torch.isnan(out[0, 0, 2]).all())


@pytest.mark.parametrize("mask_name", ["none", "causal"])
def test_strided_head_dim_matches_reference(mask_name):
    """q/k/v/dout whose head dim is strided (heads split from (B, C, S) as (B, H, D, S).transpose(-1, -2),
    SqueezeBERT's layout): the fused op read them as dense rows and returned wrong values."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 2, 8, 12, generator=gen, dtype=torch.float64).transpose(-1, -2)
                     for _ in range(4))
    assert q.stride(-1) != 1
    mask = mods.causal() if mask_name == "causal" else None
    kw = dict(scale=8 ** -0.5, mask=mask)
    out_ref, lse_ref = reference.block_forward(q, k, v, **kw)
    out, lse = cpu.block_forward(q, k, v, **kw)
    _assert_close(out, out_ref, 1e-10, "out")
    _assert_close(lse, lse_ref, 1e-10, "lse")
    g_ref = reference.block_backward(q, k, v, out_ref, dout, lse_ref, **kw)
    g = cpu.block_backward(q, k, v, out_ref.transpose(-1, -2).contiguous().transpose(-1, -2), dout, lse, **kw)
    for name, a, b in zip(("dq", "dk", "dv"), g[:3], g_ref[:3], strict=True):
        _assert_close(a, b, 1e-10, name)
