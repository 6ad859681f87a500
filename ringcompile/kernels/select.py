"""Which block kernels run for a call: Triton on CUDA (or when forced), else a PyTorch path for the device.

Every block kernel pair has the signatures of ``reference.block_forward`` and
``reference.block_backward``; the runtime only ever calls through ``block_kernels``.

The PyTorch path depends on the device: CPU tensors get ``kernels.cpu`` (PyTorch's fused
CPU flash attention, which exists only on CPU); every other device gets ``kernels.generic``
(the reference math in device-generic torch ops). ``kernel="cpu"`` means "no Triton": on a
GPU it selects the generic kernels (logged once), never the CPU-only op.
"""

from __future__ import annotations

import torch

from ringcompile.errors import OptionError
from ringcompile.log import get_logger
from ringcompile.spec import AttentionSpec

from .kernel_set import BlockKernels

log = get_logger(__name__)

__all__ = ["BlockKernels", "block_kernels", "cpu_block_kernels", "generic_block_kernels",
           "pytorch_block_kernels"]

_NOTED: set[str] = set()


def block_kernels(spec: AttentionSpec, device: torch.device) -> BlockKernels:
    """The kernels for ``spec`` on ``device``, honouring ``spec.kernel`` ("auto", "cpu", "triton")."""
    if spec.kernel not in ("auto", "cpu", "triton"):
        raise OptionError(f"kernel must be 'auto', 'cpu' or 'triton', got {spec.kernel!r}")
    device = torch.device(device)
    if spec.kernel == "triton" or (spec.kernel == "auto" and device.type == "cuda"):
        from .triton import triton_block_kernels  # imported lazily: triton is heavy

        kernels = triton_block_kernels(spec, forced=spec.kernel == "triton")
        if kernels is not None:
            return kernels
    if spec.kernel == "cpu" and device.type != "cpu" and device.type not in _NOTED:
        _NOTED.add(device.type)
        log.info("kernel='cpu' on %s tensors: the device-generic PyTorch block kernels run (the CPU "
                 "kernels' fused op exists only on CPU)", device.type)
    return pytorch_block_kernels(spec, device)


def pytorch_block_kernels(spec: AttentionSpec, device: torch.device) -> BlockKernels:
    """The non-Triton kernels for ``device``: the CPU kernels on CPU, the generic ones elsewhere."""
    if torch.device(device).type == "cpu":
        return cpu_block_kernels(spec)
    return generic_block_kernels(spec)


def cpu_block_kernels(spec: AttentionSpec) -> BlockKernels:
    """The CPU block path: PyTorch's fused CPU attention where the mask allows, chunked math otherwise.

    CPU tensors only (the fused op has no CUDA kernel); ``block_kernels`` picks per device.
    """
    from . import cpu

    return BlockKernels("cpu", cpu.block_forward, cpu.block_backward, preferred_block=cpu.PREFERRED_BLOCK)


def generic_block_kernels(spec: AttentionSpec) -> BlockKernels:
    """Reference math in torch ops, chunked over queries: correct on any device (CUDA included)."""
    from . import generic

    return BlockKernels("generic", generic.block_forward, generic.block_backward)
