"""Triton tile sizes for the planner's Plan, from what the compiler reports (not a model of it).

The generated kernels choose tiles per kernel themselves (``kernels/triton/tiles.py``, from a
table that ``kernels/triton/tile_search.py`` measured by compiling for sm_90 offline:
``metadata.shared`` and ``ptxas -v`` spills). ``Plan.tiles`` is the forward kernel's choice for
the profile's shared-memory limit (``Profile.shared_memory``, 232448 B on the h100 profiles =
``kernels.triton.tiles.SM90_SHARED_LIMIT``): the most preferred measured candidate whose
shared memory fits that limit and that spills nothing, for every specialisation class.
Profiles without shared memory (CPU, TPU) get ``DEFAULT``, what the interpreter runs.

Fallback, only when no measured candidate fits (a GPU with less shared memory than any
measured choice needs): the old upper bound ``shared_memory_bytes`` (the Q tile plus
``stages`` K and V tiles). It over-estimates the compiler (229 KB predicted where Triton 3.9
reports 65 KB for the forward at 128x128, 8 warps, 3 stages, D=128 bf16), so what it accepts
fits; it knows nothing about registers, which is why it is not the first choice.
"""

from __future__ import annotations

import functools

from .profiles import DTYPE_BYTES, Profile

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the fallback, most preferred first
_FALLBACK = (
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 2),
    (64, 32, 4, 2),
    (32, 32, 4, 1),
    (16, 16, 4, 1),
)
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
_TORCH_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "float64": "float64"}


def shared_memory_bytes(block_m: int, block_n: int, stages: int, head_dim: int, elem: int) -> int:
    """Upper bound on the shared memory of one forward program: the Q tile plus ``stages`` K and V
    tiles (the fallback's check; the compiler's figures are lower)."""
    return elem * head_dim * (block_m + 2 * block_n * stages)


def measured_forward(head_dim: int, dtype: str, shared_memory: int
                     ) -> tuple[tuple[int, int, int, int], int] | None:
    """(tiles, measured shared bytes) of the forward's measured choice within ``shared_memory``, or
    None."""
    import torch

    from ringcompile.kernels.triton import tiles as ktiles

    pick = ktiles.chosen_measured("fwd", head_dim, getattr(torch, _TORCH_DTYPES[dtype]), shared_memory,
                                  tile_class="heavy")
    if pick is None:
        return None
    t = pick.tiles
    return (t.block_m, t.block_n, t.num_warps, t.num_stages), pick.shared


@functools.cache
def _choose(head_dim: int, dtype: str, shared_memory: int) -> tuple[int, int, int, int]:
    if shared_memory <= 0:
        d = DEFAULT
        return d["BLOCK_M"], d["BLOCK_N"], d["num_warps"], d["num_stages"]
    if dtype in ("bfloat16", "float16", "float32"):
        hit = measured_forward(head_dim, dtype, shared_memory)
        if hit is not None:
            return hit[0]
    elem = DTYPE_BYTES[dtype]
    padded = 1 << max(4, (head_dim - 1).bit_length())      # Triton tiles need a power-of-two D
    for bm, bn, warps, stages in _FALLBACK:
        if elem >= 4 and bm * bn > 64 * 64:                  # fp32/fp64 tiles need twice the registers
            continue
        if shared_memory_bytes(bm, bn, stages, padded, elem) <= shared_memory:
            return bm, bn, warps, stages
    return _FALLBACK[-1]


def choose_tiles(head_dim: int, dtype: str, profile: Profile) -> dict[str, int]:
    bm, bn, warps, stages = _choose(int(head_dim), dtype, int(profile.shared_memory))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
