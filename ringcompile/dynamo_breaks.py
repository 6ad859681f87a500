"""Graph breaks Dynamo took before handing us a graph, where they hide attention from the backend.

A checkpointed region (``torch.utils.checkpoint``) whose body Dynamo refuses to trace as one higher-order op
(a side effect inside it: transformers >= 5.25 with Hugging Face's ``kernels`` installed sets a context
variable in every hub-kernel layer's forward) graph-breaks: the whole region then runs eagerly, outside
every graph a backend sees, so its attention is never sharded and never in ``explain()``. The backend
cannot see that code; it can see Dynamo's break counters and say so once per reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .log import get_logger

log = get_logger(__name__)

_warned: set[str] = set()

# the Dynamo setting that lets a checkpointed region with a side effect be captured whole
CHECKPOINT_SETTING = "skip_fwd_side_effects_in_bwd_under_checkpoint"
CHECKPOINT_REMEDY = (f"set torch._dynamo.config.{CHECKPOINT_SETTING} = True before "
                     "compiling (the side effect is then not replayed by the backward's recompute), or "
                     "remove the side effect")
REMEDY = "move the side effect out of the region (Dynamo's hint above says how)"


def skip_checkpoint_side_effects() -> Any:
    """A ``torch._dynamo.config.patch`` setting ``CHECKPOINT_SETTING`` (no-op on a torch without it)."""
    import torch

    return torch._dynamo.config.patch(**({CHECKPOINT_SETTING: True}
                                          if hasattr(torch._dynamo.config, CHECKPOINT_SETTING) else {}))


def hop_breaks() -> list[str]:
    """Dynamo's graph-break reasons so far at a higher-order op (a checkpointed region among them)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - torch without Dynamo
        return []
    return [r for r in counters.get("graph_break", {}) if str(r).startswith("HOP")]


def warn_hop_breaks() -> list[str]:
    """Log a WARNING for each new higher-order-op graph-break reason; returns the new ones."""
    new = [r for r in hop_breaks() if r not in _warned]
    for reason in new:
        _warned.add(reason)
        first = " ".join(str(reason).split())[:300]
        remedy = CHECKPOINT_REMEDY if "torch.utils.checkpoint" in str(reason) else REMEDY
        log.warning("ringcompile: Dynamo graph-broke at a higher-order op (a checkpointed region, a "
                    "cond, ...), which then runs eagerly outside the compiled graphs: attention in it is not "
                    "sharded and not in explain(): %s. To fix: %s", first, remedy)
    return new


def checked_on_first_call(compiled: Callable) -> Callable:
    """``compiled``, checking the break counters again on its first call: Dynamo counts a break it takes
    while tracing a frame after it has compiled the graph before the break."""
    done = False

    def call(*args: Any) -> Any:
        nonlocal done
        if not done:
            done = True
            warn_hop_breaks()
        return compiled(*args)

    if getattr(compiled, "_boxed_call", False):
        call._boxed_call = True  # type: ignore[attr-defined]
    return call
