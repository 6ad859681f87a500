"""A stand-in GPU for tests that run without one.

The "meta" device is not the CPU, so every device policy takes its GPU branch (the runtime and
the Triton launcher ask "is this the CPU?"), and it holds no values, so nothing can be read on
the host. (Fake CUDA tensors under FakeTensorMode cannot be sliced or copied without a CUDA
build.) ``recording_triton_kernels`` gives Triton block kernels whose compiled module is a
recorder, so the host side of every launch runs for real. ``EchoCommunicator`` is a rank whose
peers send back what it sends, so a strategy's host side runs in one process.
"""

from __future__ import annotations

import torch

from ringcompile.kernels.select import BlockKernels
from ringcompile.runtime.communicator import Communicator, Pending

GPU = torch.device("meta")


class _RecordingKernel:
    """Stands in for a compiled Triton kernel: ``kernel[grid](*args)`` records the launch."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid))


def recording_triton_kernels(monkeypatch) -> tuple[BlockKernels, list]:
    """(Triton block kernels, the list their launches are recorded in as (kernel, grid))."""
    from ringcompile.kernels.triton import launch

    launches: list = []
    module = type("Module", (), {n: _RecordingKernel(n, launches)
                                 for n in ("block_fwd", "block_bwd_dkdv", "block_bwd_dq")})()
    # _module returns (compiled module, the extra kernel tensors)
    monkeypatch.setattr(launch.TritonBlocks, "_module", lambda self, *a, **k: (module, []))
    blocks = launch.TritonBlocks(forced=False)
    return BlockKernels("triton", blocks.forward, blocks.backward, device_seed=True), launches


class EchoCommunicator(Communicator):
    """Rank ``rank`` of ``world_size`` whose peers send back what it sends (same shapes; on the stand-in
    GPU there are no values to get wrong): every exchange of a strategy runs, in one process."""

    timeout = 30.0
    device = GPU

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def ring_shift(self, tensors, step, channel=0, what="K/V") -> Pending:
        return Pending(lambda: [t.clone() for t in tensors])

    def all_gather(self, tensor, step=0, what="all_gather") -> Pending:
        return Pending(lambda: [tensor.clone() for _ in range(self.world_size)])

    def all_reduce(self, tensor, step=0, what="all_reduce") -> Pending:
        return Pending(lambda: [tensor.clone()])

    def all_to_all(self, chunks, step=0, what="all_to_all") -> Pending:
        return Pending(lambda: [c.clone() for c in chunks])
