"""Triton tile sizes for the block kernels: the largest tiles whose pipelined loads fit in shared memory.

A forward program keeps a BLOCK_M x D query tile resident and streams BLOCK_N x D key and
value tiles through ``num_stages`` buffers; bigger tiles mean fewer programs and more reuse,
as long as they fit. Profiles without shared memory (CPU, TPU) get the conservative default,
which is what the Triton interpreter runs on CPU.
"""

from __future__ import annotations

import functools

from .profiles import DTYPE_BYTES, Profile

# (BLOCK_M, BLOCK_N, num_warps, num_stages), most preferred first
_CANDIDATES = (
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 2),
    (64, 32, 4, 2),
    (32, 32, 4, 1),
    (16, 16, 4, 1),
)
DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def shared_memory_bytes(block_m: int, block_n: int, stages: int, head_dim: int, elem: int) -> int:
    """Shared memory of one forward program: the Q tile plus ``stages`` K and V tiles."""
    return elem * head_dim * (block_m + 2 * block_n * stages)


@functools.cache
def _choose(head_dim: int, dtype: str, shared_memory: int) -> tuple[int, int, int, int]:
    if shared_memory <= 0:
        d = DEFAULT
        return d["BLOCK_M"], d["BLOCK_N"], d["num_warps"], d["num_stages"]
    elem = DTYPE_BYTES[dtype]
    padded = 1 << max(4, (head_dim - 1).bit_length())      # Triton tiles need a power-of-two D
    for bm, bn, warps, stages in _CANDIDATES:
        if elem >= 4 and bm * bn > 128 * 64:                 # fp32/fp64 tiles need twice the registers
            continue
        if shared_memory_bytes(bm, bn, stages, padded, elem) <= shared_memory:
            return bm, bn, warps, stages
    bm, bn, warps, stages = _CANDIDATES[-1]
    return bm, bn, warps, stages


def choose_tiles(head_dim: int, dtype: str, profile: Profile) -> dict[str, int]:
    bm, bn, warps, stages = _choose(int(head_dim), dtype, int(profile.shared_memory))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
