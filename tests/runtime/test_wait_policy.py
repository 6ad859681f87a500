"""How torch.distributed work is waited for: no timeout on NCCL (the host must not block on the GPU),
an explicit timeout on gloo. Fake Work objects record what ``wait`` was called with."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from ringcompile import api
from ringcompile.errors import CommunicationError
from ringcompile.runtime import collectives
from ringcompile.runtime.communicator import RingCommunicator
from ringcompile.runtime.group import ResolvedGroup, backend_name, wait_work


class FakeGroup:
    def __init__(self, backend: str):
        self.backend = backend

    def name(self) -> str:
        return self.backend


class FakeWork:
    def __init__(self, calls: list, result=True):
        self.calls, self.result = calls, result

    def wait(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


NCCL, GLOO = FakeGroup("NCCL"), FakeGroup("gloo")


def _assert_waits(calls, group, timeout):
    assert calls, "nothing was waited for"
    for args, kwargs in calls:
        if group is GLOO:
            assert args == () and kwargs == {"timeout": datetime.timedelta(seconds=timeout)}
        else:
            assert args == () and kwargs == {}, "NCCL work must be waited for without a timeout"


@pytest.mark.parametrize("group", [NCCL, GLOO], ids=["nccl", "gloo"])
def test_wait_work(group):
    calls: list = []
    assert wait_work(FakeWork(calls), group, 7.0) is True
    _assert_waits(calls, group, 7.0)


def test_backend_name_of_unknown_objects_is_empty_and_waits_without_timeout():
    assert backend_name(object()) == "" and backend_name(NCCL) == "nccl"
    calls: list = []
    wait_work(FakeWork(calls), object(), 3.0)
    assert calls == [((), {})]


@pytest.fixture
def fake_dist(monkeypatch):
    """torch.distributed's collectives replaced by ones returning FakeWork (shared call log)."""
    calls: list = []

    def gather(outs, t, group=None, async_op=False):
        for o in outs:
            o.copy_(t)
        return FakeWork(calls)

    def reduce(t, group=None, async_op=False):
        return FakeWork(calls)

    def a2a(recv, send, group=None, async_op=False):
        recv.copy_(send)
        return FakeWork(calls)

    monkeypatch.setattr(dist, "all_gather", gather)
    monkeypatch.setattr(dist, "all_reduce", reduce)
    monkeypatch.setattr(dist, "all_to_all_single", a2a)
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: [FakeWork(calls) for _ in ops])
    monkeypatch.setattr(dist, "P2POp", lambda *a, **kw: (a, kw))
    monkeypatch.setattr(dist, "get_global_rank", lambda group, r: r)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    return calls


@pytest.mark.parametrize("group", [NCCL, GLOO], ids=["nccl", "gloo"])
def test_ring_communicator_waits_by_backend(fake_dist, group):
    comm = RingCommunicator(ResolvedGroup(group, 0, 2), timeout=11.0)
    x = torch.randn(2, 3)
    comm.ring_shift([x, x], 0).wait()
    comm.all_gather(x).wait()
    comm.all_reduce(x).wait()
    comm.all_to_all([x, x]).wait()
    assert len(fake_dist) == 4 + 3
    _assert_waits(fake_dist, group, 11.0)


@pytest.mark.parametrize("group", [NCCL, GLOO], ids=["nccl", "gloo"])
def test_sharding_collectives_wait_by_backend(fake_dist, monkeypatch, group):
    monkeypatch.setattr(collectives, "group_by_name", lambda name: group)
    x = torch.randn(1, 4, 3)
    collectives.gather_seq(x, 1, 1, 8, 8, "contiguous", "g", 13.0)
    _assert_waits(fake_dist, group, 13.0)


@pytest.mark.parametrize("group", [NCCL, GLOO], ids=["nccl", "gloo"])
def test_api_gather_waits_by_backend(fake_dist, group):
    x = torch.randn(2, 4)
    full = api._Gather.apply(x, 1, "contiguous", 8, ResolvedGroup(group, 0, 2), 17.0)
    assert full.shape == (2, 8)
    _assert_waits(fake_dist, group, 17.0)


def test_a_failed_wait_is_still_a_communication_error(fake_dist):
    class Broken(FakeWork):
        def wait(self, *args, **kwargs):
            raise RuntimeError("NCCL watchdog: collective timed out")

    comm = RingCommunicator(ResolvedGroup(NCCL, 0, 2), timeout=5.0)
    comm._start = lambda step, what, start: Broken([])
    with pytest.raises(CommunicationError, match="watchdog"):
        comm.all_reduce(torch.ones(2)).wait()
