"""The per-rank picture of a traced run: compute vs wait per ring step, forward and backward.

matplotlib is optional (``pip install ringcompile[plot]``); without it ``draw_timeline``
raises ``MissingDependencyError`` saying how to get it, and the JSON and text still work.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..plotting import pyplot, save

COLORS = {"compute": "#2e7d32", "wait": "#c62828"}


def draw_timeline(calls: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One row per rank and phase; green bars compute, red bars wait (the bubble)."""
    plt = pyplot("drawing timeline.png (trace.json and summary.txt are written without it)")
    calls = list(calls)
    origin = min((c["start_ns"] for c in calls), default=0)
    ranks = sorted({c["rank"] for c in calls})
    phases = [p for p in ("forward", "backward") if any(c["phase"] == p for c in calls)] or ["forward"]
    rows = [(r, p) for r in ranks for p in phases]
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.5))
    for y, (rank, phase) in enumerate(rows):
        bars: dict[str, list[tuple[float, float]]] = {"compute": [], "wait": []}
        for c in calls:
            if c["rank"] != rank or c["phase"] != phase:
                continue
            for what, _step, _chunk, t0, t1 in c.get("events", []):
                kind = "compute" if what == "compute" else "wait"
                bars[kind].append(((t0 - origin) / 1e6, (t1 - t0) / 1e6))
        for kind, spans in bars.items():
            if spans:
                ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=COLORS[kind], label=kind)
    ax.set_yticks(range(len(rows)), [f"rank {r} {p}" for r, p in rows])
    ax.set_xlabel("time since the first ring call (ms)")
    ax.set_title("ringcompile: compute vs wait per rank")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    if unique:
        ax.legend(unique.values(), unique.keys(), loc="upper right")
    ax.invert_yaxis()
    return save(fig, path)
