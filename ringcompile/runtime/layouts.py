"""Sequence layouts: which global token positions each rank holds, and moving tensors in and out.

``contiguous``: the padded sequence is cut into N equal chunks; rank r holds chunk r.
``zigzag``: it is cut into 2N chunks; rank r holds chunks r and 2N-1-r (in that order), so a
causal mask gives every rank the same amount of work.

Sequences whose length does not divide are padded at the end up to ``padded_length``;
the padding positions are masked by the runtime (keys at index >= seq_len never count).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringcompile.errors import OptionError, ShapeMismatchError

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str | None) -> str:
    """The layout name with None meaning "contiguous"; anything else raises OptionError."""
    layout = "contiguous" if layout is None else layout
    if layout not in LAYOUTS:
        raise OptionError(f"layout must be one of {list(LAYOUTS)} (or None for contiguous), got {layout!r}")
    return layout


def _check_world(world_size: int, rank: int | None = None) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise OptionError(f"world_size must be a positive int, got {world_size!r}")
    if rank is not None and not 0 <= rank < world_size:
        raise OptionError(f"rank must be in [0, {world_size}), got {rank!r}")


def chunks_per_rank(layout: str | None) -> int:
    """How many equal chunks of the padded sequence each rank holds."""
    return 2 if check_layout(layout) == "zigzag" else 1


def padded_length(seq_len: int, world_size: int, layout: str | None) -> int:
    """``seq_len`` rounded up to a multiple of N (contiguous) or 2N (zigzag)."""
    _check_world(world_size)
    if seq_len < 0:
        raise OptionError(f"seq_len must be >= 0, got {seq_len}")
    unit = world_size * chunks_per_rank(layout)
    return -(-int(seq_len) // unit) * unit


def local_chunks(padded_len: int, world_size: int, rank: int, layout: str | None) -> list[tuple[int, int]]:
    """Global [start, end) ranges held by ``rank``, in the order they sit in its local shard."""
    _check_world(world_size, rank)
    layout = check_layout(layout)
    unit = world_size * chunks_per_rank(layout)
    if padded_len % unit:
        raise ShapeMismatchError(
            f"padded length {padded_len} is not a multiple of {unit} for layout {layout!r} on "
            f"{world_size} ranks; pad it with padded_length(seq_len, world_size, layout)"
        )
    c = padded_len // unit
    if layout == "contiguous":
        return [(rank * c, (rank + 1) * c)]
    last = 2 * world_size - 1 - rank
    return [(rank * c, (rank + 1) * c), (last * c, (last + 1) * c)]


def local_indices(
    padded_len: int, world_size: int, rank: int, layout: str | None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Global positions of the local shard's tokens, as a LongTensor in local order."""
    parts = [torch.arange(s, e, device=device) for s, e in local_chunks(padded_len, world_size, rank, layout)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def global_order(padded_len: int, world_size: int, layout: str | None) -> list[tuple[int, int]]:
    """The chunks of every rank, rank by rank: the order of a rank-major concatenation of shards."""
    out: list[tuple[int, int]] = []
    for r in range(world_size):
        out.extend(local_chunks(padded_len, world_size, r, layout))
    return out


def pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero-pad ``x`` at the end of ``dim`` up to ``length`` (no copy when already that long)."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n == length:
        return x
    if n > length:
        raise ShapeMismatchError(f"cannot pad dim {dim} of length {n} down to {length}")
    shape = list(x.shape)
    shape[dim] = length - n
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def shard_tensor(
    x: torch.Tensor, dim: int, world_size: int, rank: int, layout: str | None, seq_len: int | None = None,
) -> torch.Tensor:
    """``rank``'s shard of the full tensor ``x`` along ``dim`` (padded first when needed).

    ``seq_len`` is the true length (defaults to ``x.shape[dim]``); positions past it are zero padding.
    Differentiable (slices and cat only).
    """
    dim = dim % x.dim()
    seq_len = x.shape[dim] if seq_len is None else seq_len
    if seq_len > x.shape[dim]:
        raise ShapeMismatchError(f"seq_len {seq_len} exceeds the tensor's length {x.shape[dim]} on dim {dim}")
    total = padded_length(seq_len, world_size, layout)
    x = pad_to(x.narrow(dim, 0, seq_len), dim, total)
    parts = [x.narrow(dim, s, e - s) for s, e in local_chunks(total, world_size, rank, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_tensor(
    shards: Sequence[torch.Tensor], dim: int, layout: str | None, seq_len: int,
) -> torch.Tensor:
    """The full tensor (first ``seq_len`` positions) from every rank's shard, given in rank order."""
    world_size = len(shards)
    _check_world(world_size)
    dim = dim % shards[0].dim()
    local = shards[0].shape[dim]
    for r, s in enumerate(shards):
        if s.shape[dim] != local:
            raise ShapeMismatchError(f"shard of rank {r} has length {s.shape[dim]} on dim {dim}, "
                                     f"rank 0 has {local}: every rank must hold the same length")
    total = local * world_size
    if total % (world_size * chunks_per_rank(layout)) or seq_len > total:
        raise ShapeMismatchError(f"{world_size} shards of length {local} cannot hold seq_len {seq_len} "
                                 f"in layout {check_layout(layout)!r}")
    pieces: list[tuple[int, torch.Tensor]] = []
    for r, s in enumerate(shards):
        offset = 0
        for start, end in local_chunks(total, world_size, r, layout):
            pieces.append((start, s.narrow(dim, offset, end - start)))
            offset += end - start
    pieces.sort(key=lambda p: p[0])
    return torch.cat([p for _, p in pieces], dim=dim).narrow(dim, 0, seq_len)
