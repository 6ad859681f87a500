"""Attention-probability dropout whose keep mask is a pure function of global indices.

The keep decision for one (batch, head, query, key) entry is a counter-based hash of
``(seed, b, h, q_idx, kv_idx)`` with GLOBAL token indices, so the same entries are dropped
under every layout, block size, ring step and rank count, and a reference can recompute the
mask for the full sequence. No RNG state is consumed.

The hash, specified on unsigned 32-bit lanes (``mix32`` is Chris Wellons' "lowbias32";
``M = 0xFFFFFFFF``, ``*`` wraps mod 2**32, ``>>`` is a logical shift)::

    mix32(x):  x ^= x >> 16;  x = x * 0x7FEB352D;  x ^= x >> 15;  x = x * 0x846CA68B;  x ^= x >> 16
    seed32   = (seed ^ (seed >> 32)) & M            # seed is a non-negative int64
    row      = mix32(mix32(mix32(mix32(seed32 ^ 0x9E3779B9) ^ b) ^ h) ^ q_idx)
    col      = mix32(kv_idx ^ 0x85EBCA6B)
    u        = mix32(row ^ col) >> 8                # 24 uniform bits
    keep     = u >= threshold(p),  threshold(p) = min(2**24, round(p * 2**24))

Indices enter as their low 32 bits. ``h`` is the GLOBAL head: a kernel that holds a group of
heads (hybrid's all-to-all gives an inner rank heads [h0, h0 + H/N_i)) is passed its seed as a
``HeadOffsetSeed(seed, h0)``, and the hash adds ``h0`` to the tensor's head index (the
PyTorch kernels here; the Triton kernels take ``h0`` as their ``drop_head_offset`` argument).
The wrapper holds the seed as given, an int or the op's one-element tensor, so shifting the
heads never reads a device seed on the host: kernels that hash on the device take the tensor
as it is, the others read it once per call (``seed_to_int`` keeps the offset).
Kept probabilities are scaled by ``1 / (1 - p)``. Here
the lanes live in int64 tensors: products of two 32-bit values wrap mod 2**64 in int64,
which leaves the low 32 bits exact, and every value is masked back to 32 bits before a
shift, so a Triton kernel on uint32 computes the same bits.
"""

from __future__ import annotations

import dataclasses

import torch

from ringcompile.errors import RingCompileError

MASK32 = 0xFFFFFFFF
MUL_1 = 0x7FEB352D
MUL_2 = 0x846CA68B
INV_MUL_1 = 0x1D69E2A5  # MUL_1 ** -1 mod 2**32 (mix32 is a bijection on 32 bits: ``unmix32``)
INV_MUL_2 = 0x43021123  # MUL_2 ** -1 mod 2**32
SEED_SALT = 0x9E3779B9
KV_SALT = 0x85EBCA6B
UNIFORM_BITS = 24


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: a tensor seed has no truth value
class HeadOffsetSeed:
    """A dropout seed for a tensor whose head 0 is global head ``head_offset``.

    ``seed`` is kept as given (an int, or a one-element integer tensor that may live on the GPU),
    so building one never waits for the device."""

    seed: int | torch.Tensor
    head_offset: int

    def __int__(self) -> int:
        """The seed as an int (a host read when it is a tensor)."""
        return int(seed_to_int(self.seed))


Seed = int | torch.Tensor | HeadOffsetSeed


def with_head_offset(seed: Seed | None, h0: int) -> Seed | None:
    """``seed`` for a tensor whose head 0 is global head ``h0`` of the heads ``seed`` hashes (no read)."""
    if seed is None:
        return None
    return HeadOffsetSeed(base_seed(seed), head_offset(seed) + int(h0))


def head_offset(seed: object) -> int:
    """The global head of a kernel tensor's head 0 under ``seed`` (0 for a plain seed)."""
    return seed.head_offset if isinstance(seed, HeadOffsetSeed) else 0


def base_seed(seed: Seed | None) -> int | torch.Tensor | None:
    """The seed without its head offset: an int, the op's tensor, or None."""
    return seed.seed if isinstance(seed, HeadOffsetSeed) else seed


def seed_on_device(seed: Seed | None) -> bool:
    """Whether reading ``seed`` into an int would read a tensor (wait for its device)."""
    return isinstance(base_seed(seed), torch.Tensor)


