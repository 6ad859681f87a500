"""Query rows with no kept key, under a mask that claims a finite constant: recomputed exactly.

A finite constant ``c`` (finfo.min, -1e9, -10000 under a softcap) is claimed as a mask only when
it sends every masked pair's weight to exactly 0 in a row that keeps at least one key. A row
whose keys are all masked is different: eager takes softmax over ``c`` (a fill: uniform weights)
or over ``s + c`` (added), while the mask form gives ``lse = -inf`` and ``out = 0``. Such rows
(query padding in DeBERTa, left padding under a causal mask) are found after the global merge
(``lse == -inf`` on a real query) and recomputed by a second pass of the same strategy with the
spec's ``DeadRowForm`` (the constant as an exact score term); rows that keep a key are untouched.
The backward finds the same rows from the mask itself (the saved lse is the corrected one) and
adds the bias-form gradients of those rows (dout zeroed elsewhere) to the mask-form ones.

The second pass runs only on the batch rows that hold a dead row on some rank (one small
all-reduce of a (B,) vector, so every rank runs the same rows, dead or not): q/k/v are sliced to
those rows, and the bias form's mods get the slice's original batch indices as one more extra
(``_batch_mapped``), so mods and their batch-indexed extras see the rows they would in the full
call. Under dropout the keep mask hashes the batch index too: the pass then runs one batch row at
a time with ``dropout.batch_row_seed``, which makes every kernel set hash local row 0 as the
original row. The work of the second pass is (dead batch rows / B) of the first.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ringcompile.kernels.dropout import batch_row_seed
from ringcompile.log import get_logger
from ringcompile.mods import Mod, evaluate_mask
from ringcompile.spec import AttentionSpec, DeadRowForm

from .communicator import Communicator
from .layouts import local_indices

Tensor = torch.Tensor
MASK_ELEMENTS = 1 << 24  # most (b, h, q, kv) pairs evaluated at once when finding dead rows (backward)
_BATCH_INVARIANT = {"causal", "sliding_window"}  # mod kinds that never read b (their kind is kept)

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchRows:
    """The batch rows one pass runs on: ``index`` (int64, original batch indices, in order) and the
    dropout ``seed`` that hashes the slice's rows as those originals."""

    index: Tensor
    seed: Any

    def take(self, x: Tensor) -> Tensor:
        return x.index_select(0, self.index)


# one forward pass: (spec, mask_extras, score_extras, rows) -> (out, lse) of those rows (all when None)
Pass = Callable[[AttentionSpec, list, list, "BatchRows | None"], tuple]


def _real_queries(comm: Communicator, q: Tensor, seq_len: int, layout: str) -> Tensor:
    """Global positions of the local queries (those at or past ``seq_len`` are padding)."""
    return local_indices(q.shape[2] * comm.world_size, comm.world_size, comm.rank, layout, q.device)


def _agreed_rows(comm: Communicator, dead: Tensor) -> list[int]:
    """Batch rows with a dead row on any rank (every rank gets the same list); one host read."""
    flags = dead.flatten(1).any(1).to(torch.float32)
    if comm.world_size > 1:
        flags = comm.all_reduce(flags, what="dead-row batch flags").wait()[0]
    return torch.nonzero(flags.cpu() > 0).flatten().tolist()  # the one copy to the host


def _batch_passes(rows: list[int], spec: AttentionSpec, seed: Any, device: torch.device) -> list[BatchRows]:
    """One slice of all ``rows``, or under dropout one per row (its seed hashes it as its original row)."""
    if spec.dropout_p > 0 and seed is not None:
        return [BatchRows(torch.tensor([r], device=device), batch_row_seed(seed, r)) for r in rows]
    return [BatchRows(torch.tensor(rows, device=device), seed)]


@functools.lru_cache(maxsize=256)
def _batch_mapped(mod: Mod) -> Mod:
    """``mod`` over a batch slice: its last extra maps the slice's row ``b`` to the original row.

    (``.long()``: a no-op on the int64 rows; the Triton lowering's probe passes float examples.)"""
    fn = mod.fn
    if mod.is_mask:
        def mapped(b, h, q, kv, *extras):
            return fn(extras[-1][b].long(), h, q, kv, *extras[:-1])
    else:
        def mapped(s, b, h, q, kv, *extras):
            return fn(s, extras[-1][b].long(), h, q, kv, *extras[:-1])
    keep_kind = set(mod.kinds) <= _BATCH_INVARIANT
    return Mod(mapped, mod.is_mask, mod.kind if keep_kind else "custom",
               dict(mod.params) if keep_kind else {}, mod.n_extras + 1,
               f"{mod.describe()} (batch rows mapped)", parts=mod.parts if keep_kind else ())


@functools.lru_cache(maxsize=256)
def _bias_spec(spec: AttentionSpec) -> AttentionSpec:
    """The bias form's spec over a batch slice; one object per spec, so what is cached per spec (the
    kernels, ulysses' head-group specs) is reused call after call."""
    form = spec.dead_rows
    return spec.replace(mask=None if form.mask is None else _batch_mapped(form.mask),
                        score=None if form.score is None else _batch_mapped(form.score), dead_rows=None)


