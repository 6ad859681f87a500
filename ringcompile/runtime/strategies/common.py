"""What every strategy shares: the per-call context and the chunk-pair compute.

A local shard is a list of *pieces*: runs of tokens at a known global offset (one for
the contiguous layout, two for zigzag), clipped to ``seq_len`` so padding tokens are never
handed to a mask (queries past it keep out = 0, lse = -inf; keys past it never count).
Masks and score mods are therefore always evaluated on true global indices.

Ring transfers may cut a shard into K/V *chunks* (``spec.block_size`` tokens each, see
``ring``); ``pieces_in`` gives a chunk's pieces, so a zigzag chunk that straddles the
shard's two runs still carries the right global offsets. Inside a chunk, block pairs are
computed ``compute_block`` tokens at a time: whole chunks for the Triton kernels (they tile,
mask and skip themselves), the kernels' preferred block (whole chunks for the CPU kernels'
fused unmasked/causal path), else ``local.DEFAULT_BLOCK``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ringcompile.kernels.dropout import HeadOffsetSeed, seed_on_device, seed_to_int
from ringcompile.kernels.reference import add_extra_grads, merge_partials
from ringcompile.kernels.select import BlockKernels
from ringcompile.spec import AttentionSpec

from ..communicator import Communicator
from ..layouts import local_chunks
from ..local import DEFAULT_BLOCK, acc_dtype, local_backward, local_forward, mask_structure
from ..timing import Timer

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Piece:
    """``length`` tokens at local position ``local`` and global position ``start``."""

    local: int
    start: int
    length: int

    @property
    def rows(self) -> slice:
        return slice(self.local, self.local + self.length)


@dataclasses.dataclass
class RingContext:
    comm: Communicator
    spec: AttentionSpec
    strategy: str
    seq_len: int
    layout: str
    mask_extras: Sequence[Tensor]
    score_extras: Sequence[Tensor]
    kernels: BlockKernels
    dropout_seed: Tensor | int | HeadOffsetSeed | None = None

    def __post_init__(self) -> None:
        # the op's seed is a one-element tensor, often on the GPU: kernels that read it on the device
        # (Triton) get it as it is; for the others it is read once per call here, not once per
        # kernel launch (each read waits for the device)
        if seed_on_device(self.dropout_seed) and self.spec.dropout_p > 0 and not self.kernels.device_seed:
            self.dropout_seed = seed_to_int(self.dropout_seed)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def pieces(self, rank: int, local_len: int, world_size: int | None = None) -> list[Piece]:
        """The pieces of ``rank``'s shard of length ``local_len``."""
        n = self.world_size if world_size is None else world_size
        return chunk_pieces(local_chunks(local_len * n, n, rank, self.layout), self.seq_len)

    def timer(self, phase: str, q: Tensor | None = None, k: Tensor | None = None) -> Timer:
        """A Timer for one call; ``q``/``k`` (this rank's) give the sizes a trace summary plans with."""
        workload: dict = {"seq_len": self.seq_len, "block_size": self.spec.block_size,
                          "causal": bool(self.spec.mask is not None and "causal" in self.spec.mask.kinds),
                          "mask": self.spec.mask.kind if self.spec.mask is not None else None}
        if q is not None:
            workload.update(batch=q.shape[0], heads=q.shape[1], head_dim=q.shape[-1],
                            dtype=str(q.dtype).removeprefix("torch."), device=q.device.type)
        if k is not None:
            workload["kv_heads"] = k.shape[1]
        return Timer(self.spec.record_timing, self.strategy, phase, self.rank, self.world_size,
                     getattr(self.comm, "device", None), site=self.spec.name, workload=workload)


def chunk_pieces(chunks: Sequence[tuple[int, int]], seq_len: int) -> list[Piece]:
    out, offset = [], 0
    for start, end in chunks:
        n = min(end, seq_len) - start
        if n > 0:
            out.append(Piece(offset, start, n))
        offset += end - start
    return out


def pieces_in(pieces: Sequence[Piece], lo: int, hi: int) -> list[Piece]:
    """The parts of ``pieces`` inside local token range [lo, hi), re-based to start at ``lo``.

    A chunk of a shard is the shard's rows [lo, hi); its pieces keep their global offsets.
    """
    out = []
    for p in pieces:
        a, b = max(p.local, lo), min(p.local + p.length, hi)
        if b > a:
            out.append(Piece(a - lo, p.start + (a - p.local), b - a))
    return out


WHOLE_CHUNK = 1 << 62  # tokens: more than any chunk holds, so each piece pair is one kernel call

# Kernels that take offsets and lengths and do their own tiling, masking and tile skipping.
TILING_KERNELS = ("triton",)


