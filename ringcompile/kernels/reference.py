"""Pure-torch block attention: the contract every block kernel (CPU, Triton) must meet.

One call handles one (query block, key/value block) pair at global offsets and returns the
block's partial output and log-sum-exp in fp32; ``merge_partials`` combines partials. The
backward takes the *final* output and lse and returns this pair's contribution to dQ, dK,
dV (flash-attention style). Layout is (B, H, S, D); K/V may have fewer heads (GQA): query
head h reads KV head h // (Hq // Hkv). Keys at global index >= ``seq_len`` are padding and
always masked. This module materialises one block's scores, so callers keep blocks small.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ringcompile.mods import Mod, evaluate_mask, index_grid

if TYPE_CHECKING:
    from .dropout import Seed


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv*groups, S, D): only for the reference, never on the fast path."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


_AUTOGRAD_KEYS = [k for name, k in torch._C.DispatchKey.__members__.items() if name.startswith("Autograd")]


@contextlib.contextmanager
def autograd_enabled():
    """Re-enable autograd inside a custom op's kernel, where the dispatcher has switched it off.

    The backward differentiates the score mod with autograd; a custom op's implementation
    runs below the Autograd dispatch keys, so they are put back for this region only.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


def block_keep_mask(
    q: torch.Tensor, k: torch.Tensor, *, q_offset: int, kv_offset: int, seq_len: int | None,
    mask: Mod | None, mask_extras: Sequence[torch.Tensor] = (),
) -> torch.Tensor | None:
    """Bool mask broadcastable to (B, Hq, Sq, Sk), or None when every pair is kept."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    grid = index_grid(B, Hq, q_offset, Sq, kv_offset, Sk, device=q.device)
    keep = None
    if mask is not None:
        keep = evaluate_mask(mask, grid, mask_extras)
    if seq_len is not None and kv_offset + Sk > seq_len:
        valid = grid[3] < seq_len
        keep = valid if keep is None else keep & valid
    return keep


def block_scores(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, q_offset: int, kv_offset: int,
    score: Mod | None = None, score_extras: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """fp32 (or fp64 for fp64 inputs) scores after scaling and the score mod, before masking."""
    groups = q.shape[1] // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), repeat_kv(k, groups).to(acc).transpose(-2, -1)) * scale
    if score is not None:
        B, Hq, Sq, _ = q.shape
        grid = index_grid(B, Hq, q_offset, Sq, kv_offset, k.shape[2], device=q.device)
        s = score.fn(s, *grid, *score_extras).to(acc)
    return s


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int = 0,
    kv_offset: int = 0, seq_len: int | None = None, mask: Mod | None = None, score: Mod | None = None,
    mask_extras: Sequence[torch.Tensor] = (), score_extras: Sequence[torch.Tensor] = (),
    dropout_p: float = 0.0, dropout_seed: Seed | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one block pair; fully masked rows give out = 0 and lse = -inf.

    With ``dropout_p`` > 0, normalised probabilities are multiplied by keep / (1 - p), keep
    from ``kernels.dropout.keep_mask`` on global indices; lse is unchanged by dropout.
    """
    s = block_scores(q, k, scale=scale, q_offset=q_offset, kv_offset=kv_offset, score=score,
                     score_extras=score_extras)
    keep = block_keep_mask(q, k, q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len, mask=mask,
                           mask_extras=mask_extras)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe.unsqueeze(-1))
    drop = dropout_factor(q, k, q_offset, kv_offset, dropout_p, dropout_seed, p.dtype)
    if drop is not None:
        p = p * drop
    groups = q.shape[1] // k.shape[1]
    out = torch.matmul(p, repeat_kv(v, groups).to(p.dtype))
    return out, lse


def dropout_factor(
    q: torch.Tensor, k: torch.Tensor, q_offset: int, kv_offset: int, dropout_p: float,
    dropout_seed: Seed | None, dtype: torch.dtype,
) -> torch.Tensor | None:
    """keep / (1 - dropout_p) on the block's global indices, or None without dropout."""
    if dropout_p <= 0:
        return None
    from .dropout import check_dropout, dropout_scale, seed_to_int

    seed = seed_to_int(dropout_seed)
    check_dropout(dropout_p, seed)
    grid = index_grid(q.shape[0], q.shape[1], q_offset, q.shape[2], kv_offset, k.shape[2], device=q.device)
    return dropout_scale(seed, *grid, dropout_p, dtype)


