"""Calibration: the fits recover known parameters, and a tiny real run writes a usable profile."""

from __future__ import annotations

import pytest

import ringcompile
from ringcompile.cost_model.calibrate import STEPS, calibrate, fit_kernel, fit_link
from ringcompile.cost_model.profiles import load_profile


def test_fit_link_recovers_alpha_and_bandwidth():
    alpha, bw = 3e-5, 2.5e9
    samples = [(n, alpha + n / bw) for n in (1 << 10, 1 << 14, 1 << 18, 1 << 22)]
    got_alpha, got_bw = fit_link(samples)
    assert got_alpha == pytest.approx(alpha, rel=1e-6) and got_bw == pytest.approx(bw, rel=1e-6)


def test_fit_kernel_recovers_rate_passes_and_overhead():
    f_eff, passes, overhead, mem = 4e10, 3.0, 2e-4, 1e10
    samples = []
    for flops, scores, tiles in ((1e8, 1e6, 3), (4e8, 1e6, 1), (1e9, 4e6, 1), (2e8, 8e6, 2), (3e9, 2e6, 6)):
        samples.append((flops, scores, tiles, flops / f_eff + 4 * passes * scores / mem + overhead * tiles))
    got = fit_kernel(samples, mem)
    assert got == pytest.approx((f_eff, passes, overhead), rel=1e-6)


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_tiny_calibration_writes_a_profile_the_planner_reads(tmp_path):
    seen = []
    prof = calibrate(name="tiny", quick=True, progress=lambda i, n, what: seen.append(i),
                     kernel_shapes=((64, 64, 16), (128, 128, 16), (128, 128, 32), (256, 128, 16)),
                     link_sizes=(1 << 10, 1 << 14, 1 << 16), causal_sizes=(256,), probe_shape=(128, 128, 16))
    assert seen == sorted(seen) and seen[-1] == len(STEPS) - 1
    assert prof.flops("float32") > 1e6 and prof.memory_bandwidth > 1e6
    assert prof.link_bandwidth > 1e5 and 0 < prof.link_latency < 1.0
    assert prof.cores >= 1 and prof.backward_factor > 0 and 16 <= prof.causal_tile <= 256
    assert prof.shared_slowdown >= 1 and 0 <= prof.step_overhead < 1.0
    path = tmp_path / "tiny.toml"
    path.write_text(prof.to_toml())
    assert load_profile(str(path)) == prof
    p = ringcompile.plan(seq_len=8192, world_size=2, heads=4, kv_heads=4, head_dim=64, dtype="float32",
                         profile=str(path))
    assert p.time > 0
