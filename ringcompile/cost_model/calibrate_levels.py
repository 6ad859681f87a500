"""Measure the two links of a two-level group (inside a node, between nodes) for a profile.

The world is factored as ``nodes x node_size`` in the flattened order the hybrid strategy
uses (rank = node * node_size + local). Each level is measured the way hybrid uses it:

* the ring hop: every rank sends to its next peer and receives from its previous one at
  once (all links busy, as in a ring step) - inside a node (peers node * n + (i +- 1) % n)
  and across nodes (peers ((node +- 1) % nodes) * n + i, the hybrid's outer ring);
* ``all_to_all_single`` over the level's group (the node's ranks; the ranks sharing a local
  index).

Times are the slowest rank's median (a ring step waits for its slowest link), fitted to
``t = alpha + bytes / W``; the all-to-all efficiency is its fitted rate over the ring hop's,
counting the (n - 1) / n of the buffer that leaves each rank. ``measure_levels_here`` runs in
an initialised process group (spawned CPU ranks, or every rank of a ``torchrun`` job, where the
levels are real nodes); ``measure_levels`` spawns the ranks on this host.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import torch

from ringcompile.errors import CommunicationError, OptionError

from .fits import fit_link
from .profiles import Profile

LEVEL_SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)
KINDS = ("intra_p2p", "intra_a2a", "inter_p2p", "inter_a2a")


@dataclasses.dataclass(frozen=True)
class LevelLinks:
    """Fitted (latency s, bandwidth bytes/s, all-to-all efficiency) inside a node and between nodes."""

    node_size: int
    world_size: int
    intra: tuple[float, float, float]
    inter: tuple[float, float, float]
    samples: dict[str, list[tuple[int, float]]]


def check_factoring(world_size: int, node_size: int) -> int:
    """Nodes in the world; OptionError unless both levels have at least 2 ranks to measure."""
    if (not isinstance(node_size, int) or node_size < 2 or world_size % node_size
            or world_size // node_size < 2):
        raise OptionError(f"a two-level calibration needs world size = nodes x node size with both >= 2 "
                          f"(got world size {world_size}, node size {node_size!r}); e.g. 4 ranks as 2 x 2")
    return world_size // node_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest_median(times: list[float], device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(fn, repeat: int, device: torch.device) -> float:
    import torch.distributed as dist

    times = []
    for i in range(repeat + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i:  # the first run warms up connections and buffers
            times.append(time.perf_counter() - t0)
    return _slowest_median(times, device)


def _ring_hop(send: torch.Tensor, recv: torch.Tensor, nxt: int, prev: int, odd: bool) -> None:
    import torch.distributed as dist

    ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prev)]
    if odd:  # pairs post in opposite orders, so two ranks that are each other's peer never both wait
        ops.reverse()
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def measure_levels_here(node_size: int, repeat: int = 5, sizes: tuple[int, ...] = LEVEL_SIZES,
                        device: torch.device | None = None) -> dict[str, list[tuple[int, float]]]:
    """{kind: [(bytes, seconds)]} for ``KINDS``, on every rank of the initialised default group
    (collective: every rank must call it with the same arguments)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    nodes = check_factoring(world, node_size)
    device = torch.device("cpu") if device is None else torch.device(device)
    node, local = divmod(rank, node_size)
    # every rank creates every group, in the same order (new_group is collective)
    inner_groups = [dist.new_group([o * node_size + i for i in range(node_size)]) for o in range(nodes)]
    outer_groups = [dist.new_group([o * node_size + i for o in range(nodes)]) for i in range(node_size)]
    levels = {
        "intra": (node * node_size + (local + 1) % node_size, node * node_size + (local - 1) % node_size,
                  local % 2 == 1, inner_groups[node], node_size),
        "inter": (((node + 1) % nodes) * node_size + local, ((node - 1) % nodes) * node_size + local,
                  node % 2 == 1, outer_groups[local], nodes),
    }
    rows: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
    for nbytes in sizes:
        for level, (nxt, prev, odd, group, width) in levels.items():
            send = torch.randn(max(1, nbytes // 4), device=device)
            recv = torch.empty_like(send)
            def hop(s=send, r=recv, a=nxt, b=prev, o=odd) -> None:
                _ring_hop(s, r, a, b, o)

            rows[f"{level}_p2p"].append((send.numel() * 4, _timed(hop, repeat, device)))
            per_peer = max(1, nbytes // (4 * width))
            a2a_in = torch.randn(per_peer * width, device=device)
            a2a_out = torch.empty_like(a2a_in)
            moved = per_peer * 4 * (width - 1)   # bytes that leave this rank
            rows[f"{level}_a2a"].append(
                (moved, _timed(lambda i=a2a_in, o=a2a_out, g=group: dist.all_to_all_single(o, i, group=g),
                               repeat, device)))
    return rows


def fit_levels(rows: dict[str, list[tuple[int, float]]], node_size: int, world_size: int) -> LevelLinks:
    """Latency, bandwidth and all-to-all efficiency per level from ``measure_levels_here`` rows."""
    fitted = {}
    for level in ("intra", "inter"):
        latency, bandwidth = fit_link(rows[f"{level}_p2p"])
        _, a2a_bw = fit_link(rows[f"{level}_a2a"])
        fitted[level] = (latency, bandwidth, min(1.0, a2a_bw / bandwidth))
    return LevelLinks(node_size, world_size, fitted["intra"], fitted["inter"], rows)


def _levels_worker(rank: int, port: int, backend: str, world: int, node_size: int, repeat: int, sizes,
                   result_path: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        rows = measure_levels_here(node_size, repeat, sizes)
        if rank == 0:
            with open(result_path, "w") as fh:
                fh.write("\n".join(f"{k} {n} {t!r}" for k, pts in rows.items() for n, t in pts))
    finally:
        dist.destroy_process_group()
    from ringcompile.runtime.spawned_ranks import exit_rank

    exit_rank(0)


def measure_levels(node_size: int, world_size: int | None = None, backend: str = "gloo", repeat: int = 5,
                   sizes: tuple[int, ...] = LEVEL_SIZES, timeout: float = 120.0) -> LevelLinks:
    """Spawn ``world_size`` (default 2 x ``node_size``) CPU ranks on this host as nodes x node_size
    and measure both levels (on one host both are loopback: this checks the procedure, a torchrun
    job over real nodes measures real links)."""
    import tempfile

    from ringcompile.runtime.spawned_ranks import free_port, run_spawned

    world = 2 * node_size if world_size is None else world_size
    check_factoring(world, node_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "levels.txt")
        args = (free_port(), backend, world, node_size, repeat, sizes, path)
        if not run_spawned(_levels_worker, args, world, timeout):
            raise CommunicationError(f"two-level link measurement over {backend} ({world} ranks as "
                                     f"{world // node_size} x {node_size}) did not finish in {timeout:.0f} s")
        rows: dict[str, list[tuple[int, float]]] = {k: [] for k in KINDS}
        with open(path) as fh:
            for line in fh:
                kind, n, t = line.split()
                rows[kind].append((int(n), float(t)))
    return fit_levels(rows, node_size, world)


def with_levels(base: Profile, links: LevelLinks, name: str | None = None, source: str = "") -> Profile:
    """``base``'s compute numbers with the measured two-level links (``link_*`` = the intra link)."""
    (ilat, ibw, ieff), (olat, obw, oeff) = links.intra, links.inter
    return dataclasses.replace(
        base, name=name or base.name, node_size=links.node_size,
        link_bandwidth=ibw, link_latency=ilat, alltoall_efficiency=ieff,
        intra_bandwidth=ibw, intra_latency=ilat, intra_alltoall_efficiency=ieff,
        inter_bandwidth=obw, inter_latency=olat, inter_alltoall_efficiency=oeff,
        description=(f"{base.description}; two-level links measured on {links.world_size} ranks as "
                     f"{links.world_size // links.node_size} nodes x {links.node_size}").lstrip("; "),
        source=source or base.source)
