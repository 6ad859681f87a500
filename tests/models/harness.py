"""Spawn gloo CPU ranks once and run a list of named cases in each (shared by the shard tests).

Each case is a module-level function ``case(rank, world) -> dict`` importable in the child;
``run_cases`` returns {case name: [result of rank 0, result of rank 1, ...]}; an exception in a
case is returned as {"error": traceback} so one failing case does not hide the others.
"""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import tempfile
import traceback
from collections.abc import Sequence

import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, module: str, names: Sequence[str], out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    mod = importlib.import_module(module)
    for name in names:
        try:
            torch.manual_seed(0)
            result = getattr(mod, name)(rank, world)
        except Exception:  # noqa: BLE001 - reported to the parent test
            result = {"error": traceback.format_exc()}
        out.put((name, rank, result))
    dist.barrier()
    dist.destroy_process_group()


def run_cases(module: str, names: Sequence[str], world: int = 2, timeout: float = 240.0) -> dict:
    """Run ``names`` from ``module`` on ``world`` spawned ranks; kill them after ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="ring_init_")
    os.close(fd)
    os.unlink(init_file)
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, module, list(names), out), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[str, list] = {n: [None] * world for n in names}
    want = len(names) * world
    got = 0
    import time

    deadline = time.monotonic() + timeout
    while got < want:
        left = deadline - time.monotonic()
        if left <= 0 or not any(p.is_alive() for p in procs) and out.empty():
            break
        try:
            name, rank, result = out.get(timeout=min(left, 5.0))
        except queue.Empty:
            continue
        results[name][rank] = result
        got += 1
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    for name in names:
        for r in range(world):
            if results[name][r] is None:
                results[name][r] = {"error": f"rank {r} produced no result (crash or {timeout:g} s timeout)"}
    return results
