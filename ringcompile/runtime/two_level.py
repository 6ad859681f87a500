"""A two-level group: ``outer`` x ``inner`` ranks (nodes x GPUs per node), for the hybrid strategy.

The flattened rank is ``outer_rank * inner + inner_rank``, the order of a flattened 2-D
DeviceMesh ("cp_outer", "cp_inner"); shards are cut in that order. ``TwoLevelCommunicator``
carries three communicators: ``world`` (all ranks, flat: metadata checks, score-extra
reductions), ``outer`` (the ranks with this inner rank: the ring) and ``inner`` (the ranks of
this node: the all-to-all). Its own collectives are the world's, so code written for a flat
communicator (the metadata check) runs unchanged on it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from ringcompile.errors import OptionError, ShapeMismatchError

from .communicator import Communicator, MailboxCollectives, Pending

Tensor = torch.Tensor


class TwoLevelCommunicator(Communicator):
    def __init__(self, world: Communicator, outer: Communicator, inner: Communicator) -> None:
        self.world, self.outer, self.inner = world, outer, inner
        self.rank = world.rank
        self.world_size = world.world_size
        self.timeout = world.timeout
        self.device = getattr(world, "device", None)

    @property
    def shape(self) -> tuple[int, int]:
        """(outer, inner): nodes x ranks per node."""
        return self.outer.world_size, self.inner.world_size

    def ring_shift(self, tensors: Sequence[Tensor], step: int, channel: int = 0,
                   what: str = "K/V") -> Pending:
        return self.world.ring_shift(tensors, step, channel, what)

    def all_gather(self, tensor: Tensor, step: int = 0, what: str = "all_gather") -> Pending:
        return self.world.all_gather(tensor, step, what)

    def all_reduce(self, tensor: Tensor, step: int = 0, what: str = "all_reduce") -> Pending:
        return self.world.all_reduce(tensor, step, what)

    def all_to_all(self, chunks: Sequence[Tensor], step: int = 0, what: str = "all_to_all") -> Pending:
        return self.world.all_to_all(chunks, step, what)


def check_mesh_agrees(comm: TwoLevelCommunicator) -> None:
    """Every rank must see the same (outer, inner) shape and sit at ``outer_rank * inner + inner_rank``.

    One all_gather over the flat world, before any exchange on the sub-groups: ranks that factor
    the world differently would otherwise exchange with the wrong peers (a hang or wrong result).
    On CUDA (where reading the answer waits for the device) a passed check is remembered per
    group layout, like the metadata check; on the CPU it runs every call.
    """
    outer, inner = comm.shape
    o, i = comm.outer.rank, comm.inner.rank
    outer_members = _flat_members(comm.outer, comm.world)
    inner_members = _flat_members(comm.inner, comm.world)
    grouped = (outer_members == [x * inner + i for x in range(outer)]
               and inner_members == [o * inner + x for x in range(inner)])
    me = [outer, inner, o, i, comm.rank, int(grouped)]
    device = comm.device or torch.device("cpu")
    key = None
    if device.type == "cuda":
        key = (_world_key(comm.world), tuple(me), tuple(outer_members), tuple(inner_members))
        with _LOCK:
            if key in _PASSED:
                return
    rows = comm.world.all_gather(torch.tensor(me, dtype=torch.int64, device=device), 0,
                                 "two-level mesh check (before the exchange)").wait()
    table = [[int(x) for x in r.cpu().tolist()] for r in rows]
    problems = []
    for rank, (o_n, i_n, o, i, flat, grouped) in enumerate(table):
        if (o_n, i_n) != (outer, inner):
            problems.append(f"rank {rank} has mesh shape (outer={o_n}, inner={i_n}) where rank {comm.rank} "
                            f"has (outer={outer}, inner={inner})")
        elif o * i_n + i != flat:
            problems.append(f"rank {rank} sits at (outer {o}, inner {i}), which flattens to {o * i_n + i}, "
                            f"not its rank {flat}")
        elif not grouped:
            problems.append(f"rank {rank}'s outer/inner groups are not the ranks sharing its inner/outer "
                            "index (mesh dimensions swapped?)")
    if problems:
        raise ShapeMismatchError(
            "ranks disagree on the two-level group before the hybrid exchange (seen from rank "
            f"{comm.rank}): " + "; ".join(problems) + ". Pass the same mesh and mesh_dim=(outer, inner) on "
            "every rank, with the outer dimension first")
    if key is not None:
        with _LOCK:
            _PASSED.add(key)


_PASSED: set = set()
_LOCK = threading.Lock()


def _world_key(world: Communicator) -> tuple:
    group = getattr(world, "group", None)
    if group is None:
        return ("single", world.world_size)
    import torch.distributed as dist

    try:
        return ("group", tuple(dist.get_process_group_ranks(group)))
    except Exception:  # a test double: its size is what every member knows
        return ("group", world.world_size)


class Alone(Communicator):
    """A level of one rank (a 1 x N or N x 1 group): every exchange returns this rank's own data."""

    rank, world_size = 0, 1

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def ring_shift(self, tensors: Sequence[Tensor], step: int, channel: int = 0,
                   what: str = "K/V") -> Pending:
        return Pending(lambda: [t.clone() for t in tensors])

    def all_gather(self, tensor: Tensor, step: int = 0, what: str = "all_gather") -> Pending:
        return Pending(lambda: [tensor.clone()])

    def all_reduce(self, tensor: Tensor, step: int = 0, what: str = "all_reduce") -> Pending:
        return Pending(lambda: [tensor.detach().clone()])

    def all_to_all(self, chunks: Sequence[Tensor], step: int = 0, what: str = "all_to_all") -> Pending:
        return Pending(lambda: [chunks[0].clone()])


