"""Call timing: CUDA events per measured region, read once in finish(); host clocks elsewhere."""

from __future__ import annotations

import time

import pytest
import torch

from ringcompile.runtime import timing


class FakeGpu:
    """A pretend GPU clock: events read ``now_ms`` when recorded; reading them before a sync fails."""

    def __init__(self):
        self.now_ms = 0.0
        self.synced = False
        self.syncs = 0
        self.streams = []

    def event(self):
        gpu = self

        class Event:
            def record(self, stream=None):
                gpu.streams.append(stream)
                self.t = gpu.now_ms

            def synchronize(self):
                gpu.syncs += 1
                gpu.synced = True

            def elapsed_time(self, other):
                assert gpu.synced, "a CUDA event was read before the call's one synchronisation"
                return other.t - self.t

        return Event()


@pytest.fixture
def gpu(monkeypatch):
    fake = FakeGpu()
    monkeypatch.setattr(timing, "_new_event", fake.event)
    monkeypatch.setattr(timing, "_stream", lambda device: ("stream", str(device)))
    return fake


def test_cuda_timing_uses_events_and_synchronises_once_in_finish(gpu):
    t = timing.Timer(True, "ring", "forward", 0, 2, torch.device("cuda", 1))
    gpu.now_ms = 1.0
    with t.compute(0):
        gpu.now_ms += 5.0   # GPU time of step 0's kernels
        time.sleep(0.02)    # host time, which must not be what is reported
    with t.wait(1):
        gpu.now_ms += 2.0
    with t.compute(1):
        gpu.now_ms += 3.0
    with t.compute(1):
        gpu.now_ms += 1.0
    assert gpu.syncs == 0 and t.call.compute_s == 0.0  # nothing read while the ring runs
    gpu.now_ms += 0.5
    with timing.record() as calls:
        t.finish(False)
    assert gpu.syncs == 1
    assert calls == [t.call]
    assert [s.compute_s for s in t.call.steps] == pytest.approx([0.005, 0.004])
    assert [s.wait_s for s in t.call.steps] == pytest.approx([0.0, 0.002])
    assert t.call.total_s == pytest.approx(0.0125)  # from the start event (at 0 ms) to the end one
    assert t.call.bubble == pytest.approx(0.002 / 0.011)
    assert set(gpu.streams) == {("stream", "cuda:1")}  # the call's device, not the current one


def test_cpu_timing_uses_host_clocks_and_no_events(gpu):
    t = timing.Timer(True, "ring", "forward", 0, 2, torch.device("cpu"))
    with t.compute(0):
        time.sleep(0.01)
    t.finish(False)
    assert gpu.streams == [] and t.call.compute_s >= 0.009 and t.call.total_s >= t.call.compute_s


def test_disabled_timer_records_nothing_on_cuda(gpu):
    t = timing.Timer(False, "ring", "forward", 0, 2, torch.device("cuda"))
    with t.compute(0):
        pass
    t.finish(True)
    assert gpu.streams == [] and gpu.syncs == 0 and t.call.steps == []
