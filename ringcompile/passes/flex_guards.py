"""Facts about a FlexAttention call's input tensors that the rewritten graph relies on, checked on every call.

Why: Dynamo guards shapes and dtypes, never tensor contents. Two things the flex rewrite proves at
compile time hold only for the contents it saw:

- a BlockMask passed in is checked to mean exactly its mask_mod (``passes.flex``); the next call may
  pass a different one (another BlockMask object with the same shapes reuses the compiled graph);
- HF's packed-sequence mask states causality over ``position_ids`` (``pos[b, kv] <= pos[b, q]``), which
  is ``kv <= q`` only while positions increase inside each document; claiming it lets the ring skip
  causal tiles (``passes.flex.mask_mod_from``).

Each such fact becomes a ``CallGuard`` over graph inputs (positions among the Dynamo graph's
arguments). The backend checks every guard before each call (host work: a few O(B*S) comparisons
or one ``torch.equal`` per block tensor) and runs the original graph for a call whose guard fails,
logging the reason once. The inputs guarded are the same on every rank (they are built from the
same batch), so every rank takes the same path and no collective is left waiting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from ringcompile.log import get_logger

log = get_logger(__name__)

GUARDS_KEY = "ringcompile_call_guards"


@dataclasses.dataclass
class CallGuard:
    """``check(*args[i] for i in inputs)`` returns None when the compiled graph is valid for this call,
    else why not; ``what`` names the fact for the log."""

    inputs: tuple[int, ...]
    check: Callable[..., str | None]
    what: str


def input_position(node: Any) -> int | None:
    """Where a placeholder of the top-level graph sits among the graph's arguments (None otherwise)."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    return [n for n in node.graph.nodes if n.op == "placeholder"].index(node)


def first_failure(guards: Sequence[CallGuard], args: Sequence[Any]) -> str | None:
    for g in guards:
        try:
            why = g.check(*(args[i] for i in g.inputs))
        except Exception as exc:  # noqa: BLE001 - a guard that cannot decide refuses
            why = f"could not be checked ({type(exc).__name__}: {exc})"
        if why is not None:
            return f"{g.what}: {why}"
    return None


def guarded(compiled: Callable, original: Callable[[], Callable], guards: Sequence[CallGuard]) -> Callable:
    """``compiled`` for the calls where every guard holds; the original graph (built on first need by
    ``original()``) for the others."""
    boxed = bool(getattr(compiled, "_boxed_call", False))
    fallback: list[Callable] = []
    warned: set[str] = set()

    def run(*args: Any) -> Any:
        flat = args[0] if boxed else args
        why = first_failure(guards, flat)
        if why is None:
            return compiled(*args)
        if why not in warned:
            warned.add(why)
            log.warning("ringcompile: this call runs the original (unsharded) graph: %s", why)
        if not fallback:
            fallback.append(original())
        fn = fallback[0]
        if getattr(fn, "_boxed_call", False) == boxed:
            return fn(*args)
        return fn(list(flat)) if getattr(fn, "_boxed_call", False) else fn(*flat)

    if boxed:
        run._boxed_call = True  # type: ignore[attr-defined]
    return run


# ---------------------------------------------------------------------------- the facts


def positions_increase_within_documents(pos: torch.Tensor, doc: torch.Tensor | None = None) -> str | None:
    """None when ``pos[b, kv] <= pos[b, q]`` means ``kv <= q`` for every pair in the same document:
    document ids form non-decreasing runs along the sequence and positions strictly increase inside
    each run (without ``doc``: along the whole row)."""
    if pos.dim() != 2:
        return f"positions of shape {tuple(pos.shape)} are not (batch, seq)"
    steps = pos[:, 1:] > pos[:, :-1]
    if doc is None:
        return None if bool(steps.all()) else "positions do not increase along the sequence"
    if doc.dim() != 2:
        return f"document ids of shape {tuple(doc.shape)} are not (batch, seq)"
    if not bool((doc[:, 1:] >= doc[:, :-1]).all()):
        return "document ids do not form contiguous runs"
    same = (doc[:, 1:] == doc[:, :-1]).expand_as(steps)
    return None if bool((steps | ~same).all()) else "positions do not increase inside a document"


class SameContents:
    """True while the tensors hold what they held when last vouched for; otherwise ``revalidate`` decides
    (a new BlockMask that still means its mask_mod is accepted and remembered)."""

    def __init__(self, tensors: Sequence[torch.Tensor], revalidate: Callable[..., str | None]):
        self.seen = [t.detach().clone() for t in tensors]
        self.revalidate = revalidate

    def __call__(self, *tensors: torch.Tensor) -> str | None:
        if all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
               for a, b in zip(tensors, self.seen, strict=True)):
            return None
        why = self.revalidate(*tensors)
        if why is None:
            self.seen = [t.detach().clone() for t in tensors]
        return why


__all__ = ["CallGuard", "GUARDS_KEY", "SameContents", "first_failure", "guarded", "input_position",
           "positions_increase_within_documents"]