def _flat_members(level: Communicator, world: Communicator) -> list[int]:
    """The flat (world) ranks of ``level``'s members, in the level's rank order."""
    if isinstance(level, SubCommunicator):
        return list(level.members)
    group = getattr(level, "group", None)
    if group is None:  # a rank alone at this level
        return [world.rank]
    import torch.distributed as dist

    return [dist.get_group_rank(world.group, dist.get_global_rank(group, j)) for j in range(level.world_size)]


class SubCommunicator(MailboxCollectives):
    """The ranks ``members`` (world ranks, in sub-rank order) of a simulated world, as their own group.

    Messages travel on the parent's queues in their own namespace ``tag``, so the outer ring,
    the inner all-to-all and the world's collectives never read each other's messages.
    """

    def __init__(self, parent: Any, members: Sequence[int], tag: str) -> None:
        self.parent, self.members, self.tag = parent, list(members), tag
        self.rank = self.members.index(parent.rank)
        self.world_size = len(self.members)
        self.timeout = parent.timeout

    def _send(self, dst: int, channel: Any, tensors: Sequence[Tensor]) -> None:
        self.parent._send(self.members[dst], (self.tag, channel), tensors)

    def _recv(self, src: int, channel: Any, step: int, what: str) -> list[Tensor]:
        return self.parent._recv(self.members[src], (self.tag, channel), step, f"{self.tag} {what}")



def two_level_communicator(group: Any, timeout: float, device: torch.device | None) -> TwoLevelCommunicator:
    """Communicators over a ``group.TwoLevelGroup`` (a level of size 1 is a rank alone)."""
    from .communicator import RingCommunicator

    def level(g):
        return Alone(timeout) if g.is_single else RingCommunicator(g, timeout, device=device)

    return TwoLevelCommunicator(RingCommunicator(group, timeout, device=device), level(group.outer),
                                level(group.inner))


def split_simulated(comm: Any, inner: int) -> TwoLevelCommunicator:
    """A simulated world communicator seen as (world // inner) x ``inner`` ranks."""
    n = comm.world_size
    if not isinstance(inner, int) or inner < 1 or n % inner:
        raise OptionError(f"inner size (ranks per node) must be a positive divisor of the world size {n}, "
                          f"got {inner!r}")
    o, i = divmod(comm.rank, inner)
    outer_members = [x * inner + i for x in range(n // inner)]
    inner_members = [o * inner + x for x in range(inner)]
    return TwoLevelCommunicator(comm, SubCommunicator(comm, outer_members, "outer"),
                                SubCommunicator(comm, inner_members, "inner"))