def add_extra_grads(total: list[torch.Tensor | None], grads: Sequence[torch.Tensor | None]) -> None:
    """Add one block pair's score-extra gradients (None: that extra got none) into ``total`` in place."""
    for i, g in enumerate(grads):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


def merge_partials(
    out_a: torch.Tensor | None, lse_a: torch.Tensor | None, out_b: torch.Tensor, lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two normalised partial results by log-sum-exp (in their fp32/fp64 dtype)."""
    if out_a is None:
        return out_b, lse_b
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


def block_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
    lse: torch.Tensor, *, scale: float, q_offset: int = 0, kv_offset: int = 0, seq_len: int | None = None,
    mask: Mod | None = None, score: Mod | None = None, mask_extras: Sequence[torch.Tensor] = (),
    score_extras: Sequence[torch.Tensor] = (), delta: torch.Tensor | None = None,
    dropout_p: float = 0.0, dropout_seed: Seed | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """This block pair's (dq, dk, dv, d_score_extras) given the final out and lse.

    dq has Hq heads, dk/dv have Hkv heads (summed over each group), all fp32 (fp64 for fp64
    inputs). The score mod is differentiated by autograd, so softcaps and learnable biases
    need no hand-written derivative.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    qa = q.detach().to(acc).requires_grad_(True)
    ka = k.detach().to(acc).requires_grad_(True)
    extras = [e.detach().requires_grad_(True) if e.is_floating_point() else e for e in score_extras]
    with autograd_enabled():
        s = block_scores(qa, ka, scale=scale, q_offset=q_offset, kv_offset=kv_offset, score=score,
                         score_extras=extras)
    keep = block_keep_mask(q, k, q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len, mask=mask,
                           mask_extras=mask_extras)
    lse_a = lse.to(acc)
    safe = torch.where(torch.isneginf(lse_a), torch.zeros_like(lse_a), lse_a)
    p = torch.exp(s.detach() - safe.unsqueeze(-1))
    if keep is not None:
        p = p.masked_fill(~keep, 0.0)
    do = dout.to(acc)
    vr = repeat_kv(v, groups).to(acc)
    drop = dropout_factor(q, k, q_offset, kv_offset, dropout_p, dropout_seed, p.dtype)
    dv = torch.matmul((p if drop is None else p * drop).transpose(-2, -1), do)
    if delta is None:
        delta = (do * out.to(acc)).sum(-1)
    dp = torch.matmul(do, vr.transpose(-2, -1))
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - delta.to(acc).unsqueeze(-1))
    wanted = [qa, ka] + [e for e in extras if e.requires_grad]
    with autograd_enabled():
        grads = torch.autograd.grad(s, wanted, ds, allow_unused=True)
    dq, dk = grads[0], grads[1]
    d_extras: list[torch.Tensor | None] = []
    it = iter(grads[2:])
    for e in extras:
        d_extras.append(next(it) if e.requires_grad else None)
    B, Hq, Sk, D = dv.shape
    dv = dv.view(B, Hq // groups, groups, Sk, D).sum(2)
    dq = dq if dq is not None else torch.zeros_like(qa)
    dk = dk if dk is not None else torch.zeros_like(ka)
    return dq, dk, dv, d_extras


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    mask: Mod | None = None, score: Mod | None = None, mask_extras: Sequence[torch.Tensor] = (),
    score_extras: Sequence[torch.Tensor] = (), dtype: torch.dtype = torch.float64,
    dropout_p: float = 0.0, dropout_seed: Seed | None = None,
) -> torch.Tensor:
    """Eager attention on the full sequence, differentiable, in ``dtype`` (float64 for tests).

    Dropout, when asked for, multiplies softmax(scores) by the global-index keep mask / (1 - p).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    groups = q.shape[1] // k.shape[1]
    s = torch.matmul(q, repeat_kv(k, groups).transpose(-2, -1)) * scale
    B, H, S, _ = q.shape
    grid = index_grid(B, H, 0, S, 0, k.shape[2], device=q.device)
    if score is not None:
        s = score.fn(s, *grid, *[e.to(dtype) if e.is_floating_point() else e for e in score_extras])
    if mask is not None:
        s = s.masked_fill(~evaluate_mask(mask, grid, mask_extras), float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows attend to nothing
    drop = dropout_factor(q, k, 0, 0, dropout_p, dropout_seed, p.dtype)
    if drop is not None:
        p = p * drop
    return torch.matmul(p, repeat_kv(v, groups))
