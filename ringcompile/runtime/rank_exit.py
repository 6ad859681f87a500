"""Ending a spawned rank process without Python's interpreter finalization.

After ``destroy_process_group`` a gloo rank can still abort while the interpreter tears
itself down ("terminate called without an active exception", SIGABRT, about one run in 20
of ``ringcompile calibrate`` on the CI VM; PyTorch's gloo threads outlive the objects they
use). A rank whose work is done and reported has nothing left to finalize, so it leaves with
``os._exit`` once its result queues are flushed.
"""

from __future__ import annotations

import multiprocessing.util
import os
import sys
from collections.abc import Iterable
from typing import Any, NoReturn


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