def _bias_pass(form: DeadRowForm, spec: AttentionSpec, mask_extras: Sequence[Tensor],
               score_extras: Sequence[Tensor], rows: BatchRows) -> tuple[AttentionSpec, list, list]:
    """(spec, mask_extras, score_extras) of the bias form over the batch slice ``rows``."""
    every = list(mask_extras) + list(score_extras)
    m_extras, s_extras = [every[i] for i in form.mask_idx], [every[i] for i in form.score_idx]
    if form.mask is not None:
        m_extras.append(rows.index)
    if form.score is not None:
        s_extras.append(rows.index)
    return _bias_spec(spec), m_extras, s_extras


def _note(rows: list[int], batch: int, passes: int, where: str) -> None:
    log.debug("dead rows (%s): bias-form pass over %d of %d batch rows (%d pass(es))", where, len(rows),
              batch, passes)


def correct_forward(comm: Communicator, q: Tensor, out: Tensor, lse: Tensor, mask_extras, score_extras,
                    seq_len: int, spec: AttentionSpec, layout: str, run: Pass,
                    dropout_seed: Any = None) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` with dead rows (``lse == -inf`` on a real query) taken from the bias-form pass.

    One host read of the agreed rows per call (CPU and CUDA alike)."""
    pos = _real_queries(comm, q, seq_len, layout)
    dead = torch.isneginf(lse) & (pos < seq_len)
    rows = _agreed_rows(comm, dead)
    if not rows:
        return out, lse
    passes = _batch_passes(rows, spec, dropout_seed, q.device)
    _note(rows, q.shape[0], len(passes), "forward")
    form = spec.dead_rows
    for part in passes:
        out_b, lse_b = run(*_bias_pass(form, spec, mask_extras, score_extras, part), part)
        d = part.take(dead)
        out = out.index_copy(0, part.index, torch.where(d.unsqueeze(-1), out_b.to(out.dtype), part.take(out)))
        lse = lse.index_copy(0, part.index, torch.where(d, lse_b.to(lse.dtype) + form.shift, part.take(lse)))
    return out, lse


def dead_rows(comm: Communicator, q: Tensor, mask_extras, seq_len: int, spec: AttentionSpec,
              layout: str) -> Tensor:
    """(B, Hq, S_local) bool: real queries that keep no key under ``spec.mask``."""
    B, H, S = q.shape[:3]
    pos = _real_queries(comm, q, seq_len, layout)
    if spec.mask is None:
        return torch.zeros(B, H, S, dtype=torch.bool, device=q.device)
    b = torch.arange(B, device=q.device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=q.device).view(1, -1, 1, 1)
    qi = pos.clamp(max=max(seq_len - 1, 0)).view(1, 1, -1, 1)
    kept = torch.zeros(B, H, S, dtype=torch.bool, device=q.device)
    chunk = max(1, MASK_ELEMENTS // max(1, B * H * S))
    for start in range(0, seq_len, chunk):
        kv = torch.arange(start, min(start + chunk, seq_len), device=q.device).view(1, 1, 1, -1)
        keep = evaluate_mask(spec.mask, (b, h, qi, kv), mask_extras)
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
        kept |= keep.expand(*keep.shape[:-1], kv.shape[-1]).any(-1)
    return ~kept & (pos < seq_len)


def correct_backward(comm: Communicator, dout: Tensor, q: Tensor, lse: Tensor, mask_extras, score_extras,
                     seq_len: int, spec: AttentionSpec, layout: str, forward: Pass,
                     backward: Callable[..., tuple], dropout_seed: Any = None) -> tuple:
    """``backward(spec, mask_extras, score_extras, dout, lse, rows)`` of the mask form on live rows plus
    the bias form on dead rows' batch slices; extras' gradients mapped back to the op's score extras.

    The bias form's lse is recomputed (``forward``): the saved one has ``shift`` added back, which
    a huge constant absorbs. Live rows get lse = +inf there, so they add exactly 0."""
    dead = dead_rows(comm, q, mask_extras, seq_len, spec, layout)
    rows = _agreed_rows(comm, dead)
    if not rows:
        return backward(spec, list(mask_extras), list(score_extras), dout, lse, None)
    d3 = dead.unsqueeze(-1)
    dq, dk, dv, d_extras = backward(spec, list(mask_extras), list(score_extras), dout.masked_fill(d3, 0), lse,
                                    None)
    d_extras = list(d_extras)
    form = spec.dead_rows
    n_mask = len(mask_extras)
    passes = _batch_passes(rows, spec, dropout_seed, q.device)
    _note(rows, q.shape[0], len(passes), "backward")
    for part in passes:
        bias_spec, m_extras, s_extras = _bias_pass(form, spec, mask_extras, score_extras, part)
        d = part.take(dead)
        _, lse_b = forward(bias_spec, m_extras, s_extras, part)
        lse_b = torch.where(d, lse_b.to(lse.dtype), torch.full_like(lse_b, float("inf"), dtype=lse.dtype))
        dout_b = part.take(dout).masked_fill(~d.unsqueeze(-1), 0)
        dq_b, dk_b, dv_b, d_b = backward(bias_spec, m_extras, s_extras, dout_b, lse_b, part)
        dq = dq.index_add(0, part.index, dq_b.to(dq.dtype))
        dk = dk.index_add(0, part.index, dk_b.to(dk.dtype))
        dv = dv.index_add(0, part.index, dv_b.to(dv.dtype))
        for i, g in zip(form.score_idx, list(d_b)[:len(form.score_idx)], strict=True):
            if g is None or i < n_mask:
                continue  # a mask extra has no gradient
            j = i - n_mask
            d_extras[j] = g if d_extras[j] is None else d_extras[j] + g
    return dq, dk, dv, d_extras
