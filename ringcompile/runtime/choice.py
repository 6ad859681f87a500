"""Which strategy a call runs: the user's, or for "auto" the cost model's pick among the usable ones.

Shared by the process-group entry points (``dispatch``) and the simulated ring
(``simulated_api``); deterministic in its inputs, so every rank picks the same.
"""

from __future__ import annotations

import torch

from ringcompile.errors import OptionError
from ringcompile.log import get_logger
from ringcompile.spec import AttentionSpec

from .call_plan import planner_query
from .strategies import NAMES

log = get_logger(__name__)

# strategies that can run on shards of each layout ("local" takes full tensors)
COMPATIBLE = {
    "contiguous": ("ring", "allgather", "ulysses", "hybrid", "local"),
    "zigzag": ("zigzag", "ring", "allgather", "ulysses", "hybrid", "local"),
}
ALLGATHER_MAX_SEQ = 4096  # heuristic when no cost model: gathering K/V once wins for short sequences


# what strategy "auto" may pick on shards of each layout (the planner ranks them; ulysses needs
# heads divisible by N). Ulysses runs on either layout: it gathers whole sequences.
AUTO_CANDIDATES = {"contiguous": ("ring", "allgather", "ulysses"), "zigzag": ("zigzag", "ulysses")}


def hybrid_plan_name(two_level: tuple[int, int], layout: str, spec: AttentionSpec) -> str:
    """The cost model's name for the hybrid split this call runs: on contiguous shards under a causal
    mask the outer ring runs contiguous node chunks (imbalanced), and the model must say so."""
    from ringcompile.cost_model.strategies import hybrid_name

    causal = spec.mask is not None and "causal" in spec.mask.kinds
    return hybrid_name(*two_level, contiguous=causal and layout == "contiguous")


def _auto_candidates(q: torch.Tensor, k: torch.Tensor, world_size: int, spec: AttentionSpec,
                     layout: str, two_level: tuple[int, int] | None = None) -> tuple[str, ...]:
    heads_split = q.shape[1] % world_size == 0 and k.shape[1] % world_size == 0
    names = tuple(s for s in AUTO_CANDIDATES[layout] if s != "ulysses" or heads_split)
    if two_level is not None:  # a 2-D group: its one hybrid split, when heads divide over a node
        outer, inner = two_level
        if outer > 1 and inner > 1 and q.shape[1] % inner == 0:
            names += (hybrid_plan_name(two_level, layout, spec),)
    return names


def _planner_choice(q: torch.Tensor, k: torch.Tensor, seq_len: int, world_size: int, spec: AttentionSpec,
                    candidates: tuple[str, ...], backward: bool) -> str | None:
    from ringcompile.cost_model.planner import choose_for_call  # lazily: the cost model is heavy

    try:
        plan = choose_for_call(**planner_query(q, k, seq_len, world_size, spec, candidates, backward))
        return getattr(plan, "strategy", None)
    except Exception as e:  # the planner is advisory: a failure falls back to the heuristic
        log.warning("cost-model planner failed (%s); using the built-in heuristic", e)
        return None


def choose_strategy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, world_size: int,
                    spec: AttentionSpec, layout: str, backward: bool = False,
                    two_level: tuple[int, int] | None = None) -> str:
    """The strategy this call runs: deterministic in its inputs, so every rank picks the same.

    ``two_level`` = (outer, inner) of a 2-D group: "auto" may then pick "hybrid"."""
    if spec.strategy not in ("auto", *NAMES):
        raise OptionError(f"strategy must be 'auto' or one of {list(NAMES)}, got {spec.strategy!r}")
    if world_size == 1:
        return "local"
    if spec.strategy != "auto":
        if spec.strategy not in COMPATIBLE[layout]:
            raise OptionError(f"strategy {spec.strategy!r} cannot run on {layout!r}-layout shards; "
                              f"valid here: {list(COMPATIBLE[layout])}")
        return spec.strategy
    candidates = _auto_candidates(q, k, world_size, spec, layout, two_level)
    fallback = "zigzag" if layout == "zigzag" else "allgather" if seq_len <= ALLGATHER_MAX_SEQ else "ring"
    if len(candidates) == 1:
        return candidates[0]
    choice = _planner_choice(q, k, seq_len, world_size, spec, candidates, backward)
    if choice in candidates:
        return "hybrid" if choice.startswith("hybrid-") else choice
    if choice is not None:
        log.info("planner chose %r, not usable on %s shards here; using %s", choice, layout, fallback)
    return fallback
