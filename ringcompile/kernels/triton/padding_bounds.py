"""Per-batch key bounds from a mask's key padding, so the kernels skip padded key tiles.

A key-padding part (kind "padding": a function of the batch and key index only, e.g.
``mods.key_padding()``) that is AND-ed into the mask decides, per batch row, a first and a last
key it keeps; keys outside that range are masked whatever the other parts say. The launcher
evaluates the padding parts on the block's keys with device tensor ops (no host read) and
passes ``[B, 2]`` int32 bounds ``[first kept, last kept + 1)`` in global key indices; the forward
and dQ kernels bound their kv loops by them and the dK/dV kernel's programs for tiles outside
them skip their query loop. Keys outside the bounds are never loaded, so a batch row padded over
whole tiles costs no tile work (issue 16).

A discovered mask classified as one mod (no parts), e.g. "causal+padding" lifted from an HF-style
4-D mask or a flex mask_mod doing both in one function, is a padding part too when its class
proves it (``Mod.params[KEY_PADDING_LOOKUPS]``, ``passes.classify_mods``): keep = index clauses
AND a key padding of (b, kv) alone whose lookups index extras at exactly b / kv. Every index kind
(causal, sliding windows) keeps the diagonal q = kv, so the mod evaluated at (b, h=0, q=kv, kv) is
exactly the key padding, and with each looked-up extra at least B rows / the block's last key
columns wide (host shape checks) every lookup is in range: no device-side assert. A plain function
(no graph, nothing closed over) whose declared kind is such a composition is trusted as a declared
"padding" is, under the same shape rule. Anything else (a graph or closure without the proof:
padding that reads q or h, a shifted lookup, a flex position claim) gets no bounds: every tile is
visited and masked, still correct.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringcompile.log import get_logger
from ringcompile.mods import KEY_PADDING_LOOKUPS, Mod

log = get_logger(__name__)

NO_BOUND = 2**31 - 1  # "keep every key": the bounds when a padding part cannot be evaluated


def padding_parts(mask: Mod | None) -> list[tuple[Mod, int]]:
    """(padding part, index of its first extra in the mask's extras) for every part of an
    AND-composition (or the whole mask) that is a key padding; empty when there is none."""
    if mask is None:
        return []
    if not mask.parts:
        return [(mask, 0)] if _is_padding(mask) else []
    out, first = [], 0
    for part in mask.parts:
        if not part.parts and _is_padding(part):
            out.append((part, first))
        first += part.n_extras
    return out


def _is_padding(mod: Mod) -> bool:
    """A mod of kind "padding"; one proved to be index clauses AND a key padding (its class); or a
    plain function (no graph, no closure) declared as such (e.g. kind "causal+padding"), trusted
    like a declared "padding" or "causal"."""
    if mod.kind == "padding" or proved_key_padding(mod):
        return True
    return (mod.is_mask and "padding" in mod.kinds and set(mod.kinds) <= _PROVED_KINDS
            and mod.graph is None and not getattr(mod.fn, "__closure__", None))


def proved_key_padding(mod: Mod) -> bool:
    """Whether ``mod``'s class proves it is index clauses AND a strict key padding (module doc)."""
    return (mod.is_mask and bool(mod.params.get(KEY_PADDING_LOOKUPS)) and "padding" in mod.kinds
            and set(mod.kinds) <= _PROVED_KINDS)


_PROVED_KINDS = {"causal", "sliding_window", "padding"}  # each keeps the diagonal q = kv


def kv_bounds(mask: Mod, mask_extras: Sequence[torch.Tensor], batch: int, kv_offset: int, kv_len: int,
              seq_len: int, device: torch.device) -> torch.Tensor:
    """``[batch, 2]`` int32 ``[first, last + 1)`` global key indices that the padding parts keep among
    the block's keys ``kv_offset .. kv_offset + kv_len - 1`` below ``seq_len`` (the keys the kernels
    visit, so the parts see the indices the reference path gives them), ``[0, 0)`` for a row keeping
    none."""
    kv_len = max(0, min(kv_len, seq_len - kv_offset))
    if kv_len == 0:
        return torch.zeros(batch, 2, dtype=torch.int32, device=device)
    b = torch.arange(batch, device=device).view(-1, 1)
    kv = torch.arange(kv_offset, kv_offset + kv_len, device=device).view(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    # q = kv: the diagonal, which every index kind keeps (a padding part ignores q); in range of the
    # queries the reference path evaluates (keys below seq_len)
    parts = padding_parts(mask)
    if not all(_evaluable(part, mask_extras[first:first + part.n_extras], batch, kv_offset + kv_len)
               for part, first in parts):
        return _everything(batch, device)
    try:
        keep = None
        for part, first in parts:
            extras = [e.to(device) for e in mask_extras[first:first + part.n_extras]]
            part_keep = torch.as_tensor(part.fn(b, zero, kv, kv, *extras), device=device) != 0
            keep = part_keep if keep is None else keep & part_keep
        keep = keep.expand(batch, kv_len).to(torch.int8)
    except Exception as exc:  # a part the launcher cannot evaluate: visit every tile (still correct)
        log.info("key padding bounds not computed (%s): every key tile is visited", exc)
        return _everything(batch, device)
    kept = keep.amax(1) > 0
    lo = keep.argmax(1)  # the first maximum: the first kept key
    hi = kv_len - keep.flip(1).argmax(1)
    bounds = torch.stack([lo + kv_offset, hi + kv_offset], 1)
    return torch.where(kept.view(-1, 1), bounds, 0).to(torch.int32).contiguous()


def _evaluable(part: Mod, extras: Sequence[torch.Tensor], batch: int, kv_end: int) -> bool:
    """Whether evaluating ``part`` on every (batch row, key) of the block is safe on a GPU, where an
    index out of range is a device-side assert rather than an exception (the kernels mask such
    lookups instead). A proved key padding (its class lists its lookups, each at exactly b / kv): every
    looked-up extra has as many dims as indices, >= ``batch`` rows where b indexes and >= ``kv_end``
    where kv does. Otherwise a plain function of its own ``[B, S]`` extras (no graph, nothing it closes
    over), each with at least ``batch`` rows and ``kv_end`` columns (shapes: host metadata)."""
    if proved_key_padding(part):
        need = {"b": batch, "kv": kv_end}
        for index, roles in part.params[KEY_PADDING_LOOKUPS]:
            e = extras[index] if index < len(extras) else None
            if not isinstance(e, torch.Tensor) or e.dim() != len(roles) \
                    or any(e.shape[d] < need[r] for d, r in enumerate(roles)):
                return False
        return True
    if part.graph is not None or getattr(part.fn, "__closure__", None) or not extras:
        return False
    return all(e.dim() == 2 and e.shape[0] >= batch and e.shape[1] >= kv_end for e in extras)


def _everything(batch: int, device: torch.device) -> torch.Tensor:
    """Bounds that keep every key (the kernels then visit every tile and mask as before)."""
    out = torch.zeros(batch, 2, dtype=torch.int32, device=device)
    out[:, 1] = NO_BOUND  # a fill on the device, not an upload
    return out
