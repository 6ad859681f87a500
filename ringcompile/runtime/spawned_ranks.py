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


def spawn_and_collect(target: Callable[..., Any], world_size: int, timeout: float,
                      args_of: Callable[[int, str, Any], tuple], prefix: str = "ringcompile_") -> list[Any]:
    """Start ``world_size`` spawned processes ``target(*args_of(rank, init_file, queue))`` that meet on
    a fresh ``file://`` init file and each put ``(rank, result)`` on ``queue``; collect the results
    until all arrived, the ranks all died, or ``timeout`` seconds passed, then reap the processes.
    A rank that never reported gives None (never hangs)."""
    import queue as queue_module
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix=prefix)
    os.close(fd)
    os.unlink(init_file)
    procs = [ctx.Process(target=target, args=args_of(r, init_file, out), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: list[Any] = [None] * world_size
    deadline = time.monotonic() + timeout
    while any(r is None for r in results) and time.monotonic() < deadline:
        try:
            rank, res = out.get(timeout=1.0)
            results[rank] = res
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs) and out.empty():
                break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return results


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
