"""Spawn gloo ranks for multi-rank tests, with timeouts everywhere so a bug fails instead of hanging.

``run_ranks(body, world_size, timeout)`` starts ``world_size`` processes; each initialises a
gloo group on a free port, runs ``body(rank, world_size, *args)`` and pickles its return
value (or its traceback) to a file. The parent joins with a deadline, kills the ranks when it
passes, and returns the per-rank results (None for a rank that died without reporting).
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from ringcompile.runtime.spawned_ranks import free_port


class RankFailure(Exception):
    pass


def _entry(rank: int, world_size: int, port: int, out_dir: str, pg_timeout: float, body: Callable,
           args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout))
        result = {"ok": True, "value": body(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    os._exit(0)  # skip gloo teardown, which can block when a peer died


def run_ranks(body: Callable, world_size: int, timeout: float, *args: Any, pg_timeout: float = 30.0,
              allow_missing: tuple[int, ...] = ()) -> list[Any]:
    """Per-rank return values of ``body``; raises RankFailure on an exception, hang or lost rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        spawn = mp.get_context("spawn")
        port = free_port()
        procs = [spawn.Process(target=_entry, args=(r, world_size, port, out_dir, pg_timeout, body, args),
                               daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            if any(p.is_alive() for p in procs):
                raise RankFailure(f"ranks did not finish within {timeout} s (hang?)")
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results: list[Any] = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                if rank in allow_missing:
                    results.append(None)
                    continue
                raise RankFailure(f"rank {rank} exited without reporting")
            with open(path, "rb") as f:
                r = pickle.load(f)
            if not r["ok"]:
                raise RankFailure(f"rank {rank} raised:\n{r['error']}")
            results.append(r["value"])
        return results
