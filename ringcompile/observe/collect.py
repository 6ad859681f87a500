"""Per-process collection of ring calls for ``ringcompile trace``.

A traced command runs with ``RINGCOMPILE_TRACE_DIR`` set; every process that imports
ringcompile then appends each finished ring call as one JSON line to
``<dir>/calls-<host>-<pid>.jsonl``. One line per call, written at once, because spawned
ranks leave through ``os._exit`` and never run ``atexit`` handlers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from ..runtime import timing

TRACE_ENV = "RINGCOMPILE_TRACE_DIR"
_LOCK = threading.Lock()


class _JsonlSink:
    """Appends calls to one file per process; opened lazily so idle processes leave none."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def path(self) -> Path:
        return self.directory / f"calls-{socket.gethostname()}-{os.getpid()}.jsonl"

    def __call__(self, call: timing.CallTiming) -> None:
        line = json.dumps(call.as_dict()) + "\n"
        with _LOCK:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)


def start(directory: str | os.PathLike) -> None:
    """Start writing this process's ring calls under ``directory``."""
    timing.TRACE_SINK = _JsonlSink(Path(directory))


def stop() -> None:
    timing.TRACE_SINK = None


@contextlib.contextmanager
def collecting(directory: str | os.PathLike) -> Iterator[Path]:
    """Collect this process's ring calls under ``directory`` while active."""
    previous = timing.TRACE_SINK
    start(directory)
    try:
        yield Path(directory)
    finally:
        timing.TRACE_SINK = previous


def start_from_env() -> None:
    """Called when ringcompile is imported: trace when the environment asks for it."""
    directory = os.environ.get(TRACE_ENV)
    if directory:
        start(directory)
