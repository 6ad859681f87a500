"""Which block kernels run for a call: Triton on CUDA (or when forced), the CPU path otherwise.

Every block kernel pair has the signatures of ``reference.block_forward`` and
``reference.block_backward``; the runtime only ever calls through ``block_kernels``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ringcompile.errors import OptionError
from ringcompile.spec import AttentionSpec

from . import reference


@dataclasses.dataclass(frozen=True)
class BlockKernels:
    """preferred_block: query/key tokens per block call that suit these kernels (None: no preference).

    The CPU kernels tile and skip internally, so callers should hand them whole chunks: cutting
    an 8192-token chunk into 512-token pairs costs ~40% more time in Python and merges.
    """

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple]
    preferred_block: int | None = None


REFERENCE = BlockKernels("reference", reference.block_forward, reference.block_backward)


def block_kernels(spec: AttentionSpec, device: torch.device) -> BlockKernels:
    """The kernels for ``spec`` on ``device``, honouring ``spec.kernel`` ("auto", "cpu", "triton")."""
    if spec.kernel not in ("auto", "cpu", "triton"):
        raise OptionError(f"kernel must be 'auto', 'cpu' or 'triton', got {spec.kernel!r}")
    if spec.kernel == "triton" or (spec.kernel == "auto" and device.type == "cuda"):
        from .triton import triton_block_kernels  # imported lazily: triton is heavy

        kernels = triton_block_kernels(spec, forced=spec.kernel == "triton")
        if kernels is not None:
            return kernels
    return cpu_block_kernels(spec)


def cpu_block_kernels(spec: AttentionSpec) -> BlockKernels:
    """The CPU block path: PyTorch's fused CPU attention where the mask allows, chunked math otherwise."""
    from . import cpu

    return BlockKernels("cpu", cpu.block_forward, cpu.block_backward, preferred_block=cpu.PREFERRED_BLOCK)
