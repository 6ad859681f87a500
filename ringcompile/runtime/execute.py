"""Run one strategy on one rank, given a communicator: the code shared by the real process
group path (``dispatch``) and the simulated ring (``simulated_api``)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from ringcompile.errors import RingCompileError, ShapeMismatchError
from ringcompile.kernels.select import block_kernels
from ringcompile.spec import AttentionSpec

from . import dead_rows
from .call_plan import CHUNKED
from .communicator import Communicator
from .strategies import STRATEGIES
from .strategies.common import RingContext
from .validate import check_ranks_agree, metadata, validate_inputs

Tensor = torch.Tensor


def _context(comm: Communicator, q: Tensor, mask_extras, score_extras, seq_len: int, spec: AttentionSpec,
             strategy: str, layout: str, dropout_seed) -> RingContext:
    return RingContext(comm, spec, strategy, int(seq_len), layout, list(mask_extras), list(score_extras),
                       block_kernels(spec, q.device), dropout_seed)


def _forward_pass(comm: Communicator, q: Tensor, k: Tensor, v: Tensor, seq_len: int, strategy: str,
                  layout: str, dropout_seed) -> dead_rows.Pass:
    """One forward of the strategy over these q/k/v (or a batch slice of them) for a given spec and
    extras (the dead-row correction runs a second one with the bias form on the dead batch rows)."""
    def run(run_spec: AttentionSpec, m_extras, s_extras, rows: dead_rows.BatchRows | None = None
            ) -> tuple[Tensor, Tensor]:
        qs, ks, vs = (q, k, v) if rows is None else (rows.take(q), rows.take(k), rows.take(v))
        seed = dropout_seed if rows is None else rows.seed
        ctx = _context(comm, qs, m_extras, s_extras, seq_len, run_spec, strategy, layout, seed)
        return STRATEGIES[strategy].forward(ctx, qs, ks, vs)
    return run


def run_forward(
    comm: Communicator, q: Tensor, k: Tensor, v: Tensor, mask_extras: Sequence[Tensor],
    score_extras: Sequence[Tensor], seq_len: int, spec: AttentionSpec, strategy: str, layout: str,
    dropout_seed: Tensor | None = None, check_key: Hashable | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of this rank's shard, fp32 (fp64 for fp64 inputs).

    Ranks validate locally, then (before any ring step) compare metadata: a rank with bad inputs
    raises its own error and the others a ShapeMismatchError naming it, all at once.
    """
    problem: RingCompileError | None = None
    try:
        validate_inputs(q, k, v, seq_len, comm.world_size, layout, strategy)
    except RingCompileError as e:
        problem = e
    if strategy != "local":
        meta = metadata(q, k, v, seq_len, strategy, layout, len(mask_extras), len(score_extras),
                        valid=problem is None, chunk=spec.block_size if strategy in CHUNKED else None)
        try:
            check_ranks_agree(comm, meta, check_key if problem is None else None)
        except ShapeMismatchError:
            if problem is None:
                raise
    if problem is not None:
        raise problem
    run = _forward_pass(comm, q, k, v, seq_len, strategy, layout, dropout_seed)
    out, lse = run(spec, mask_extras, score_extras)
    if spec.dead_rows is None:
        return out, lse
    return dead_rows.correct_forward(comm, q, out, lse, mask_extras, score_extras, seq_len, spec, layout, run,
                                     dropout_seed)


def run_backward(
    comm: Communicator, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    mask_extras: Sequence[Tensor], score_extras: Sequence[Tensor], seq_len: int, spec: AttentionSpec,
    strategy: str, layout: str, dropout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
    """(dq, dk, dv, d_score_extras) for this rank's shard; extras' grads are summed over ranks."""
    validate_inputs(q, k, v, seq_len, comm.world_size, layout, strategy)

    def run(run_spec: AttentionSpec, m_extras, s_extras, grad_out: Tensor, run_lse: Tensor,
            rows: dead_rows.BatchRows | None = None) -> tuple:
        """``grad_out``/``run_lse`` are already of ``rows`` (all rows when None)."""
        qs, ks, vs, outs = (q, k, v, out) if rows is None else (rows.take(x) for x in (q, k, v, out))
        seed = dropout_seed if rows is None else rows.seed
        ctx = _context(comm, qs, m_extras, s_extras, seq_len, run_spec, strategy, layout, seed)
        return STRATEGIES[strategy].backward(ctx, grad_out, qs, ks, vs, outs, run_lse)

    if spec.dead_rows is None:
        return run(spec, mask_extras, score_extras, dout, lse)
    forward = _forward_pass(comm, q, k, v, seq_len, strategy, layout, dropout_seed)
    return dead_rows.correct_backward(comm, dout, q, lse, mask_extras, score_extras, seq_len, spec, layout,
                                      forward, run, dropout_seed)
