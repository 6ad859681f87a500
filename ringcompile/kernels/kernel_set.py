"""The ``BlockKernels`` type: one forward/backward pair with the contract of ``kernels.reference``.

It lives on its own so the selector (``kernels.select``) and the kernel providers
(``kernels.triton``) can both name it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class BlockKernels:
    """preferred_block: query/key tokens per block call that suit these kernels (None: no preference).

    The CPU kernels tile and skip internally, so callers should hand them whole chunks: cutting
    an 8192-token chunk into 512-token pairs costs ~40% more time in Python and merges.

    device_seed: the kernels take the op's dropout seed tensor as it is and read it on the device
    (Triton); otherwise callers read it into an int once per call (``dropout.seed_to_int``).
    """

    name: str
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    backward: Callable[..., tuple]
    preferred_block: int | None = None
    device_seed: bool = False
