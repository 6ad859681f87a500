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
Every rank takes part in the second pass or none does (one small all-reduce of the flag).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ringcompile.mods import evaluate_mask
from ringcompile.spec import AttentionSpec, DeadRowForm

from .communicator import Communicator
from .layouts import local_indices

Tensor = torch.Tensor
MASK_ELEMENTS = 1 << 24  # most (b, h, q, kv) pairs evaluated at once when finding dead rows (backward)

Pass = Callable[[AttentionSpec, list, list], tuple]  # one forward pass: (spec, mask_extras, score_extras)


def _real_queries(comm: Communicator, q: Tensor, seq_len: int, layout: str) -> Tensor:
    """Global positions of the local queries (those at or past ``seq_len`` are padding)."""
    return local_indices(q.shape[2] * comm.world_size, comm.world_size, comm.rank, layout, q.device)


def _agree(comm: Communicator, flag: bool, device: torch.device) -> bool:
    """Whether any rank has dead rows (all ranks must run the second pass together)."""
    if comm.world_size == 1:
        return flag
    total = comm.all_reduce(torch.tensor([float(flag)], device=device), what="dead-row flag").wait()[0]
    return bool(total.item() > 0)


def _bias_spec(spec: AttentionSpec) -> AttentionSpec:
    form = spec.dead_rows
    return spec.replace(mask=form.mask, score=form.score, dead_rows=None)


def _bias_extras(form: DeadRowForm, mask_extras: Sequence[Tensor], score_extras: Sequence[Tensor]):
    every = list(mask_extras) + list(score_extras)
    return [every[i] for i in form.mask_idx], [every[i] for i in form.score_idx]


def correct_forward(comm: Communicator, q: Tensor, out: Tensor, lse: Tensor, mask_extras, score_extras,
                    seq_len: int, spec: AttentionSpec, layout: str, run: Pass) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` with dead rows (``lse == -inf`` on a real query) taken from the bias-form pass.

    One host read of the flag per call (CPU and CUDA alike)."""
    pos = _real_queries(comm, q, seq_len, layout)
    dead = torch.isneginf(lse) & (pos < seq_len)
    if not _agree(comm, bool(dead.any()), q.device):
        return out, lse
    m_extras, s_extras = _bias_extras(spec.dead_rows, mask_extras, score_extras)
    out_b, lse_b = run(_bias_spec(spec), m_extras, s_extras)
    out = torch.where(dead.unsqueeze(-1), out_b.to(out.dtype), out)
    return out, torch.where(dead, lse_b.to(lse.dtype) + spec.dead_rows.shift, lse)


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
                     backward: Callable[..., tuple]) -> tuple:
    """``backward(spec, mask_extras, score_extras, dout, lse)`` of the mask form on live rows plus the
    bias form on dead rows; extras' gradients mapped back to the op's score extras.

    The bias form's lse is recomputed (``forward``): the saved one has ``shift`` added back, which
    a huge constant absorbs. Live rows get lse = +inf there, so they add exactly 0."""
    dead = dead_rows(comm, q, mask_extras, seq_len, spec, layout)
    if not _agree(comm, bool(dead.any()), q.device):
        return backward(spec, list(mask_extras), list(score_extras), dout, lse)
    d3 = dead.unsqueeze(-1)
    dq, dk, dv, d_extras = backward(spec, list(mask_extras), list(score_extras), dout.masked_fill(d3, 0), lse)
    form = spec.dead_rows
    m_extras, s_extras = _bias_extras(form, mask_extras, score_extras)
    bias_spec = _bias_spec(spec)
    _, lse_b = forward(bias_spec, m_extras, s_extras)
    lse_b = torch.where(dead, lse_b.to(lse.dtype), torch.full_like(lse, float("inf")))
    dq_b, dk_b, dv_b, d_b = backward(bias_spec, m_extras, s_extras, dout.masked_fill(~d3, 0), lse_b)
    d_extras = list(d_extras)
    n_mask = len(mask_extras)
    for i, g in zip(form.score_idx, d_b, strict=True):
        if g is None or i < n_mask:
            continue  # a mask extra has no gradient
        j = i - n_mask
        d_extras[j] = g if d_extras[j] is None else d_extras[j] + g
    return dq + dq_b, dk + dk_b, dv + dv_b, d_extras
