"""Resolve what the user called "group" to (process group, rank, world size).

Accepted: None (the default group when torch.distributed is initialised, else a single
process), a ``ProcessGroup``, or a ``DeviceMesh`` plus ``mesh_dim`` (one dimension of a 2-D
mesh, so sequence parallelism can sit beside data parallelism).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import torch.distributed as dist

from ringcompile.errors import OptionError


@dataclasses.dataclass(frozen=True)
class ResolvedGroup:
    """group is None exactly when the call is single-process (world_size 1 or no distributed)."""

    group: Any
    rank: int
    world_size: int

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def global_rank(self, group_rank: int) -> int:
        """The global rank of ``group_rank`` in this group (what P2P calls take)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


SINGLE = ResolvedGroup(None, 0, 1)


@dataclasses.dataclass(frozen=True)
class TwoLevelGroup(ResolvedGroup):
    """A 2-D group: ``group``/``rank``/``world_size`` are the flat world (rank = outer * inner + inner
    rank, once the ranks agree), ``outer`` and ``inner`` this rank's groups along the two dimensions."""

    outer: ResolvedGroup = SINGLE
    inner: ResolvedGroup = SINGLE


def group_key(group: ResolvedGroup) -> tuple:
    """The group by what its members agree on (global ranks, world size), never by object address."""
    if group.group is None:
        return ("single", group.world_size)
    try:
        ranks = tuple(dist.get_process_group_ranks(group.group))
    except Exception:  # a fake group in tests, or an older torch: its size is what every member knows
        ranks = ()
    return ("group", group.world_size, ranks)


def _is_mesh(obj: Any) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(obj, DeviceMesh)


def _flat_group(mesh: Any, dims: tuple) -> Any:
    """The process group of every rank of a 2-D context-parallel mesh, flattened outer-major."""
    if mesh.ndim == 2 and mesh.mesh.numel() == dist.get_world_size():
        return dist.group.WORLD
    flatten = getattr(mesh[dims], "_flatten", None)
    if flatten is None:  # pragma: no cover - torch without DeviceMesh flattening
        raise OptionError("a two-level mesh_dim needs the mesh to span the whole world on this torch "
                          f"(mesh {tuple(mesh.shape)}, world {dist.get_world_size()})")
    return flatten().get_group(0)


def resolve_two_level(mesh: Any, mesh_dim: tuple) -> TwoLevelGroup | ResolvedGroup:
    """``mesh_dim=(outer, inner)`` of a DeviceMesh: the flat group plus the two dimensions' groups.

    Whether every rank sees the same shape and order is checked collectively before the hybrid
    exchange (``two_level.check_mesh_agrees``), so a rank that disagrees fails with the others.
    """
    if not _is_mesh(mesh):
        raise OptionError(f"mesh_dim={mesh_dim!r} (a pair of dimensions) needs group= a 2-D DeviceMesh, "
                          f"got {type(mesh).__name__}")
    if len(mesh_dim) != 2 or mesh_dim[0] == mesh_dim[1]:
        raise OptionError(f"mesh_dim must be one dimension or a pair (outer, inner) of two different ones, "
                          f"got {mesh_dim!r}")
    outer, inner = (resolve_group(mesh, d) for d in mesh_dim)
    names = tuple(d if isinstance(d, str) else mesh.mesh_dim_names[d] for d in mesh_dim)
    world = resolve_group(_flat_group(mesh, names))
    if world.is_single:
        return SINGLE
    return TwoLevelGroup(world.group, world.rank, world.world_size, outer, inner)


TWO_LEVEL_DIMS = ("cp_outer", "cp_inner")
_FACTORED: dict[tuple, Any] = {}


