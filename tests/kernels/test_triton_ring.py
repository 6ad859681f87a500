"""The generated kernels inside the real ring runtime (virtual ranks on threads), kernel="triton"."""

from __future__ import annotations

import pytest
import torch
from test_triton_support import assert_close, assert_ring_matches_float64, triton_interpreter  # noqa: F401

from ringcompile import mods

simulated = pytest.importorskip("ringcompile.runtime.simulated")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ring", "zigzag"])
def test_ring_with_triton_kernels_matches_full_attention(strategy):
    g = torch.Generator().manual_seed(21)
    B, Hq, Hkv, S, D = 1, 4, 2, 22, 16
    q = torch.randn(B, Hq, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    slopes = torch.rand(Hq, generator=g)
    mask, score = mods.causal(), mods.alibi()
    out = simulated.simulated_ring_attention(
        q, k, v, world_size=2, strategy=strategy, mask=mask, score=score, score_extras=[slopes],
        enable_gqa=True, kernel="triton", timeout=120)
    assert_ring_matches_float64(out, q, k, v, g, mask=mask, score=score, score_extras=[slopes.double()])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,world,inner", [("ulysses", 2, None), ("hybrid", 4, 2)])
def test_head_group_strategies_run_triton_under_dropout_on_global_heads(strategy, world, inner, monkeypatch):
    """Ulysses and hybrid under dropout keep kernel="triton": the rank holding heads h0.. launches the
    Triton kernels with head offset h0, and the result equals float64 attention with the one-process
    keep mask (global heads), forward and gradients (GQA 4:2, ALiBi on global heads, causal)."""
    from ringcompile.kernels.triton import launch

    offsets: list[int] = []
    real = launch._dropout_args

    def spy(p, seed, device):
        args = real(p, seed, device)
        offsets.append(args[1])
        return args

    monkeypatch.setattr(launch, "_dropout_args", spy)
    g = torch.Generator().manual_seed(23)
    B, Hq, Hkv, S, D = 1, 4, 2, 18, 16
    q = torch.randn(B, Hq, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    slopes = torch.rand(Hq, generator=g)
    mask, score = mods.causal(), mods.alibi()
    drop = dict(dropout_p=0.3, dropout_seed=2**35 + 4321)
    out = simulated.simulated_ring_attention(
        q, k, v, world_size=world, inner_size=inner, strategy=strategy, mask=mask, score=score,
        score_extras=[slopes], enable_gqa=True, kernel="triton", timeout=120, **drop)
    assert sorted(set(offsets)) == [0, 2]  # both head groups ran the Triton kernels, shifted
    assert_ring_matches_float64(out, q, k, v, g, mask=mask, score=score, score_extras=[slopes.double()],
                                **drop)
