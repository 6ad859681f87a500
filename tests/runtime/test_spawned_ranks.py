"""Spawned ranks: a finished rank leaves with os._exit after its results have crossed the queue;
a join with a deadline kills ranks that do not finish."""

import multiprocessing as mp
import time

from ringcompile.runtime.spawned_ranks import exit_rank, run_spawned


def _sleeper(rank: int, seconds: float) -> None:
    time.sleep(seconds)


def _child(out, payload: bytes) -> None:
    out.put(payload)     # large enough to need the queue's feeder thread
    exit_rank(3, queues=[out])
    raise AssertionError("exit_rank returned")   # never reached


def test_results_arrive_and_the_exit_code_is_kept():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    payload = bytes(range(256)) * 4096           # 1 MiB: larger than a pipe buffer
    proc = ctx.Process(target=_child, args=(out, payload))
    proc.start()
    got = out.get(timeout=60)
    proc.join(timeout=60)
    assert got == payload
    assert proc.exitcode == 3


def test_run_spawned_returns_on_success_and_kills_stragglers():
    assert run_spawned(_sleeper, (0.0,), 2, timeout=60.0)
    t0 = time.monotonic()
    assert not run_spawned(_sleeper, (600.0,), 2, timeout=3.0)
    assert time.monotonic() - t0 < 30.0