def factored_mesh(group: Any, node_size: int, timeout: float = 300.0) -> Any:
    """A 1-D group (None: the default one) as a 2-D DeviceMesh ("cp_outer", "cp_inner") of
    world / node_size nodes x node_size ranks, in group-rank order; built once per (ranks, node size).

    The ranks first all-gather their ``node_size`` (with ``timeout``) on every call, cached mesh or
    not (a rank skipping it while another runs it would mismatch the collectives): building the
    mesh is a collective, so ranks that disagree raise ShapeMismatchError instead of hanging in it.
    """
    import torch

    from ringcompile.errors import CommunicationError, ShapeMismatchError

    flat = resolve_group(group)
    if not isinstance(node_size, int) or node_size < 1:
        raise OptionError(f"node_size must be a positive int, got {node_size!r}")
    if flat.is_single:
        return None
    ranks = tuple(dist.get_process_group_ranks(flat.group))
    if len(ranks) != dist.get_world_size():
        raise OptionError("node_size= factors the whole world only: pass a 2-D DeviceMesh with "
                          "mesh_dim=(outer, inner) for a sub-group")
    key = (ranks, node_size)
    device_type = "cuda" if "nccl" in backend_name(flat.group) else "cpu"
    mine = torch.tensor([node_size], dtype=torch.int64, device=device_type)
    sizes = [torch.empty_like(mine) for _ in range(flat.world_size)]
    work = dist.all_gather(sizes, mine, group=flat.group, async_op=True)
    try:
        wait_work(work, flat.group, timeout)
    except Exception as e:
        raise CommunicationError(f"rank {flat.rank}: the node_size agreement all_gather failed or timed out "
                                 f"after {timeout:g} s ({e})") from e
    seen = [int(s.item()) for s in sizes]
    if len(set(seen)) != 1:
        raise ShapeMismatchError(f"ranks disagree on node_size before building the two-level group: "
                                 f"{dict(enumerate(seen))}; pass the same node_size on every rank")
    if flat.world_size % node_size:
        raise OptionError(f"node_size {node_size} does not divide the world size {flat.world_size}")
    if key in _FACTORED:
        return _FACTORED[key]
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh(device_type, torch.tensor(ranks).view(-1, node_size), mesh_dim_names=TWO_LEVEL_DIMS)
    _FACTORED[key] = mesh
    return mesh


def resolve_group(group: Any = None, mesh_dim: int | str | tuple | None = None) -> ResolvedGroup:
    """(group, rank, world_size); world size 1 or no initialised group gives ``SINGLE``."""
    if isinstance(mesh_dim, (tuple, list)):
        return resolve_two_level(group, tuple(mesh_dim))
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return SINGLE
        group = dist.group.WORLD
    elif _is_mesh(group):
        mesh = group
        if mesh_dim is None:
            if mesh.ndim != 1:
                raise OptionError(f"group is a {mesh.ndim}-D DeviceMesh: say which dimension holds the "
                                  f"sequence with mesh_dim= (an int or one of {mesh.mesh_dim_names})")
            mesh_dim = 0
        try:
            group = mesh.get_group(mesh_dim)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise OptionError(f"mesh_dim {mesh_dim!r} is not a dimension of the DeviceMesh "
                              f"(names {mesh.mesh_dim_names}, ndim {mesh.ndim}): {e}") from e
    elif not isinstance(group, dist.ProcessGroup):
        raise OptionError(f"group must be None, a torch.distributed ProcessGroup or a DeviceMesh, "
                          f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise OptionError("a process group was given but torch.distributed is not initialised")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise OptionError("this process is not a member of the given process group")
    if world == 1:
        return SINGLE
    return ResolvedGroup(group, rank, world)


def backend_name(group: Any) -> str:
    """The group's backend in lower case ("gloo", "nccl", "cpu:gloo,cuda:nccl"...); "" if unknown."""
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # not a registered group (a test double): ask the object itself
        name = getattr(group, "name", None)
        try:
            return str(name() if callable(name) else name or "").lower()
        except Exception:
            return ""


def wait_work(work: Any, group: Any, timeout: float) -> Any:
    """Wait for a torch.distributed ``Work``: the one place that decides how.

    On gloo, an explicit timeout (gloo has no watchdog; the caller turns a timeout into a
    ``CommunicationError``). On NCCL and every other backend, ``wait()`` with no argument:
    with a timeout, ProcessGroupNCCL blocks the host until the GPU work finishes, so the CPU
    could never run ahead of the GPU; without one, the current stream waits on the collective
    and the process group's own timeout and watchdog still abort a hung collective.
    """
    if backend_name(group) == "gloo":
        return work.wait(timeout=datetime.timedelta(seconds=timeout))
    return work.wait()
