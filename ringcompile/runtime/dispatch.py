"""Entry points of the custom op: resolve the group, pick the strategy for this call, run it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringcompile.log import get_logger
from ringcompile.spec import AttentionSpec

from .call_plan import effective_spec
from .choice import AUTO_CANDIDATES, COMPATIBLE, choose_strategy, hybrid_plan_name
from .communicator import RingCommunicator
from .execute import run_backward, run_forward
from .group import ResolvedGroup, TwoLevelGroup, group_key, resolve_group
from .layouts import check_layout

log = get_logger(__name__)

__all__ = ["AUTO_CANDIDATES", "COMPATIBLE", "attention_backward", "attention_forward", "choose_strategy",
           "metadata_check_key"]


def _plan(q, k, v, seq_len, spec) -> tuple[ResolvedGroup, str, str, AttentionSpec]:
    """Forward and backward plan alike (as for training), so both run the same strategy.

    The returned spec is the one the strategy runs: ``block_size`` (K/V chunk per ring
    transfer) and ``tiles`` resolved from the cost model's Plan for the chosen strategy
    unless the user set them (``call_plan.effective_spec``).
    """
    group = resolve_group(spec.group, spec.mesh_dim)
    layout = check_layout(spec.layout)
    two_level = (group.outer.world_size, group.inner.world_size) if isinstance(group, TwoLevelGroup) else None
    strategy = choose_strategy(q, k, v, seq_len, group.world_size, spec, layout, backward=True,
                               two_level=two_level)
    log.debug("attention %s: strategy %s, layout %s, rank %d of %d", spec.name or "<op>", strategy, layout,
              group.rank, group.world_size)
    planned = hybrid_plan_name(two_level, layout, spec) if strategy == "hybrid" and two_level else strategy
    run_spec = effective_spec(q, k, seq_len, group.world_size, spec, planned)
    return group, strategy, layout, run_spec


def _communicator(group: ResolvedGroup, spec: AttentionSpec, device: torch.device):
    if group.is_single:
        from .simulated import simulate_single

        return simulate_single(spec.timeout)
    if isinstance(group, TwoLevelGroup):  # mesh_dim=(outer, inner)
        from .two_level import two_level_communicator

        return two_level_communicator(group, spec.timeout, device)
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
