"""Flash-decoding across ranks: queries against a KV cache whose slots are spread over the ranks.

Every rank holds the same (replicated) queries and its own shard of the cache: K/V
(B, Hkv, L_r, D) with the global slot of each entry (``kv_slots``, (L_r,) int64). Each rank
attends its shard and produces a partial (out, lse) in fp32; one all_gather of the packed
partials (B, Hq, Sq, Dv + 1) per call lets every rank merge them by log-sum-exp, so all ranks
return the same full output. Works for one query (decode) or a chunk of queries that attends
an existing cache (chunked / multi-turn prefill: append the chunk's K/V first, then call with
the chunk's slots as ``q_slots``; the causal rule ``kv_slot <= q_slot`` does the rest).

Mask semantics are HF's on cache slots: causal (``kv_slot <= q_slot``), ``key_padding`` (B, T)
over global slots (HF's 2-D attention_mask; left padding), and a sliding ``window``
(``q_slot - kv_slot < window``, Mistral). A query row with no visible key anywhere returns 0
(HF's value there is unspecified). A rank whose shard lies wholly outside every query's window,
or wholly in the future, or wholly hidden by the model's own mask (how a compiled Mistral's window
arrives: in HF's mask, not as ``window``), skips its compute and still joins the collective.

``whole_mask=True`` (what the compiled ops pass with a model's mask) means what the graph means in one
process: SDPA (or HF's eager chain) over the gathered cache, all W = mask-width slots, zeros at slots
not written yet, with that mask and nothing else. No causal rule of ours then (a mask may keep a
later slot: a prefix-LM), and the unwritten slots [cache_len, W) join the softmax as keys with
k = v = 0 (``unwritten_partial``, merged once after the ranks' partials). Rows that keep a key under
HF's 0 / finfo.min masks are unchanged by both (their weight there is exactly 0); a row that keeps
none (a custom mask, a padded query row under an additive mask) gets one process's value: softmax over
``s + finfo.min`` on all W slots, where the slot count matters. To keep that count, scores are
``(s + mask) - shift`` with ``shift`` the row's largest mask value (``mask_shift``: 0 for a row that
keeps a key under HF's masks, so those rows are computed as before); otherwise every partial's lse
would absorb ``log n`` into finfo.min. A boolean row that keeps nothing is 0, as torch's SDPA gives.
Known limit: ``s + mask`` is rounded in fp32, where a 16-bit model's eager rounds it in its dtype.

Before the merge, ranks all-gather a tiny int64 metadata vector (shapes, dtype, query slots,
cache length, shard length and slot range; with a ``CacheLayout`` the length each rank must
hold), so a rank whose cache disagrees (skipped a step, other dtype, wrong length) is named in
a ``ShapeMismatchError`` on every rank before any data moves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ringcompile.errors import ShapeMismatchError
from ringcompile.kernels.reference import merge_partials
from ringcompile.log import get_logger

from .cache_layout import CacheLayout
from .communicator import Communicator, RingCommunicator
from .group import resolve_group
from .validate import gather_and_compare

log = get_logger(__name__)
Tensor = torch.Tensor

KEY_BLOCK = 4096  # cache entries per partial at least; more while the score tile stays under TILE_ELEMENTS
TILE_ELEMENTS = 1 << 22
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
META_FIELDS = ("valid inputs", "batch", "query heads", "kv heads", "query length", "head dim",
               "value head dim", "dtype", "first query slot", "last query slot", "cache length",
               "window", "key padding", "shard length", "first cache slot", "last cache slot")
_AGREED = 13  # fields before this index must be equal on every rank


@dataclasses.dataclass(frozen=True)
class DecodePartial:
    """One rank's partial: fp32 (fp64 for fp64 inputs) out (B, Hq, Sq, Dv), lse (B, Hq, Sq), and
    whether the rank computed anything (False: its shard was outside every query's window)."""

    out: Tensor
    lse: Tensor
    computed: bool


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def shard_visible(kv_min: int, kv_max: int, q_min: int, q_max: int, window: int | None) -> bool:
    """Can any query in slots [q_min, q_max] see a key in slots [kv_min, kv_max] (causal + window)?"""
    if kv_max < kv_min or kv_min > q_max:
        return False
    return window is None or kv_max > q_min - window


def mask_shift(slot_mask: Tensor | None, whole_mask: bool, dtype: torch.dtype) -> Tensor | None:
    """Per row (..., Sq, 1): the largest value of an additive whole mask over all its slots (0 where a
    row is all -inf); None for a boolean mask or without ``whole_mask``. Subtracted from every score
    (softmax is unchanged) so a row whose keys all carry finfo.min keeps its lse finite-sized."""
    if not whole_mask or slot_mask is None or slot_mask.dtype == torch.bool:
        return None
    top = slot_mask.to(dtype).amax(-1, keepdim=True)
    return torch.where(torch.isneginf(top), torch.zeros_like(top), top)


def local_partial(q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor, *, scale: float,
                  key_padding: Tensor | None = None, window: int | None = None,
                  slot_mask: Tensor | None = None, whole_mask: bool = False) -> DecodePartial:
    """This rank's partial attention of q (B, Hq, Sq, D) against its shard k/v (B, Hkv, L, D).

    ``slot_mask`` (B or 1, 1 or Hq, Sq, >= T) over global slots is how a model's own mask (HF's, with its
    padding and window rules) reaches the shard: bool (True = keep) is ANDed in; a float mask is added
    to the scaled scores (HF's additive 0 / finfo.min mask), its -inf entries dropped. ``whole_mask``:
    the mask is all there is (no causal rule; slots past its width, the pass-KV padding, drop), and
    scores and lse are shifted by ``mask_shift``."""
    B, Hq, Sq, _ = q.shape
    Hkv, L, Dv = k.shape[1], k.shape[2], v.shape[-1]
    acc = _acc(q.dtype)
    out = q.new_zeros(B, Hq, Sq, Dv, dtype=acc)
    lse = q.new_full((B, Hq, Sq), float("-inf"), dtype=acc)
    if L == 0:
        return DecodePartial(out, lse, False)
    whole_mask = whole_mask and slot_mask is not None
    kv_min, kv_max = int(kv_slots.min()), int(kv_slots.max())
    # a whole mask may keep later slots (no causal skip), but a window it states (passes/rules/window.py)
    # still hides every shard wholly before it
    q_min, q_max = int(q_slots.min()), int(q_slots.max())
    visible = (window is None or kv_max > q_min - window) if whole_mask else shard_visible(
        kv_min, kv_max, q_min, q_max, window)
    if not visible:
        return DecodePartial(out, lse, False)
    shift = mask_shift(slot_mask, whole_mask, acc)
    g = Hq // Hkv
    qg = q.to(acc).reshape(B, Hkv, g * Sq, q.shape[-1]) if g > 1 else q.to(acc)
    o_acc = s_acc = None
    block = max(KEY_BLOCK, TILE_ELEMENTS // max(1, B * Hq * Sq))   # one block for a decode step
    for a in range(0, L, block):
        b = min(L, a + block)
        slots = kv_slots[a:b]
        if whole_mask:                                                      # (Sq, Lb): the mask's slots
            keep = (slots < slot_mask.shape[-1]).view(1, -1).expand(Sq, -1)
        else:
            keep = slots.view(1, -1) <= q_slots.view(-1, 1)                  # (Sq, Lb) causal
        if window is not None:
            keep = keep & (q_slots.view(-1, 1) - slots.view(1, -1) < window)
        keep = keep.view(1, 1, Sq, -1)
        if key_padding is not None:
            cols = slots.clamp(max=key_padding.shape[1] - 1)   # padding entries (pass-KV) are in the future
            keep = keep & key_padding[:, cols].to(torch.bool).view(B, 1, 1, -1)
        bias = None
        if slot_mask is not None:
            at_slots = slot_mask[..., slots.clamp(max=slot_mask.shape[-1] - 1)]
            if at_slots.dtype == torch.bool:
                keep = keep & at_slots
            else:                                   # additive (HF eager: 0 / finfo.min), -inf also drops
                bias = at_slots.to(acc)
                keep = keep & ~torch.isneginf(bias)
        if not bool(keep.any()):
            continue
        scores = torch.matmul(qg, k[:, :, a:b].to(acc).transpose(-1, -2)) * scale   # (B, Hkv, g*Sq, Lb)
        scores = scores.view(B, Hq, Sq, b - a)
        if bias is not None:
            scores = scores + bias
            if shift is not None:
                scores = scores - shift
        scores = scores.masked_fill(~keep.expand(B, Hq, Sq, b - a), float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p = torch.exp(scores - m)
        denom = p.sum(-1)
        pv = torch.matmul(p.view(B, Hkv, g * Sq, b - a), v[:, :, a:b].to(acc)).view(B, Hq, Sq, Dv)
        o = pv / denom.clamp_min(torch.finfo(acc).tiny).unsqueeze(-1)
        s = torch.log(denom) + m.squeeze(-1)
        o_acc, s_acc = merge_partials(o_acc, s_acc, o, s)
    if o_acc is None:   # the model's mask (HF's sliding window on the compiled path) hid every slot
        return DecodePartial(out, lse, False)
    return DecodePartial(o_acc, s_acc, True)


def unwritten_partial(slot_mask: Tensor, cache_len: int, shape: tuple[int, ...], dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor] | None:
    """(out, lse) of the mask's slots [cache_len, W) that no rank holds yet, as one process sees them in
    the gathered cache: keys and values 0, so each scores its mask value (0 / -inf for a boolean mask)
    and adds nothing to the output. ``shape``: (B, Hq, Sq, Dv). None when there are no such slots."""
    B, Hq, Sq, Dv = shape
    if slot_mask.shape[-1] <= cache_len:
        return None
    cols = slot_mask[..., cache_len:]
    bias = (torch.zeros(cols.shape, dtype=dtype, device=cols.device).masked_fill(~cols, float("-inf"))
            if cols.dtype == torch.bool else cols.to(dtype))
    shift = mask_shift(slot_mask, True, dtype)
    if shift is not None:
        bias = bias - shift
    lse = torch.logsumexp(bias, -1).expand(B, Hq, Sq)
    return torch.zeros(shape, dtype=dtype, device=cols.device), lse


def with_unwritten(out: Tensor, lse: Tensor, slot_mask: Tensor | None, cache_len: int, whole_mask: bool
                   ) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` (shifted by ``mask_shift``) merged with ``unwritten_partial`` under ``whole_mask``,
    the shift added back to lse (else as they are)."""
    if not whole_mask or slot_mask is None:
        return out, lse
    extra = unwritten_partial(slot_mask, cache_len, tuple(out.shape), out.dtype)
    if extra is not None:
        out, lse = merge_partials(out, lse, *extra)
    shift = mask_shift(slot_mask, True, lse.dtype)
    return out, lse if shift is None else lse + shift.squeeze(-1)


def merge_across(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge stacked partials (N, B, H, Sq, Dv) / (N, B, H, Sq) by log-sum-exp; rows seen by no
    rank get out 0 and lse -inf."""
    m = lses.amax(0)
    safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lses - safe)                        # exp(-inf) = 0 for ranks that saw nothing
    total = w.sum(0)
    out = (outs * w.unsqueeze(-1)).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(-1)
    return out, torch.log(total) + safe


def _problems(q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor,
              key_padding: Tensor | None, cache_len: int) -> str | None:
    """What is wrong with this rank's inputs on their own (None: nothing)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})"
    if kv_slots.dim() != 1 or kv_slots.shape[0] != k.shape[2]:
        return (f"kv_slots must be ({k.shape[2]},) (one global slot per cache entry), got "
                f"{tuple(kv_slots.shape)}")
    if q_slots.dim() != 1 or q_slots.shape[0] != q.shape[2]:
        return f"q_slots must be ({q.shape[2]},) (one global slot per query), got {tuple(q_slots.shape)}"
    if kv_slots.numel() and (int(kv_slots.min()) < 0 or int(kv_slots.max()) >= cache_len):
        return f"kv_slots must lie in [0, cache_len={cache_len})"
    if key_padding is not None and (key_padding.dim() != 2 or key_padding.shape[0] != q.shape[0]
                                    or key_padding.shape[1] < cache_len):
        return (f"key_padding must be (B={q.shape[0]}, >= cache_len={cache_len}) over global slots, got "
                f"{tuple(key_padding.shape)}")
    return None


def metadata(q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor, cache_len: int,
             window: int | None, key_padding: Tensor | None, valid: bool) -> list[int]:
    def dim(t: Tensor, i: int) -> int:
        return t.shape[i] if t.dim() == 4 else -1

    n = kv_slots.numel() if kv_slots.dim() == 1 else -1
    qs = q_slots.reshape(-1)
    return [int(valid), dim(q, 0), dim(q, 1), dim(k, 1), dim(q, 2), dim(q, 3), dim(v, 3),
            _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99,
            int(qs[0]) if qs.numel() else -1, int(qs[-1]) if qs.numel() else -1, int(cache_len),
            -1 if window is None else int(window), int(key_padding is not None),
            n, int(kv_slots.min()) if n > 0 else -1, int(kv_slots.max()) if n > 0 else -1]


def _show(field: str, value: int) -> str:
    if field == "dtype":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "unsupported"
    if field == "valid inputs":
        return "yes" if value else "no (see that rank's own error)"
    return str(value)


def check_cache_agrees(comm: Communicator, meta: list[int], layout: CacheLayout | None) -> list[int]:
    """All-gather ``meta``; raise ShapeMismatchError naming each rank whose cache or queries differ.
    Returns every rank's shard length."""
    table, problems = gather_and_compare(comm, meta, META_FIELDS[:_AGREED], _show, "decode metadata check")
    if not problems:
        cache_len = table[0][10]
        lengths = [row[13] for row in table]
        if layout is not None:
            want = layout.lengths(cache_len)
            problems += [f"rank {r} holds {lengths[r]} cache entries where the layout ({layout.policy} "
                         f"appends after a {layout.prefill_len}-token {layout.prefill_layout} prefill) puts "
                         f"{want[r]} of {cache_len} slots"
                         for r in range(len(table)) if lengths[r] != want[r]]
        elif sum(lengths) != cache_len:
            problems.append(f"the ranks' shard lengths {lengths} sum to {sum(lengths)}, not the cache length "
                            f"{cache_len} (a rank skipped or repeated an append; pass layout= to name it)")
    if problems:
        raise ShapeMismatchError(f"sharded KV cache disagrees across ranks (seen from rank {comm.rank}): "
                                 + "; ".join(problems) + ". Every rank must append every step's K/V "
                                 "(to its owner) and call decode with the same queries.")
    return [row[13] for row in table]


def filled_prefix(k: Tensor, v: Tensor, kv_slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A preallocated shard (``runtime/cache_append.py``) marks entries not written yet with slot -1 at
    its end: views of the written prefix (the shard as it is when nothing is marked)."""
    if kv_slots.dim() != 1 or kv_slots.shape[0] != k.shape[-2] or not bool((kv_slots < 0).any()):
        return k, v, kv_slots
    n = int((kv_slots >= 0).sum())
    if bool((kv_slots[n:] >= 0).any()):
        return k, v, kv_slots          # not a prefix: _problems reports the negative slots
    return k[:, :, :n], v[:, :, :n], kv_slots[:n]


def decode_partials(comm: Communicator, q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor,
                    *, cache_len: int | None = None, key_padding: Tensor | None = None,
                    window: int | None = None, scale: float | None = None,
                    layout: CacheLayout | None = None, check: bool = True,
                    slot_mask: Tensor | None = None, whole_mask: bool = False) -> tuple[Tensor, Tensor, bool]:
    """(out, lse, computed) on ``comm``: the merged fp32 output and lse, and whether this rank computed."""
    kv_slots = kv_slots.to(device=q.device, dtype=torch.long).reshape(-1)
    q_slots = q_slots.to(device=q.device, dtype=torch.long).reshape(-1)
    k, v, kv_slots = filled_prefix(k, v, kv_slots)
    if cache_len is None:
        cache_len = int(q_slots.max()) + 1 if q_slots.numel() else 0
    problem = _problems(q, k, v, kv_slots, q_slots, key_padding, cache_len)
    if comm.world_size > 1 and check:
        check_cache_agrees(comm, metadata(q, k, v, kv_slots, q_slots, cache_len, window, key_padding,
                                          problem is None), layout)
    if problem is not None:
        raise ShapeMismatchError(f"rank {comm.rank}: {problem}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    part = local_partial(q, k, v, kv_slots, q_slots, scale=scale, key_padding=key_padding, window=window,
                         slot_mask=slot_mask, whole_mask=whole_mask)
    if comm.world_size == 1:
        out, lse = merge_across(part.out.unsqueeze(0), part.lse.unsqueeze(0))
    else:
        packed = torch.cat([part.out, part.lse.unsqueeze(-1)], -1)
        rows = comm.all_gather(packed, 0, "decode partial (out, lse) all_gather").wait()
        stacked = torch.stack(rows)
        out, lse = merge_across(stacked[..., :-1], stacked[..., -1])
    out, lse = with_unwritten(out, lse, slot_mask, cache_len, whole_mask)
    return out, lse, part.computed


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, kv_slots: Tensor, q_slots: Tensor,
                     cache_len: int | None = None, key_padding: Tensor | None = None,
                     window: int | None = None, scale: float | None = None, layout: CacheLayout | None = None,
                     group: Any = None, mesh_dim: int | str | None = None, comm: Communicator | None = None,
                     timeout: float = 60.0, check: bool = True, slot_mask: Tensor | None = None,
                     whole_mask: bool = False) -> Tensor:
    """Attention of replicated queries q (B, Hq, Sq, D) at global cache slots ``q_slots`` against the
    sharded cache (this rank's k/v (B, Hkv, L_r, D) at ``kv_slots``); every rank returns the full
    output (B, Hq, Sq, Dv) in q's dtype. GQA when Hq is a multiple of Hkv.

    ``slot_mask`` (bool, True = keep, or additive float, over global slots; see ``local_partial``) adds a
    model's own mask; ``whole_mask``: that mask is the whole rule, as in one process (module docstring).
    ``cache_len`` (default last query slot + 1) is the global number of slots; ``layout`` states who
    holds how many (checked on every call when given). ``comm`` overrides ``group`` (simulated ranks).
    Not differentiable (serving).
    """
    if comm is None:
        comm = RingCommunicator(resolve_group(group, mesh_dim), timeout, device=q.device)
    with torch.no_grad():
        out, _, _ = decode_partials(comm, q, k, v, kv_slots, q_slots, cache_len=cache_len,
                                    key_padding=key_padding, window=window, scale=scale, layout=layout,
                                    check=check, slot_mask=slot_mask, whole_mask=whole_mask)
    return out.to(q.dtype)
