"""The Ring Attention paper's minimal block sizes (Liu, Zaharia, Abbeel 2023, Table 1), from the model.

The paper's setting: bf16, every query head has its own K/V head, square c-token blocks; the
threshold is the c solving per-step compute = per-step transfer in our sympy expressions.
"""

from __future__ import annotations

import pytest

import ringcompile

PAPER = {"a100-nvlink": 1.0e3, "a100-infiniband": 24.5e3, "tpu-v4": 1.0e3}


@pytest.mark.parametrize("profile,expected", sorted(PAPER.items()))
def test_minimal_block_size_within_5_percent(profile, expected):
    p = ringcompile.plan(seq_len=1 << 20, world_size=8, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16",
                         profile=profile, strategy="ring")
    assert abs(p.overlap_threshold / expected - 1) < 0.05, p.overlap_threshold


def test_threshold_scales_with_gqa_and_zigzag_causal():
    kw = dict(seq_len=1 << 20, world_size=8, head_dim=128, profile="a100-nvlink")
    mha = ringcompile.plan(heads=32, kv_heads=32, strategy="ring", **kw).overlap_threshold
    gqa = ringcompile.plan(heads=32, kv_heads=8, strategy="ring", **kw).overlap_threshold
    zig = ringcompile.plan(heads=32, kv_heads=32, strategy="zigzag", causal=True, **kw).overlap_threshold
    assert gqa == pytest.approx(mha * 8 / 32)
    assert zig == pytest.approx(mha * 2)
    fp32 = ringcompile.plan(heads=32, kv_heads=32, strategy="ring", dtype="float32", **kw)
    # twice the bytes per token, at the fp32 matmul rate
    assert fp32.overlap_threshold == pytest.approx(19.5e12 * 4 / (2 * 300e9))


def test_ring_hides_transfer_exactly_above_threshold():
    """Below the threshold the ring step waits on the link (bubble > 0); above it, it does not."""
    kw = dict(world_size=4, heads=16, kv_heads=16, head_dim=128, profile="a100-infiniband", strategy="ring",
              block_size=1 << 30)
    thr = ringcompile.plan(seq_len=1 << 20, **kw).overlap_threshold_latency
    above = ringcompile.plan(seq_len=int(thr * 4 * 1.2), **kw)
    below = ringcompile.plan(seq_len=int(thr * 4 * 0.8), **kw)
    assert above.bubble == pytest.approx(0.0, abs=1e-12)
    assert below.bubble > 0.05
