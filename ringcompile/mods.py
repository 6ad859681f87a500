"""Mask and score modifications as small closures over global token indices.

A mask mod has FlexAttention's signature ``mask_mod(b, h, q_idx, kv_idx, *extras) -> bool``
and a score mod ``score_mod(score, b, h, q_idx, kv_idx, *extras) -> score``. Indices are
*global* positions in the full sequence, so a mod means the same thing under every layout
and every ring step. ``extras`` are small runtime tensors (a key padding mask, ALiBi
slopes) that the mod indexes; they are always the full, replicated tensors.

Mods are evaluated by broadcasting: ``b`` has shape (B,1,1,1), ``h`` (1,H,1,1),
``q_idx`` (1,1,Sq,1) and ``kv_idx`` (1,1,1,Sk), all int64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import RingCompileError

MaskFn = Callable[..., torch.Tensor]

# Mod.params key: ((extra index, ("b" | "kv", ...)), ...) for a mask proved to be index clauses
# (causal / sliding_window) AND a key padding that depends on b and kv alone and looks extras up at
# exactly b / kv; the Triton launcher evaluates such a mask alone for per-batch key bounds
KEY_PADDING_LOOKUPS = "key_padding_lookups"
ScoreFn = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)
class Mod:
    """A mask or score modification plus what we know about its structure.

    kind:   "causal", "sliding_window", "padding", "alibi", "softcap", "bias", "custom",
            or several joined by "+" for compositions (e.g. "causal+padding").
    params: structural facts used by fast paths, e.g. {"window": 128}. For a composition, the
            facts on which all its parts agree (two windows of different widths keep neither).
            A discovered mod whose data clauses are provably a key padding states their lookups
            under ``KEY_PADDING_LOOKUPS`` (see ``passes.classify_mods``).
    graph:  the same function as an FX graph of index arithmetic (for Triton lowering);
            None means "not lowered yet": kernels may trace ``fn`` themselves.
    parts:  for ``and_masks`` compositions, the masks joined, each with its own params (so block
            skipping can ask every part); empty for a single mod or one discovery classified.
    """

    fn: Callable[..., torch.Tensor]
    is_mask: bool
    kind: str = "custom"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    n_extras: int = 0
    description: str = ""
    graph: torch.fx.GraphModule | None = None
    parts: tuple[Mod, ...] = ()

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.fn(*args)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.kind.split("+"))

    def describe(self) -> str:
        return self.description or self.kind


# ---------------------------------------------------------------------------- index grids


def index_grid(
    batch: int, heads: int, q_offset: int, q_len: int, kv_offset: int, kv_len: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Broadcastable (b, h, q_idx, kv_idx) for a block pair at global offsets."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(q_offset, q_offset + q_len, device=device).view(1, 1, -1, 1)
    kv = torch.arange(kv_offset, kv_offset + kv_len, device=device).view(1, 1, 1, -1)
    return b, h, q, kv


def evaluate_mask(mod: Mod, grid: Sequence[torch.Tensor], extras: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mask of one block, as a bool tensor broadcastable to (B, H, Sq, Sk)."""
    out = mod.fn(*grid, *extras)
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(bool(out))
    return out.to(torch.bool)


# ---------------------------------------------------------------------------- mask library


def causal() -> Mod:
    """kv_idx <= q_idx."""
    return Mod(lambda b, h, q, kv: kv <= q, True, "causal", description="causal")


def sliding_window(window: int, is_causal: bool = True) -> Mod:
    """Keys within ``window`` positions before (and, if not causal, after) the query."""
    if window <= 0:
        raise RingCompileError(f"sliding window must be positive, got {window}")
    if is_causal:
        def fn(b, h, q, kv):
            return (kv <= q) & (q - kv < window)
    else:
        def fn(b, h, q, kv):
            return (q - kv < window) & (kv - q < window)
    return Mod(fn, True, "sliding_window", {"window": window, "causal": is_causal},
               description=f"sliding_window({window})")


def key_padding() -> Mod:
    """Keep keys whose entry in the (B, S) key mask extra is nonzero."""
    return Mod(lambda b, h, q, kv, key_mask: key_mask[b, kv] != 0, True, "padding", n_extras=1,
               description="padding")


def and_masks(*mods: Mod) -> Mod:
    """All masks must keep a pair; extras are concatenated in order.

    Each part keeps its own params in ``parts`` (nested compositions are flattened); the joined
    mod's ``params`` hold only the facts every part that states them agrees on.
    """
    mods = tuple(m for m in mods if m is not None)
    if len(mods) == 1:
        return mods[0]
    counts = [m.n_extras for m in mods]

    def fn(b, h, q, kv, *extras):
        keep, i = None, 0
        for m, n in zip(mods, counts, strict=True):
            part = m.fn(b, h, q, kv, *extras[i:i + n])
            keep = part if keep is None else keep & part
            i += n
        return keep

    parts = tuple(p for m in mods for p in (m.parts or (m,)))
    return Mod(fn, True, "+".join(m.kind for m in mods), agreed_params(parts), sum(counts),
               " & ".join(m.describe() for m in mods), parts=parts)


def agreed_params(parts: Sequence[Mod]) -> dict[str, Any]:
    """The params whose value is the same in every part that has them (conflicts are dropped)."""
    params: dict[str, Any] = {}
    conflicts: set[str] = set()
    for m in parts:
        for key, value in m.params.items():
            if key in params and params[key] != value:
                conflicts.add(key)
            params.setdefault(key, value)
    return {k: v for k, v in params.items() if k not in conflicts}


# ---------------------------------------------------------------------------- score library


def alibi() -> Mod:
    """score + slopes[h] * (kv_idx - q_idx), with per-head slopes as the extra."""
    return Mod(lambda s, b, h, q, kv, slopes: s + slopes[h] * (kv - q), False, "alibi", n_extras=1,
               description="alibi")


def softcap(cap: float) -> Mod:
    """cap * tanh(score / cap) (Gemma 2, Grok)."""
    return Mod(lambda s, b, h, q, kv: torch.tanh(s / cap) * cap, False, "softcap", {"cap": cap},
               description=f"softcap({cap:g})")


def compose_scores(*mods: Mod) -> Mod:
    """Apply score mods in order; extras are concatenated in order."""
    mods = tuple(m for m in mods if m is not None)
    if len(mods) == 1:
        return mods[0]
    counts = [m.n_extras for m in mods]

    def fn(s, b, h, q, kv, *extras):
        i = 0
        for m, n in zip(mods, counts, strict=True):
            s = m.fn(s, b, h, q, kv, *extras[i:i + n])
            i += n
        return s

    return Mod(fn, False, "+".join(m.kind for m in mods), {}, sum(counts),
               " then ".join(m.describe() for m in mods))


def from_callable(fn: Callable[..., torch.Tensor] | None, is_mask: bool) -> Mod | None:
    """Wrap a user's FlexAttention-style mod (no extras: tensors it needs are closed over)."""
    if fn is None or isinstance(fn, Mod):
        return fn
    name = getattr(fn, "__name__", "custom")
    return Mod(fn, is_mask, "custom", description=f"custom({name})")
