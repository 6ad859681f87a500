"""``ringcompile plan --plot``: time vs S per strategy and per-rank memory vs S for N = 1, 2, 4, 8."""

from __future__ import annotations

import pytest

from ringcompile.cli import main
from ringcompile.cost_model import plots

WORKLOAD = dict(heads=8, kv_heads=8, head_dim=64, batch=1, dtype="bfloat16", causal=True, backward=False,
                profile="h100-nvlink")


def test_curves_follow_the_plans():
    grid = plots.seq_grid(8192, points=4)
    assert grid == sorted(grid) and grid[-1] == 4 * 8192 and len(grid) == 4
    times = plots.time_curves(grid, world_size=4, **WORKLOAD)
    assert {"ring", "zigzag", "local", "ulysses", "allgather"} <= set(times)
    assert all(t is not None and t > 0 for t in times["ring"])
    memory = plots.memory_curves(grid, **WORKLOAD)
    assert set(memory) == {1, 2, 4, 8}
    for i in range(len(grid)):  # more ranks, less memory per rank, at every S
        assert memory[1][i] > memory[2][i] > memory[4][i] > memory[8][i]


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    rc = main(["plan", "--seq", "16384", "--world-size", "4", "--heads", "8", "--head-dim", "64", "--causal",
               "--plot", str(out)])
    assert rc == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 2000
    assert f"plot: {out}" in capsys.readouterr().out
