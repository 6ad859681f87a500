"""Spawned rank processes outside the test harness (demo, calibrate, benchmarks): a free port to
meet on, a join with a deadline that kills stragglers, and an exit without finalization.

After ``destroy_process_group`` a gloo rank can still abort while the interpreter tears
itself down ("terminate called without an active exception", SIGABRT, about one run in 20
of ``ringcompile calibrate`` on the CI VM; PyTorch's gloo threads outlive the objects they
use). A rank whose work is done and reported has nothing left to finalize, so it leaves with
``os._exit`` once its result queues are flushed.
"""

from __future__ import annotations

import multiprocessing.util
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``init_method=tcp://...``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_spawned(fn: Callable[..., Any], args: tuple, nprocs: int, timeout: float) -> bool:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; False (all killed) when they have not
    all finished within ``timeout`` seconds. A rank that fails raises in the caller, as
    ``torch.multiprocessing`` does."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            return False
    return True


def exit_rank(code: int = 0, queues: Iterable[Any] = ()) -> NoReturn:
    """Flush ``queues`` (multiprocessing queues this rank put results on) and stdio, run
    multiprocessing's own exit handlers (they release the semaphores and pools the rank made,
    e.g. for torch.compile), then exit."""
    for q in queues:
        q.close()
        q.join_thread()   # the feeder thread has handed every result to the pipe
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
