"""Two-level calibration: the fit recovers known links per level, and `ringcompile calibrate --node-size`
on 4 gloo ranks as 2 x 2 writes a [node]/[intra]/[inter] profile that `plan --profile` ranks hybrid with."""

from __future__ import annotations

import pytest

import ringcompile
from ringcompile.cli import main
from ringcompile.cost_model.calibrate_levels import check_factoring, fit_levels, with_levels
from ringcompile.cost_model.profiles import load_profile
from ringcompile.errors import OptionError


def _rows(alpha: float, bw: float, a2a_bw: float) -> tuple[list, list]:
    sizes = (1 << 10, 1 << 14, 1 << 18, 1 << 22)
    return [(n, alpha + n / bw) for n in sizes], [(n, 3 * alpha + n / a2a_bw) for n in sizes]


def test_fit_levels_recovers_each_link_separately():
    intra_p2p, intra_a2a = _rows(5e-6, 4e11, 3e11)
    inter_p2p, inter_a2a = _rows(2e-5, 4e10, 3.6e10)
    links = fit_levels({"intra_p2p": intra_p2p, "intra_a2a": intra_a2a, "inter_p2p": inter_p2p,
                        "inter_a2a": inter_a2a}, node_size=8, world_size=64)
    assert links.intra == pytest.approx((5e-6, 4e11, 0.75), rel=1e-6)
    assert links.inter == pytest.approx((2e-5, 4e10, 0.9), rel=1e-6)
    prof = with_levels(load_profile("h100-nvlink"), links, name="fitted")
    assert prof.two_level and prof.node_size == 8
    assert prof.link("inter") == pytest.approx((4e10, 2e-5, 0.9), rel=1e-6)
    assert prof.link("intra") == pytest.approx((4e11, 5e-6, 0.75), rel=1e-6)
    assert prof.matmul_flops == load_profile("h100-nvlink").matmul_flops


@pytest.mark.parametrize("world,node", [(4, 1), (4, 4), (6, 4), (2, 2)])
def test_a_level_of_one_rank_cannot_be_measured(world, node):
    with pytest.raises(OptionError, match="nodes x node size"):
        check_factoring(world, node)


@pytest.mark.multirank
@pytest.mark.timeout(150)
def test_calibrate_two_levels_on_4_gloo_ranks_round_trips_through_plan(tmp_path, capsys):
    path = tmp_path / "two-level.toml"
    rc = main(["calibrate", "--node-size", "2", "--world-size", "4", "--quick", "--name", "loop-2x2",
               "--base-profile", "cpu-gloo-loopback", "--output", str(path)])
    assert rc == 0
    prof = load_profile(str(path))
    assert prof.name == "loop-2x2" and prof.two_level and prof.node_size == 2
    for level in ("intra", "inter"):
        bw, lat, eff = prof.link(level)
        assert bw > 1e5 and 0 < lat < 1.0 and 0 < eff <= 1.0, (level, bw, lat, eff)
    assert prof.link_bandwidth == prof.intra_bandwidth   # link_* = the intra link, as the schema says
    assert prof.flops("float32") == load_profile("cpu-gloo-loopback").flops("float32")
    capsys.readouterr()
    assert main(["plan", "--seq", "4096", "--world-size", "4", "--heads", "4", "--head-dim", "32",
                 "--dtype", "float32", "--causal", "--backward", "--profile", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "hybrid-2x2" in printed and "profile=loop-2x2" in printed
    best = ringcompile.plan(seq_len=4096, world_size=4, heads=4, head_dim=32, dtype="float32", causal=True,
                            profile=str(path), strategy="hybrid")
    assert best.strategy == "hybrid-2x2" and best.time > 0
