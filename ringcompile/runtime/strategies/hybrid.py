"""Hybrid (two-level) context parallelism: Ulysses inside a node, the ring across nodes.

On an ``outer`` x ``inner`` group (``two_level.TwoLevelCommunicator``; flattened rank
``o * inner + i``), each rank holds its shard of the flattened group. Inside a node an
all-to-all over heads gives inner rank i the node's whole sequence chunk for heads
[i * H/inner, (i+1) * H/inner), so only the fast links carry it. The node chunks then run
the ring (``ring.forward`` / ``ring.backward``: the same K/V chunking, overlap and timeouts)
over the outer group; the inverse all-to-all brings the output back to the shards.

Layouts: the node's chunk, its inner ranks' shards put back in global order, is exactly the
outer-level shard of the same layout: contiguous gives the contiguous layout on ``outer``
ranks, zigzag the zigzag layout on ``outer`` ranks (node o holds outer chunks o and
2*outer-1-o), so a causal mask stays balanced across nodes.

GQA: query heads must divide by ``inner``. When kv heads do not, each kv head is replicated
``kv_replication(hkv, inner)`` = inner / gcd(hkv, inner) times, the least that makes them
divide while every query head's kv head stays on its rank; their gradients are summed back.
Mods see global head indices (the head group's offset is added, as in Ulysses).

Dropout: the keep mask is a hash of global (b, h, q, kv) and the seed (``kernels.dropout``).
The ring across nodes already passes global token offsets; the head group's global offset
travels beside the seed (``HeadOffsetSeed``, which does not read a tensor seed), so every rank
drops exactly the entries one process (or the flat ring) drops; every kernel set, Triton's
included, hashes the shifted head.
"""

from __future__ import annotations

import math

import torch

from ringcompile.errors import OptionError
from ringcompile.kernels.dropout import with_head_offset
from ringcompile.log import get_logger

from ..two_level import TwoLevelCommunicator, check_mesh_agrees
from . import ring
from .common import RingContext, reduce_extras
from .ulysses import _group_spec

Tensor = torch.Tensor
log = get_logger(__name__)
_NOTED: set[str] = set()


def kv_replication(hkv: int, inner: int) -> int:
    """How many copies of each kv head the inner all-to-all needs (1: none)."""
    return inner // math.gcd(hkv, inner)


def check_heads(hq: int, hkv: int, inner: int) -> None:
    if hq % inner:
        raise OptionError(f"strategy 'hybrid' splits query heads over the {inner} ranks of a node, so query "
                          f"heads ({hq}) must be divisible by {inner}; use a smaller inner (node) dimension "
                          "or strategy 'ring' / 'zigzag'")


def levels(ctx: RingContext) -> TwoLevelCommunicator:
    comm = ctx.comm
    if not isinstance(comm, TwoLevelCommunicator):
        raise OptionError("strategy 'hybrid' needs a two-level group: pass group=<2-D DeviceMesh> and "
                          "mesh_dim=(outer_dim, inner_dim), e.g. mesh_dim=('cp_outer', 'cp_inner')")
    return comm


def to_node_order(x: Tensor, inner: int, layout: str) -> Tensor:
    """Inner ranks' shards concatenated in rank order -> the node chunk in global order (dim 2)."""
    if layout != "zigzag" or inner == 1:
        return x
    parts = x.chunk(2 * inner, dim=2)  # [A_0, B_0, A_1, B_1, ...]: shard i holds chunks A_i, B_i
    firsts = [parts[2 * j] for j in range(inner)]
    seconds = [parts[2 * j + 1] for j in reversed(range(inner))]
    return torch.cat(firsts + seconds, dim=2)


def from_node_order(x: Tensor, inner: int, layout: str) -> Tensor:
    """Inverse of ``to_node_order``."""
    if layout != "zigzag" or inner == 1:
        return x
    parts = x.chunk(2 * inner, dim=2)  # [A_0 .. A_{inner-1}, B_{inner-1} .. B_0]
    return torch.cat([p for j in range(inner) for p in (parts[j], parts[2 * inner - 1 - j])], dim=2)


