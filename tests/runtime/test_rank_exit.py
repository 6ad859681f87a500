"""A finished rank leaves with os._exit, after its results have crossed the queue."""

import multiprocessing as mp

from ringcompile.runtime.rank_exit import exit_rank


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
