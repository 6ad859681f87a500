"""Per-call timing of the ring: compute and wait seconds per step, and the bubble.

Records are kept when the spec asks (``record_timing``), while ``record()`` is active, or
while a trace is collected (``ringcompile trace``, see ``ringcompile.observe``). The bubble is
the fraction of the ring's time spent waiting on transfers: wait / (compute + wait).
Benchmarks read the records; the library never prints them.

While a ``torch.profiler`` session is active, every timed region is also a named profiler
range (``ringcompile/<site>/<strategy>/<phase>/step<i>/chunk<j>/<what>``), so a user's own
Chrome trace or TensorBoard shows the ring's steps with no extra code.

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
from collections.abc import Callable, Iterator
from typing import Any

import torch

_LOCK = threading.Lock()
_ACTIVE: list[list[CallTiming]] = []
RECORDS: list[CallTiming] = []  # calls recorded because spec.record_timing was set
MAX_RECORDS = 10_000
# called with every finished CallTiming while set (the trace collector); None = nobody
TRACE_SINK: Callable[[CallTiming], None] | None = None
# wall-clock ns minus perf_counter ns: turns event times into timestamps comparable across ranks
EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


@dataclasses.dataclass
class StepTiming:
    step: int
    compute_s: float = 0.0
    wait_s: float = 0.0


@dataclasses.dataclass
class TimedEvent:
    """One timed region: what it was, where in the ring, and when (perf_counter ns)."""

    what: str  # "compute", "wait K/V", "wait dK/dV", "collective", ...
    step: int
    chunk: int
    start_ns: int
    end_ns: int


@dataclasses.dataclass
class CallTiming:
    """One strategy call on one rank.

    ``workload`` holds the call's sizes (seq_len, batch, heads, kv_heads, head_dim, dtype,
    causal, block_size) so a trace summary can ask the cost model what it predicts.
    """

    strategy: str
    phase: str  # "forward" or "backward"
    rank: int
    world_size: int
    steps: list[StepTiming] = dataclasses.field(default_factory=list)
    total_s: float = 0.0
    site: str = ""
    workload: dict[str, Any] = dataclasses.field(default_factory=dict)
    events: list[TimedEvent] = dataclasses.field(default_factory=list)
    start_ns: int = 0

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
                "wait_s": self.wait_s, "bubble": self.bubble, "site": self.site,
                "workload": dict(self.workload), "start_ns": self.start_ns + EPOCH_OFFSET_NS,
                "steps": [dataclasses.asdict(s) for s in self.steps],
                "events": [[e.what, e.step, e.chunk, e.start_ns + EPOCH_OFFSET_NS, e.end_ns + EPOCH_OFFSET_NS]
                           for e in self.events]}


def _profiling() -> bool:
    """Whether a torch.profiler / autograd profiler session is recording right now."""
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


def _new_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


def _stream(device: torch.device) -> Any:
    return torch.cuda.current_stream(device)


class Timer:
    """Accumulates one call's step timings; a no-op when nobody listens.

    ``device``: where the call's work runs; a CUDA device switches to event timing.
    """

    def __init__(self, enabled: bool, strategy: str, phase: str, rank: int, world_size: int,
                 device: torch.device | None = None, site: str = "",
                 workload: dict[str, Any] | None = None) -> None:
        self.profiling = _profiling()
        self.tracing = TRACE_SINK is not None
        self.enabled = enabled or bool(_ACTIVE) or self.tracing or self.profiling
        self.call = CallTiming(strategy, phase, rank, world_size, site=site, workload=dict(workload or {}))
        self.device = torch.device(device) if device is not None else None
        self.on_cuda = self.enabled and self.device is not None and self.device.type == "cuda"
        # (step, field, what, chunk, start, end), read in finish()
        self._events: list[tuple[int, str, str, int, Any, Any]] = []
        self._start = time.perf_counter()
        self.call.start_ns = time.perf_counter_ns()
        self._start_event = self._record() if self.on_cuda else None

    def _record(self) -> Any:
        event = _new_event()
        event.record(_stream(self.device))
        return event

    def _step(self, step: int) -> StepTiming:
        while len(self.call.steps) <= step:
            self.call.steps.append(StepTiming(len(self.call.steps)))
        return self.call.steps[step]

    def compute(self, step: int, chunk: int = 0) -> contextlib.AbstractContextManager[None]:
        """Time spent computing in ``step``."""
        return self._measure(step, "compute_s", "compute", chunk)

    def wait(self, step: int, what: str = "K/V", chunk: int = 0) -> contextlib.AbstractContextManager[None]:
        """Time spent waiting on a transfer of ``what`` in ``step`` (the bubble)."""
        return self._measure(step, "wait_s", f"wait {what}", chunk)

    @contextlib.contextmanager
    def _measure(self, step: int, field: str, what: str, chunk: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        name = f"ringcompile/{self.call.site or 'attention'}/{self.call.strategy}/{self.call.phase}/" \
               f"step{step}/chunk{chunk}/{what}"
        profiler_range = (torch.autograd.profiler.record_function(name, f"rank={self.call.rank}")
                          if self.profiling else contextlib.nullcontext())
        if self.on_cuda:
            start = self._record()
            try:
                with profiler_range:
                    yield
            finally:
                self._step(step)
                self._events.append((step, field, what, chunk, start, self._record()))
            return
        t0 = time.perf_counter_ns()
        try:
            with profiler_range:
                yield
        finally:
            t1 = time.perf_counter_ns()
            timing = self._step(step)
            setattr(timing, field, getattr(timing, field) + (t1 - t0) * 1e-9)
            if self.tracing:
                self.call.events.append(TimedEvent(what, step, chunk, t0, t1))

    def _read_events(self) -> None:
        """The one synchronisation of a CUDA-timed call: wait for its last event, read them all."""
        end = self._record()
        end.synchronize()
        for step, field, what, chunk, start, stop in self._events:
            timing = self._step(step)
            setattr(timing, field, getattr(timing, field) + start.elapsed_time(stop) / 1000.0)
            if self.tracing:  # device time, placed on the host clock from the call's start
                t0 = self.call.start_ns + int(self._start_event.elapsed_time(start) * 1e6)
                t1 = self.call.start_ns + int(self._start_event.elapsed_time(stop) * 1e6)
                self.call.events.append(TimedEvent(what, step, chunk, t0, t1))
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
        trace_sink = TRACE_SINK
        if trace_sink is not None:
            trace_sink(self.call)


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
