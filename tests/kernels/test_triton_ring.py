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
