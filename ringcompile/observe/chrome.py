"""Merge every rank's ring calls into one Chrome-trace / Perfetto file.

Each rank is its own process (``pid`` = rank), forward and backward are its two threads, a
call is one slice and its compute / wait regions are slices inside it. Timestamps are wall
clock (microseconds), so ranks on one host line up.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import RingCompileError

PHASE_THREADS = {"forward": 1, "backward": 2}


def load_calls(directory: str | Path) -> list[dict[str, Any]]:
    """Every call recorded under ``directory`` (the ``calls-*.jsonl`` files), oldest first."""
    root = Path(directory)
    files = sorted(root.glob("calls-*.jsonl"))
    if not files:
        raise RingCompileError(
            f"no ring calls were recorded under {root}: the traced command ran no ring attention "
            "(is it compiled with backend='ring', or calling ringcompile.ring_attention?) or did not "
            "inherit the RINGCOMPILE_TRACE_DIR environment variable")
    calls = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                calls.append(json.loads(line))
    return sorted(calls, key=lambda c: c["start_ns"])


def chrome_trace(calls: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``{"traceEvents": [...]}`` with one process per rank."""
    calls = list(calls)
    origin = min((c["start_ns"] for c in calls), default=0)
    events: list[dict[str, Any]] = []
    for rank in sorted({c["rank"] for c in calls}):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": rank, "args": {"sort_index": rank}})
        for phase, tid in PHASE_THREADS.items():
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid,
                           "args": {"name": phase}})
    for call in calls:
        events.extend(_call_events(call, origin))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _call_events(call: dict[str, Any], origin: int) -> list[dict[str, Any]]:
    pid, tid = call["rank"], PHASE_THREADS.get(call["phase"], 3)
    site = call.get("site") or "attention"
    common = {"site": site, "strategy": call["strategy"], "rank": call["rank"],
              "world_size": call["world_size"]}
    out = [{"ph": "X", "name": f"{site} {call['strategy']} {call['phase']}", "cat": "ringcompile",
            "pid": pid, "tid": tid, "ts": (call["start_ns"] - origin) / 1e3, "dur": call["total_s"] * 1e6,
            "args": {**common, "bubble": call["bubble"], "workload": call.get("workload", {})}}]
    for what, step, chunk, t0, t1 in call.get("events", []):
        out.append({"ph": "X", "name": what, "cat": "compute" if what == "compute" else "wait",
                    "pid": pid, "tid": tid, "ts": (t0 - origin) / 1e3, "dur": (t1 - t0) / 1e3,
                    "args": {**common, "step": step, "chunk": chunk}})
    return out


def write_chrome_trace(calls: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(calls)), encoding="utf-8")
    return path
