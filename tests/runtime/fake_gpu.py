"""A stand-in GPU for tests that run without one.

The "meta" device is not the CPU, so every device policy takes its GPU branch (the runtime and
the Triton launcher ask "is this the CPU?"), and it holds no values, so nothing can be read on
the host. (Fake CUDA tensors under FakeTensorMode cannot be sliced or copied without a CUDA
build.) ``recording_triton_kernels`` gives Triton block kernels whose compiled module is a
recorder, so the host side of every launch runs for real.
"""

from __future__ import annotations

import torch
from ringcompile.kernels.select import BlockKernels

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