def mix32(x):
    """lowbias32 on int64 tensors (or Python ints) holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MUL_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_2) & MASK32
    return x ^ (x >> 16)


def unmix32(x):
    """The inverse of ``mix32`` (on int64 tensors or Python ints in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = (x * INV_MUL_2) & MASK32
    x = x ^ (x >> 15)
    x = x ^ (x >> 30)
    x = (x * INV_MUL_1) & MASK32
    return x ^ (x >> 16)


def threshold(p: float) -> int:
    """Hash values (24 bits) below this are dropped."""
    return min(1 << UNIFORM_BITS, int(round(p * (1 << UNIFORM_BITS))))


def check_dropout(p: float, seed: Seed | None) -> None:
    if not 0.0 <= p < 1.0:
        raise RingCompileError(f"dropout probability must be in [0, 1), got {p}")
    if p > 0.0 and seed is None:
        raise RingCompileError("dropout_p > 0 needs a dropout_seed (an int) so every rank drops the same "
                               "entries; pass dropout_seed=")


def seed_to_int(seed: Seed | None) -> int | HeadOffsetSeed | None:
    """The seed with an int value: an int from an int or a one-element integer tensor (the op's
    ``dropout_seed``, one host read), a ``HeadOffsetSeed`` holding that int for a ``HeadOffsetSeed``."""
    if isinstance(seed, HeadOffsetSeed):
        if isinstance(seed.seed, torch.Tensor):
            return HeadOffsetSeed(seed_to_int(seed.seed), seed.head_offset)
        return seed
    if seed is None or isinstance(seed, int):
        return seed
    return int(seed.reshape(-1).narrow(0, 0, 1).reshape(()).item())  # one read of the first element


def row_base(seed: int) -> int:
    """``mix32(seed32 ^ SEED_SALT)``: the seed's share of every row hash, as a Python int."""
    seed32 = (seed ^ (seed >> 32)) & MASK32
    return mix32(seed32 ^ SEED_SALT)


def batch_row_seed(seed: int | torch.Tensor | None, b: int) -> int | torch.Tensor | None:
    """A seed under which batch 0 of a tensor is hashed as batch ``b`` under ``seed``.

    The hash starts ``row_base(seed) ^ b``; ``row_base`` is a bijection of 32-bit seeds, so the seed
    ``s`` with ``row_base(s) == row_base(seed) ^ b`` exists (a 32-bit value) and every kernel set runs
    one batch row of a call, sliced out, with the keep mask of its original row (``runtime.dead_rows``).
    A tensor seed (read on the device by the Triton kernels) stays a one-element int64 tensor."""
    if seed is None or b == 0:
        return seed
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(-1)[:1].to(torch.int64)
        base = mix32(((s ^ (s >> 32)) & MASK32) ^ SEED_SALT)
        return unmix32(base ^ (b & MASK32)) ^ SEED_SALT
    return unmix32(row_base(int(seed)) ^ (b & MASK32)) ^ SEED_SALT


def _lanes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int64) & MASK32


def keep_mask(
    seed: int | HeadOffsetSeed, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
    p: float,
) -> torch.Tensor:
    """Bool keep mask, broadcast over the index tensors (e.g. the ``mods.index_grid`` shapes); ``h``
    is the tensor's head index, shifted to the global head by a ``HeadOffsetSeed``."""
    h0 = head_offset(seed)
    if h0:
        h = h + h0
    seed = int(seed_to_int(base_seed(seed)))
    # the seed's part is mixed on the host: a Python int enters the tensor op as a scalar, with no
    # host-to-device copy
    row = mix32(mix32(mix32(row_base(seed) ^ _lanes(b)) ^ _lanes(h)) ^ _lanes(q))
    col = mix32(_lanes(kv) ^ KV_SALT)
    u = mix32(row ^ col) >> (32 - UNIFORM_BITS)
    return u >= threshold(p)


def dropout_scale(
    seed: int | HeadOffsetSeed, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, p: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """keep / (1 - p) as ``dtype``: the factor applied to normalised probabilities."""
    return keep_mask(seed, b, h, q, kv, p).to(dtype) * (1.0 / (1.0 - p))
