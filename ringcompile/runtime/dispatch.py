"""Entry points of the custom op: resolve the group, pick the strategy for this call, run it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringcompile.errors import OptionError
from ringcompile.log import get_logger
from ringcompile.spec import AttentionSpec

from .call_plan import effective_spec, planner_query
from .communicator import RingCommunicator
from .execute import run_backward, run_forward
from .group import ResolvedGroup, group_key, resolve_group
from .layouts import check_layout
from .strategies import NAMES

log = get_logger(__name__)

# strategies that can run on shards of each layout ("local" takes full tensors)
COMPATIBLE = {
    "contiguous": ("ring", "allgather", "ulysses", "local"),
    "zigzag": ("zigzag", "ring", "allgather", "ulysses", "local"),
}
ALLGATHER_MAX_SEQ = 4096  # heuristic when no cost model: gathering K/V once wins for short sequences


# what strategy "auto" may pick on shards of each layout (the planner ranks them; ulysses needs
# heads divisible by N and no dropout). Ulysses runs on either layout: it gathers whole sequences.
AUTO_CANDIDATES = {"contiguous": ("ring", "allgather", "ulysses"), "zigzag": ("zigzag", "ulysses")}


def _auto_candidates(q: torch.Tensor, k: torch.Tensor, world_size: int, spec: AttentionSpec,
                     layout: str) -> tuple[str, ...]:
    heads_split = q.shape[1] % world_size == 0 and k.shape[1] % world_size == 0 and spec.dropout_p == 0
    return tuple(s for s in AUTO_CANDIDATES[layout] if s != "ulysses" or heads_split)


def _planner_choice(q: torch.Tensor, k: torch.Tensor, seq_len: int, world_size: int, spec: AttentionSpec,
                    candidates: tuple[str, ...], backward: bool) -> str | None:
    try:
        from ringcompile.cost_model.planner import choose_for_call
    except ImportError:
        return None
    try:
        plan = choose_for_call(**planner_query(q, k, seq_len, world_size, spec, candidates, backward))
        return getattr(plan, "strategy", None)
    except Exception as e:  # the planner is advisory: a failure falls back to the heuristic
        log.warning("cost-model planner failed (%s); using the built-in heuristic", e)
        return None


def choose_strategy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, world_size: int,
                    spec: AttentionSpec, layout: str, backward: bool = False) -> str:
    """The strategy this call runs: deterministic in its inputs, so every rank picks the same."""
    if spec.strategy not in ("auto", *NAMES):
        raise OptionError(f"strategy must be 'auto' or one of {list(NAMES)}, got {spec.strategy!r}")
    if world_size == 1:
        return "local"
    if spec.strategy != "auto":
        if spec.strategy not in COMPATIBLE[layout]:
            raise OptionError(f"strategy {spec.strategy!r} cannot run on {layout!r}-layout shards; "
                              f"valid here: {list(COMPATIBLE[layout])}")
        return spec.strategy
    candidates = _auto_candidates(q, k, world_size, spec, layout)
    fallback = "zigzag" if layout == "zigzag" else "allgather" if seq_len <= ALLGATHER_MAX_SEQ else "ring"
    if len(candidates) == 1:
        return candidates[0]
    choice = _planner_choice(q, k, seq_len, world_size, spec, candidates, backward)
    if choice in candidates:
        return choice
    if choice is not None:
        log.info("planner chose %r, not usable on %s shards here; using %s", choice, layout, fallback)
    return fallback


def _plan(q, k, v, seq_len, spec) -> tuple[ResolvedGroup, str, str, AttentionSpec]:
    """Forward and backward plan alike (as for training), so both run the same strategy.

    The returned spec is the one the strategy runs: ``block_size`` (K/V chunk per ring
    transfer) and ``tiles`` resolved from the cost model's Plan for the chosen strategy
    unless the user set them (``call_plan.effective_spec``).
    """
    group = resolve_group(spec.group, spec.mesh_dim)
    layout = check_layout(spec.layout)
    strategy = choose_strategy(q, k, v, seq_len, group.world_size, spec, layout, backward=True)
    if strategy == "ulysses":
        from .strategies.ulysses import check_dropout

        check_dropout(spec)
    log.debug("attention %s: strategy %s, layout %s, rank %d of %d", spec.name or "<op>", strategy, layout,
              group.rank, group.world_size)
    run_spec = effective_spec(q, k, seq_len, group.world_size, spec, strategy)
    return group, strategy, layout, run_spec


def _communicator(group: ResolvedGroup, spec: AttentionSpec, device: torch.device):
    if group.is_single:
        from .simulated import simulate_single

        return simulate_single(spec.timeout)
    return RingCommunicator(group, spec.timeout, device=device)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_extras: Sequence[torch.Tensor],
    score_extras: Sequence[torch.Tensor], seq_len: int, spec: AttentionSpec,
    dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    group, strategy, layout, run_spec = _plan(q, k, v, seq_len, spec)
    comm = _communicator(group, spec, q.device)
    return run_forward(comm, q, k, v, mask_extras, score_extras, seq_len, run_spec, strategy, layout,
                       dropout_seed, check_key=metadata_check_key(q, k, v, seq_len, spec, group, strategy,
                                                                  layout, run_spec.block_size))


def metadata_check_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int, spec: AttentionSpec,
                       group: ResolvedGroup, strategy: str, layout: str, block_size: int | None):
    """What the once-per-key metadata check (``validate.check_ranks_agree``) is cached under.

    By content only: an ``id()`` can be reused on one rank and not on another, and then one rank
    would skip the check's all_gather while its peers run it (mismatched collectives: a hang).
    None (check every call) when the spec has a part with no stable description.
    """
    if not spec.content.stable:
        return None
    return (spec.content.digest, group_key(group), tuple(q.shape), tuple(k.shape), tuple(v.shape),
            str(q.dtype), int(seq_len), strategy, layout, block_size)


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, mask_extras: Sequence[torch.Tensor], score_extras: Sequence[torch.Tensor],
    seq_len: int, spec: AttentionSpec, dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    group, strategy, layout, run_spec = _plan(q, k, v, seq_len, spec)
    comm = _communicator(group, spec, q.device)
    return run_backward(comm, dout, q, k, v, out, lse, mask_extras, score_extras, seq_len, run_spec, strategy,
                        layout, dropout_seed)
