"""Custom ops that sync are tagged cudagraph-unsafe (where torch has the tag); their work runs
under ``torch.cuda.device(q.device)``, which is a no-op off CUDA."""

from __future__ import annotations

import contextlib

import pytest
import torch

import ringcompile.runtime.collectives  # noqa: F401 - registers the sharding ops
from ringcompile import mods, op_support
from ringcompile.spec import AttentionSpec, register_spec

SYNCING_OPS = ["ring_attention", "ring_attention_backward", "reduce_partial", "grad_reduce", "slice_seq",
               "to_local", "scatter_local", "gather_seq", "shift_seq", "shift_seq_backward"]


@pytest.mark.parametrize("name", SYNCING_OPS)
def test_syncing_ops_are_cudagraph_unsafe_where_torch_has_the_tag(name):
    tags = getattr(torch.ops.ringcompile, name).default.tags
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in tags
    else:  # older torch (2.11 on the GPU machine may lack it): registration must still work
        assert op_support.SYNCING == {}


def test_device_guard_enters_the_tensors_gpu_and_is_a_no_op_elsewhere(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with op_support.device_guard(torch.device("cuda", 3)):
        pass
    with op_support.device_guard(torch.device("cpu")), op_support.device_guard(torch.device("meta")):
        pass
    assert entered == [torch.device("cuda", 3)]


def test_ring_ops_run_their_work_under_the_guard_of_q_device(monkeypatch):
    guarded = []
    real = op_support.device_guard

    def recording(device):
        guarded.append(torch.device(device))
        return real(device)

    monkeypatch.setattr(op_support, "device_guard", recording)
    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True) for _ in range(3))
    key = register_spec(AttentionSpec(mask=mods.causal(), name="guarded"))
    out, _ = torch.ops.ringcompile.ring_attention(q, k, v, [], [], 6, key)
    out.sum().backward()
    assert guarded == [torch.device("cpu")] * 2  # forward and backward op
