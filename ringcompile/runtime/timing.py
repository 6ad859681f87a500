"""Per-call timing of the ring: compute and wait seconds per step, and the bubble.

Records are kept when the spec asks (``record_timing``) or while ``record()`` is active.
The bubble is the fraction of the ring's time spent waiting on transfers:
wait / (compute + wait). Benchmarks read the records; the library never prints them.

On CUDA, host clocks would measure kernel *launch* time as compute and the GPU's backlog as
wait, so each measured region is bracketed by two CUDA events on the device's current stream
instead, and the events are read once, in ``finish()`` (one synchronisation per recorded call,
none while the ring runs). Elsewhere ``time.perf_counter`` is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

_LOCK = threading.Lock()
_ACTIVE: list[list[CallTiming]] = []
RECORDS: list[CallTiming] = []  # calls recorded because spec.record_timing was set
MAX_RECORDS = 10_000


@dataclasses.dataclass
class StepTiming:
    step: int
    compute_s: float = 0.0
    wait_s: float = 0.0


@dataclasses.dataclass
class CallTiming:
    """One strategy call on one rank."""

    strategy: str
    phase: str  # "forward" or "backward"
    rank: int
    world_size: int
    steps: list[StepTiming] = dataclasses.field(default_factory=list)
    total_s: float = 0.0

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s for s in self.steps)

    @property
    def wait_s(self) -> float:
        return sum(s.wait_s for s in self.steps)

    @property
    def bubble(self) -> float:
        busy = self.compute_s + self.wait_s
        return self.wait_s / busy if busy > 0 else 0.0

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "phase": self.phase, "rank": self.rank,
                "world_size": self.world_size, "total_s": self.total_s, "compute_s": self.compute_s,
                "wait_s": self.wait_s, "bubble": self.bubble,
                "steps": [dataclasses.asdict(s) for s in self.steps]}


def _new_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def _stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device)


class Timer:
    """Accumulates one call's step timings; a no-op when nobody listens.

    ``device``: where the call's work runs; a CUDA device switches to event timing.
    """

    def __init__(self, enabled: bool, strategy: str, phase: str, rank: int, world_size: int,
                 device: torch.device | None = None) -> None:
        self.enabled = enabled or bool(_ACTIVE)
        self.call = CallTiming(strategy, phase, rank, world_size)
        self.device = torch.device(device) if device is not None else None
        self.on_cuda = self.enabled and self.device is not None and self.device.type == "cuda"
        self._events: list[tuple[int, str, Any, Any]] = []  # (step, field, start, end), read in finish
        self._start = time.perf_counter()
        self._start_event = self._record() if self.on_cuda else None

    def _record(self) -> Any:
        event = _new_event()
        event.record(_stream(self.device))
        return event

    def _step(self, step: int) -> StepTiming:
        while len(self.call.steps) <= step:
            self.call.steps.append(StepTiming(len(self.call.steps)))
        return self.call.steps[step]

    def compute(self, step: int) -> contextlib.AbstractContextManager[None]:
        """Time spent computing in ``step``."""
        return self._measure(step, "compute_s")

    def wait(self, step: int) -> contextlib.AbstractContextManager[None]:
        """Time spent waiting on a transfer in ``step`` (the bubble)."""
        return self._measure(step, "wait_s")

    @contextlib.contextmanager
    def _measure(self, step: int, field: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.on_cuda:
            start = self._record()
            try:
                yield
            finally:
                self._step(step)
                self._events.append((step, field, start, self._record()))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timing = self._step(step)
            setattr(timing, field, getattr(timing, field) + time.perf_counter() - t0)

    def _read_events(self) -> None:
        """The one synchronisation of a CUDA-timed call: wait for its last event, read them all."""
        end = self._record()
        end.synchronize()
        for step, field, start, stop in self._events:
            timing = self._step(step)
            setattr(timing, field, getattr(timing, field) + start.elapsed_time(stop) / 1000.0)
        self._events.clear()
        self.call.total_s = self._start_event.elapsed_time(end) / 1000.0

    def finish(self, to_records: bool) -> None:
        if not self.enabled:
            return
        if self.on_cuda:
            self._read_events()
        else:
            self.call.total_s = time.perf_counter() - self._start
        with _LOCK:
            for sink in _ACTIVE:
                sink.append(self.call)
            if to_records:
                RECORDS.append(self.call)
                del RECORDS[:-MAX_RECORDS]


@contextlib.contextmanager
def record() -> Iterator[list[CallTiming]]:
    """Collect a CallTiming for every strategy call made while active (all threads)."""
    sink: list[CallTiming] = []
    with _LOCK:
        _ACTIVE.append(sink)
    try:
        yield sink
    finally:
        with _LOCK:
            _ACTIVE.remove(sink)


def clear() -> None:
    with _LOCK:
        RECORDS.clear()