def _scatter_heads(comm, x: Tensor, what: str):
    """Start sending head group j to inner rank j; the result: the node's sequence (shard order), my heads."""
    n = comm.world_size
    h = x.shape[1] // n
    pending = comm.all_to_all([x[:, j * h:(j + 1) * h] for j in range(n)], 0, what)
    return lambda: torch.cat(pending.wait(), dim=2)


def _gather_heads(comm, x: Tensor, local: int, what: str) -> Tensor:
    n = comm.world_size
    pending = comm.all_to_all([x[:, :, i * local:(i + 1) * local] for i in range(n)], 2, what)
    return torch.cat(pending.wait(), dim=1)


def _outer_context(ctx: RingContext, two: TwoLevelCommunicator, hq: int, device: torch.device) -> RingContext:
    """The ring over nodes, for this inner rank's head group [h0, h0 + hq/inner) of global heads."""
    inner = two.inner.world_size
    h0 = two.inner.rank * (hq // inner)
    spec, kernels = _group_spec(ctx, h0, device)
    seed = ctx.dropout_seed
    if spec.dropout_p > 0 and seed is not None:  # None: the kernels raise their clear "needs a dropout_seed"
        seed = with_head_offset(seed, h0)  # a device seed tensor stays one: no host read
    return RingContext(two.outer, spec, ctx.strategy, ctx.seq_len, ctx.layout, ctx.mask_extras,
                       ctx.score_extras, kernels, seed)


def _prepare(ctx: RingContext, q: Tensor, k: Tensor) -> tuple[TwoLevelCommunicator, int]:
    two = levels(ctx)
    check_heads(q.shape[1], k.shape[1], two.inner.world_size)
    return two, kv_replication(k.shape[1], two.inner.world_size)


def _node_inputs(two: TwoLevelCommunicator, layout: str, named: list[tuple[Tensor, str]]) -> list[Tensor]:
    inner = two.inner
    starts = [_scatter_heads(inner, t, f"{name} all-to-all") for t, name in named]
    return [to_node_order(f(), inner.world_size, layout) for f in starts]


def _to_shard(two: TwoLevelCommunicator, layout: str, x: Tensor, local: int, what: str) -> Tensor:
    inner = two.inner
    return _gather_heads(inner, from_node_order(x, inner.world_size, layout), local, what)


def forward(ctx: RingContext, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    two, rep = _prepare(ctx, q, k)
    check_mesh_agrees(two)
    local = q.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    qn, kn, vn = _node_inputs(two, ctx.layout, [(q, "Q"), (k, "K"), (v, "V")])
    out, lse = ring.forward(_outer_context(ctx, two, q.shape[1], q.device), qn, kn, vn)
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
    packed = _to_shard(two, ctx.layout, packed, local, "output all-to-all")
    return packed[..., :-1], packed[..., -1]


def backward(ctx: RingContext, dout, q, k, v, out, lse):
    two, rep = _prepare(ctx, q, k)
    local, hkv = q.shape[2], k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    qn, kn, vn, dn, on, ln = _node_inputs(two, ctx.layout, [(q, "Q"), (k, "K"), (v, "V"), (dout, "dO"),
                                                            (out, "O"), (lse.unsqueeze(-1), "lse")])
    dq, dk, dv, d_extras = ring.backward(_outer_context(ctx, two, q.shape[1], q.device), dn, qn, kn, vn, on,
                                         ln.squeeze(-1))
    dq = _to_shard(two, ctx.layout, dq, local, "dQ all-to-all")
    dk = _to_shard(two, ctx.layout, dk, local, "dK all-to-all")
    dv = _to_shard(two, ctx.layout, dv, local, "dV all-to-all")
    if rep > 1:  # each replica's gradient belongs to the one kv head it copies
        dk = dk.unflatten(1, (hkv, rep)).sum(2)
        dv = dv.unflatten(1, (hkv, rep)).sum(2)
    inner_ctx = RingContext(two.inner, ctx.spec, ctx.strategy, ctx.seq_len, ctx.layout, ctx.mask_extras,
                            ctx.score_extras, ctx.kernels, ctx.dropout_seed)
    d_extras = reduce_extras(inner_ctx, d_extras, 2 * two.outer.world_size)  # ring summed over nodes
    return dq, dk, dv, d_extras
