"""``ringcompile plan ... --plot FILE.png``: the two pictures that answer sizing questions.

Left: predicted time of every strategy against the sequence length S, so the crossovers are
where the lines cross. Right: per-rank memory against S for N = 1, 2, 4, 8 (the whole model
when ``--model`` is given, else the attention alone), with the budget as a line when given.
matplotlib is the optional ``plot`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..plotting import pyplot, save
from .planner import plans

WORLDS = (1, 2, 4, 8)


def seq_grid(seq_len: int, points: int = 12) -> list[int]:
    """Powers of two from 1K to 4x ``seq_len`` (at least ``points`` of them when possible)."""
    top = max(4 * seq_len, 1 << 12)
    grid, s = [], 1 << 10
    while s <= top:
        grid.append(s)
        s *= 2
    return grid[-points:] if len(grid) > points else grid


def time_curves(grid: Sequence[int], **workload: Any) -> dict[str, list[float | None]]:
    """Predicted seconds per strategy at each S (None where infeasible)."""
    curves: dict[str, list[float | None]] = {}
    for i, s in enumerate(grid):
        for p in plans(seq_len=s, **workload):
            curves.setdefault(p.strategy, [None] * len(grid))[i] = p.time
    return curves


def memory_curves(grid: Sequence[int], memory_model: Any = None, **workload: Any) -> dict[int, list[float]]:
    """Per-rank bytes at each S for N in ``WORLDS``: whole model if ``memory_model``, else attention."""
    curves: dict[int, list[float]] = {}
    for n in WORLDS:
        row = []
        for s in grid:
            if memory_model is not None:
                row.append(float(memory_model.estimate(n, s).per_rank_peak))
            else:
                strategy = "local" if n == 1 else "ring"
                ranked = plans(seq_len=s, **{**workload, "world_size": n}, strategy=strategy)
                row.append(ranked[0].memory.peak)
        curves[n] = row
    return curves


def draw_plan_plots(path: str | Path, grid: Sequence[int], times: dict[str, list[float | None]],
                    memory: dict[int, list[float]], title: str, budget: float | None = None,
                    memory_label: str = "attention") -> Path:
    plt = pyplot("--plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, ys in times.items():
        pts = [(s, y) for s, y in zip(grid, ys, strict=True) if y is not None]
        if pts:
            left.plot(*zip(*pts, strict=True), marker="o", label=name)
    left.set(xscale="log", yscale="log", xlabel="sequence length S (tokens)", ylabel="predicted time (s)",
             title="time per strategy (lines cross at the crossovers)")
    left.legend()
    for n, ys in memory.items():
        right.plot(grid, [y / 2**30 for y in ys], marker="o", label=f"N = {n}")
    if budget:
        right.axhline(budget / 2**30, color="k", linestyle="--", label="budget")
    right.set(xscale="log", yscale="log", xlabel="sequence length S (tokens)", ylabel="GiB per rank",
              title=f"per-rank memory ({memory_label})")
    right.legend()
    fig.suptitle(title)
    return save(fig, path)
