"""``ringcompile trace``: run a command with ring tracing on, then merge and explain the trace.

``ringcompile trace --output DIR -- python train.py ...`` (or ``-- torchrun ...``) runs the
command with ``RINGCOMPILE_TRACE_DIR=DIR/ranks`` so every rank records its ring calls, then
writes ``DIR/trace.json`` (Chrome / Perfetto, a process per rank), ``DIR/timeline.png``
(when matplotlib is installed) and ``DIR/summary.txt`` (measured vs predicted, advice).
``ringcompile trace --from DIR/ranks --output DIR`` only merges.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..errors import MissingDependencyError, RingCompileError
from .advice import format_summaries, summarize
from .chrome import load_calls, write_chrome_trace
from .collect import TRACE_ENV
from .timeline import draw_timeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="trace the ring steps of a command: trace.json, timeline.png, advice",
                       description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for trace.json, timeline.png, summary.txt")
    p.add_argument("--from", dest="source", default=None,
                   help="merge calls already recorded in this folder instead of running a command")
    p.add_argument("--profile", default=None, help="cost-model profile for predictions (default: per device)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run (e.g. python train.py)")
    p.set_defaults(func=run_trace)


def run_trace(args: argparse.Namespace) -> int:
    out = Path(args.output)
    command = [c for c in args.command if c != "--"] if args.command else []
    if args.source is None and not command:
        print("error: give a command after --, or --from a folder of recorded calls", file=sys.stderr)
        return 2
    raw = Path(args.source) if args.source else out / "ranks"
    rc = 0
    if command:
        raw.mkdir(parents=True, exist_ok=True)
        for old in raw.glob("calls-*.jsonl"):
            old.unlink()
        print(f"tracing: {' '.join(command)}", file=sys.stderr)
        rc = subprocess.call(command, env={**os.environ, TRACE_ENV: str(raw)})
        if rc:
            print(f"the traced command exited with {rc}; merging what it recorded", file=sys.stderr)
    try:
        written = write_outputs(raw, out, args.profile)
    except RingCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return rc or 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    print((out / "summary.txt").read_text(encoding="utf-8"))
    return rc


def write_outputs(raw: str | Path, out: str | Path, profile: str | None = None) -> dict[str, Path | str]:
    """Merge the calls under ``raw`` into ``out``: trace.json, summary.txt, timeline.png (if possible)."""
    out = Path(out)
    calls = load_calls(raw)
    written: dict[str, Path | str] = {"trace": write_chrome_trace(calls, out / "trace.json")}
    summary = out / "summary.txt"
    summary.write_text(format_summaries(summarize(calls, profile)), encoding="utf-8")
    written["summary"] = summary
    try:
        written["timeline"] = draw_timeline(calls, out / "timeline.png")
    except MissingDependencyError as exc:
        written["timeline"] = f"not drawn: {exc}"
    return written
