"""Head dims that are not powers of two (80, 96: Phi, GPT-J-6B / Falcon-style models) run as two
power-of-two pieces, and those without a split (72 = 64 + 8) padded to the next power of two with
masked loads (docs/ARCHITECTURE.md, Kernels): forward and backward under the Triton interpreter
against float64 block math. More split cases (GQA, ALiBi, bf16, DV != D): test_triton_head_split.py."""

from __future__ import annotations

import pytest
import torch
from test_triton_support import compare_block, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.kernels.triton import show, triton_block_kernels
from ringcompile.spec import AttentionSpec


@pytest.mark.parametrize("D", [72, 80, 96])
def test_non_power_of_two_head_dim_matches_float64(D):
    g = torch.Generator().manual_seed(D)
    q = torch.randn(1, 2, 18, D, generator=g)
    k = torch.randn(1, 1, 20, D, generator=g)
    v = torch.randn(1, 1, 20, D, generator=g)
    mask = mods.causal()
    kern = triton_block_kernels(AttentionSpec(mask=mask, kernel="triton"), forced=True)
    compare_block(kern, q, k, v, tol=2e-5, scale=D ** -0.5, q_offset=22, kv_offset=16, seq_len=40, mask=mask,
                  seed=D)


def test_head_dim_72_source_pads_to_128_and_masks_the_padding():
    src = show(AttentionSpec(mask=mods.causal()), head_dim=72)  # 64 + 8: a tail under tl.dot's 16
    assert "HEAD_DIM = tl.constexpr(72)" in src and "D_PAD = tl.constexpr(128)" in src
    assert "d_ok = offs_d < HEAD_DIM" in src


def test_head_dim_80_source_is_split_not_padded():
    src = show(AttentionSpec(mask=mods.causal()), head_dim=80)
    assert "HEAD_DIM = tl.constexpr(80)" in src and "D_PAD" not in src and "d_ok" not in src
