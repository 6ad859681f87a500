"""Tiles per kernel (forward, dK/dV, dQ), chosen from what Triton's compiler reports.

Each kernel has its own candidates, most preferred first, per head dim and dtype. The first
candidate of each list is what launches use on a GPU; it was picked by compiling offline for
sm_90 (``offline.resources``: ``metadata.shared`` and ptxas spill counts) and is checked by
``tests/kernels/test_triton_tiles.py`` on every run: shared memory <= the H100 limit and no
register spills. At launch, a candidate that still does not fit (``OutOfResources``, another
GPU or Triton version) is dropped and the next one runs. The dK/dV kernel's kv tile
(BLOCK_N) is the M dimension of its dots, the dQ kernel's q tile (BLOCK_M) of its dots: both
are kept at 64 or 128 (Hopper wgmma) for 16-bit dtypes.
"""

from __future__ import annotations

import dataclasses

import torch

KERNELS = ("fwd", "dkdv", "dq")
H100_SHARED_MEMORY = 232448  # bytes per block (227 KB) on sm_90


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch settings for one kernel."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def _d_class(head_dim: int) -> int:
    padded = 16
    while padded < head_dim:
        padded *= 2
    return 64 if padded <= 64 else padded if padded <= 256 else 512


# (kernel, padded head dim class, 16-bit?) -> candidates, most preferred first (see module docstring)
_TABLE: dict[tuple[str, int, bool], tuple[Tiles, ...]] = {
    ("fwd", 64, True): (Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 2), Tiles(64, 32, 4, 2)),
    ("fwd", 128, True): (Tiles(128, 64, 8, 3), Tiles(64, 64, 4, 2), Tiles(64, 32, 4, 2)),
    ("fwd", 256, True): (Tiles(64, 64, 8, 2), Tiles(64, 32, 4, 2), Tiles(32, 32, 4, 1)),
    ("dkdv", 64, True): (Tiles(32, 128, 4, 2), Tiles(32, 64, 4, 2), Tiles(16, 64, 4, 1)),
    ("dkdv", 128, True): (Tiles(32, 128, 8, 2), Tiles(32, 64, 4, 2), Tiles(16, 64, 4, 1)),
    ("dkdv", 256, True): (Tiles(32, 64, 8, 1), Tiles(16, 64, 4, 1), Tiles(16, 32, 4, 1)),
    ("dq", 64, True): (Tiles(128, 32, 4, 2), Tiles(64, 32, 4, 2), Tiles(64, 16, 4, 1)),
    ("dq", 128, True): (Tiles(128, 32, 8, 2), Tiles(64, 32, 4, 2), Tiles(64, 16, 4, 1)),
    ("dq", 256, True): (Tiles(64, 32, 8, 1), Tiles(64, 16, 4, 1), Tiles(32, 16, 4, 1)),
    ("fwd", 64, False): (Tiles(64, 32, 4, 2), Tiles(32, 32, 4, 1), Tiles(16, 16, 4, 1)),
    ("fwd", 128, False): (Tiles(64, 32, 4, 2), Tiles(32, 32, 4, 1), Tiles(16, 16, 4, 1)),
    ("fwd", 256, False): (Tiles(32, 32, 4, 1), Tiles(16, 32, 4, 1), Tiles(16, 16, 4, 1)),
    ("dkdv", 64, False): (Tiles(32, 64, 4, 1), Tiles(16, 32, 4, 1), Tiles(16, 16, 4, 1)),
    ("dkdv", 128, False): (Tiles(16, 64, 4, 1), Tiles(16, 32, 4, 1), Tiles(16, 16, 4, 1)),
    ("dkdv", 256, False): (Tiles(16, 32, 4, 1), Tiles(16, 16, 4, 1)),
    ("dq", 64, False): (Tiles(64, 32, 4, 1), Tiles(32, 16, 4, 1), Tiles(16, 16, 4, 1)),
    ("dq", 128, False): (Tiles(64, 16, 4, 1), Tiles(32, 16, 4, 1), Tiles(16, 16, 4, 1)),
    ("dq", 256, False): (Tiles(32, 16, 4, 1), Tiles(16, 16, 4, 1)),
}
SMALLEST = Tiles(16, 16, 4, 1)


def candidates(kernel: str, head_dim: int, dtype: torch.dtype, preferred: Tiles | None = None
               ) -> tuple[Tiles, ...]:
    """Tiles to try for ``kernel``, best first; a planner/user ``preferred`` tile leads but is
    still subject to the same launch-time resource check and fallbacks."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    half = dtype in (torch.bfloat16, torch.float16)
    d = min(_d_class(head_dim), 256)
    table = _TABLE[(kernel, d, half)]
    lead = (preferred,) if preferred is not None and preferred not in table else ()
    out = (*lead, *table)
    return out if SMALLEST in out else (*out, SMALLEST)


def chosen(kernel: str, head_dim: int, dtype: torch.dtype) -> Tiles:
    """The tiles a GPU launch of ``kernel`` uses first (what the offline test checks)."""
    return candidates(kernel, head_dim, dtype)[0]