def compute_block(spec: AttentionSpec, kernels: BlockKernels) -> int:
    """Tokens per block pair handed to the kernels inside a chunk.

    The Triton kernels get whole chunks, whatever the mask: one launch per piece pair, so O(1)
    launches per ring step (at most four for a zigzag step) with a grid over the whole chunk,
    instead of one small launch per 512-token pair, each with an fp32 merge, a cat and buffer
    updates.

    Kernels with a preferred block (the CPU ones, which tile internally) get it on their fused
    path: no mask or a causal one, no score mod, no dropout. Everything else keeps
    ``DEFAULT_BLOCK`` pairs: there the kernels materialise a mask or score tile per pair, and
    small pairs let ``local`` skip the pairs a window removes. Measured on the CPU kernels at
    4096 tokens (fwd+bwd, 8 heads, D=64): causal 1.15 s whole vs 1.32 s in 512-blocks; sliding
    window 1.24 s vs 0.66 s, ALiBi 6.3 s vs 4.9 s and twice the memory, so those stay blocked.
    """
    if kernels.name in TILING_KERNELS:
        return WHOLE_CHUNK
    preferred = kernels.preferred_block
    if preferred is None:
        return DEFAULT_BLOCK
    fused = spec.score is None and spec.dropout_p == 0 and (spec.mask is None or spec.mask.kind == "causal")
    return max(preferred, DEFAULT_BLOCK) if fused else DEFAULT_BLOCK


def _causal_empty(spec: AttentionSpec, qp: Piece, kp: Piece) -> bool:
    """Skip a whole piece pair that a structured mask removes (cheaper than asking per block)."""
    return spec.mask is not None and mask_structure(spec.mask, qp.start, qp.start + qp.length - 1, kp.start,
                                                 kp.start + kp.length - 1) == "empty"


def empty_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    acc = acc_dtype(q)
    B, H, S, _ = q.shape
    return (q.new_zeros(B, H, S, v.shape[-1], dtype=acc), q.new_full((B, H, S), float("-inf"), dtype=acc))


def forward_pairs(
    ctx: RingContext, q: Tensor, q_pieces: Sequence[Piece], k: Tensor, v: Tensor,
    kv_pieces: Sequence[Piece], out: Tensor, lse: Tensor, spec: AttentionSpec | None = None,
    kernels: BlockKernels | None = None,
) -> None:
    """Merge attention of q's pieces against k/v's pieces into (out, lse) in place."""
    spec = ctx.spec if spec is None else spec
    kernels = kernels or ctx.kernels
    block = compute_block(spec, kernels)
    for qp in q_pieces:
        o = s = None
        qc = q[:, :, qp.rows]
        for kp in kv_pieces:
            if _causal_empty(spec, qp, kp):
                continue
            po, ps = local_forward(qc, k[:, :, kp.rows], v[:, :, kp.rows], ctx.mask_extras, ctx.score_extras,
                                   ctx.seq_len, spec, q_offset=qp.start, kv_offset=kp.start,
                                   block=block, kernels=kernels, dropout_seed=ctx.dropout_seed)
            o, s = merge_partials(o, s, po, ps)
        if o is not None:
            mo, ms = merge_partials(out[:, :, qp.rows], lse[:, :, qp.rows], o, s)
            out[:, :, qp.rows] = mo
            lse[:, :, qp.rows] = ms


def backward_pairs(
    ctx: RingContext, dout: Tensor, q: Tensor, out: Tensor, lse: Tensor, delta: Tensor,
    q_pieces: Sequence[Piece], k: Tensor, v: Tensor, kv_pieces: Sequence[Piece], dq: Tensor, dk: Tensor,
    dv: Tensor, d_extras: list[Tensor | None], spec: AttentionSpec | None = None,
    kernels: BlockKernels | None = None,
) -> None:
    """Accumulate the pieces' contributions into dq (q's rows), dk/dv (k's rows) and d_extras."""
    spec = ctx.spec if spec is None else spec
    kernels = kernels or ctx.kernels
    block = compute_block(spec, kernels)
    for qp in q_pieces:
        r = qp.rows
        for kp in kv_pieces:
            if _causal_empty(spec, qp, kp):
                continue
            g = local_backward(dout[:, :, r], q[:, :, r], k[:, :, kp.rows], v[:, :, kp.rows], out[:, :, r],
                               lse[:, :, r], ctx.mask_extras, ctx.score_extras, ctx.seq_len, spec,
                               q_offset=qp.start, kv_offset=kp.start, block=block,
                               kernels=kernels, delta=delta[:, :, r],
                               dropout_seed=ctx.dropout_seed)
            dq[:, :, r] += g[0]
            dk[:, :, kp.rows] += g[1]
            dv[:, :, kp.rows] += g[2]
            add_extra_grads(d_extras, g[3])


def grad_buffers(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(q)
    return tuple(torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))  # type: ignore[return-value]


def delta_of(dout: Tensor, out: Tensor) -> Tensor:
    acc = acc_dtype(dout)
    return (dout.to(acc) * out.to(acc)).sum(-1)


def reduce_extras(ctx: RingContext, d_extras: list[Tensor | None], step: int) -> list[Tensor | None]:
    """Sum learnable score-extra grads over ranks. Every float extra takes part on every rank
    (zeros where this rank saw none), so the collective sequence never depends on the data."""
    result: list[Tensor | None] = []
    pending = []
    for e, d in zip(ctx.score_extras, d_extras, strict=True):
        if not e.is_floating_point():
            result.append(None)
            pending.append(None)
            continue
        d = torch.zeros(e.shape, dtype=acc_dtype(e), device=e.device) if d is None else d
        result.append(d)
        pending.append(ctx.comm.all_reduce(d, step, "score-mod gradient all-reduce")
                       if ctx.world_size > 1 else None)
    return [p.wait()[0] if p is not None else r for p, r in zip(pending, result, strict=True)]
