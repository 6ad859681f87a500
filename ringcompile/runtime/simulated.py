"""N virtual ranks in one process: the same strategies, no processes, for fast property tests.

Each virtual rank is a thread running the real per-rank code against a
``SimulatedCommunicator``; messages are cloned tensors in per-(receiver, sender, channel)
queues, so ordering matches a real ring. A failing rank aborts the others at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ringcompile.errors import CommunicationError

from .communicator import Communicator, MailboxCollectives

Tensor = torch.Tensor
T = TypeVar("T")
_POLL = 0.02


class _Hub:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.abort = threading.Event()
        self._lock = threading.Lock()
        self._boxes: dict[tuple[int, int, Any], queue.Queue] = {}

    def box(self, dst: int, src: int, channel: Any) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault((dst, src, channel), queue.Queue())


class _Aborted(CommunicationError):
    """Raised in a virtual rank because another one failed first (never reported on its own)."""


class SimulatedCommunicator(MailboxCollectives):
    def __init__(self, hub: _Hub, rank: int, timeout: float) -> None:
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.timeout = timeout

    def _send(self, dst: int, channel: Any, tensors: Sequence[Tensor]) -> None:
        self.hub.box(dst, self.rank, channel).put([t.detach().clone() for t in tensors])

    def _recv(self, src: int, channel: Any, step: int, what: str) -> list[Tensor]:
        box = self.hub.box(self.rank, src, channel)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return box.get(timeout=_POLL)
            except queue.Empty:
                if self.hub.abort.is_set():
                    raise _Aborted(f"virtual rank {self.rank}: aborted at step {step}") from None
                if time.monotonic() > deadline:
                    raise self.error(step, what, f"nothing arrived from virtual rank {src}") from None



def simulate(fn_per_rank: Callable[[Communicator], T], world_size: int, timeout: float = 60.0) -> list[T]:
    """Run ``fn_per_rank(comm)`` on ``world_size`` virtual ranks; results in rank order.

    The first real exception of any rank is re-raised here; the other ranks stop instead of
    waiting out the timeout.
    """
    hub = _Hub(world_size)
    comms = [SimulatedCommunicator(hub, r, timeout) for r in range(world_size)]
    if world_size == 1:
        return [fn_per_rank(comms[0])]
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def run(rank: int) -> None:
        try:
            results[rank] = fn_per_rank(comms[rank])
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors.append((rank, e))
            hub.abort.set()

    threads = [threading.Thread(target=run, args=(r,), name=f"ring-sim-{r}", daemon=True)
               for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e[1], _Aborted)]
    if real or errors:
        raise (real or errors)[0][1]
    return results


def simulate_single(timeout: float = 60.0) -> SimulatedCommunicator:
    """A world-size-1 communicator (a rank alone in its ring)."""
    return SimulatedCommunicator(_Hub(1), 0, timeout)


class _SimulatedRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec, world_size, strategy, layout, seq_len, mask_extras, seed, inner_size,
                *score_extras):
        from .execute import run_forward
        from .layouts import shard_tensor, unshard_tensor

        shards = [[shard_tensor(x.detach(), 2, world_size, r, layout, seq_len) for r in range(world_size)]
                  for x in (q, k, v)]

        def rank_forward(comm: Communicator):
            r = comm.rank
            comm = _levels(comm, inner_size)
            out, lse = run_forward(comm, shards[0][r], shards[1][r], shards[2][r], mask_extras,
                                   [e.detach() for e in score_extras], seq_len, spec, strategy, layout, seed)
            return out.to(q.dtype), lse

        results = simulate(rank_forward, world_size, spec.timeout)
        ctx.setup = (spec, world_size, strategy, layout, seq_len, mask_extras, seed, q.dtype, k.dtype,
                     v.dtype, inner_size)
        ctx.shards = shards
        ctx.results = results
        ctx.extras = [e.detach() for e in score_extras]
        return unshard_tensor([o for o, _ in results], 2, layout, seq_len)

    @staticmethod
    def backward(ctx, dout):
        from .execute import run_backward
        from .layouts import shard_tensor, unshard_tensor

        spec, world_size, strategy, layout, seq_len, mask_extras, seed, qd, kd, vd, inner_size = ctx.setup
        douts = [shard_tensor(dout.contiguous(), 2, world_size, r, layout, seq_len)
                 for r in range(world_size)]
        qs, ks, vs = ctx.shards

        def rank_backward(comm: Communicator):
            r = comm.rank
            out, lse = ctx.results[r]
            comm = _levels(comm, inner_size)
            return run_backward(comm, douts[r].to(qd), qs[r], ks[r], vs[r], out, lse, mask_extras, ctx.extras,
                                seq_len, spec, strategy, layout, seed)

        grads = simulate(rank_backward, world_size, spec.timeout)
        dq, dk, dv = (unshard_tensor([g[i] for g in grads], 2, layout, seq_len).to(dt)
                      for i, dt in ((0, qd), (1, kd), (2, vd)))
        d_extras = [None if d is None else d.to(e.dtype)
                    for d, e in zip(grads[0][3], ctx.extras, strict=True)]
        return (dq, dk, dv, None, None, None, None, None, None, None, None, *d_extras)


def _levels(comm: Communicator, inner_size: int | None) -> Communicator:
    """The virtual world seen as (world // inner_size) x inner_size ranks, for strategy "hybrid"."""
    if inner_size is None:
        return comm
    from .two_level import split_simulated

    return split_simulated(comm, inner_size)


def simulated_ring_attention(
    q: Tensor, k: Tensor, v: Tensor, *, world_size: int, strategy: str = "ring", layout: str | None = None,
    is_causal: bool = False, mask_mod: Callable | None = None, score_mod: Callable | None = None,
    scale: float | None = None, enable_gqa: bool = False, seq_len: int | None = None,
    mask: Any = None, score: Any = None, mask_extras: Sequence[Tensor] = (),
    score_extras: Sequence[Tensor] = (),
    block_size: int | None = None, kernel: str = "auto", timeout: float = 60.0, dropout_p: float = 0.0,
    dropout_seed: int | None = None, inner_size: int | None = None, dead_rows: Any = None,
) -> Tensor:
    """Ring attention of FULL (B, H, S, D) tensors on ``world_size`` virtual ranks; differentiable.

    Inputs are sharded by ``layout`` (padded when S does not divide), each virtual rank runs
    the real strategy code, and the output comes back unsharded. ``mask``/``score`` are
    ``mods.Mod`` objects with ``mask_extras``/``score_extras`` (as discovery produces them);
    ``mask_mod``/``score_mod`` are FlexAttention-style callables, as in ``ring_attention``.
    ``inner_size`` makes the virtual world two-level, (world_size // inner_size) x inner_size
    (flattened rank = outer * inner_size + inner), as strategy "hybrid" needs.
    ``dead_rows``: a ``spec.DeadRowForm`` (the exact bias form of finite masking constants).
    """
    from ringcompile.mods import and_masks, compose_scores

    from .call_plan import effective_spec
    from .choice import choose_strategy, hybrid_plan_name
    from .layouts import check_layout
    from .user_spec import build_spec, check_gqa

    check_gqa(q, k, enable_gqa)
    spec = build_spec(is_causal=is_causal, mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                      strategy=strategy, layout=layout, kernel=kernel, timeout=timeout, block_size=block_size)
    if mask is not None:
        spec = spec.replace(mask=and_masks(spec.mask, mask) if spec.mask is not None else mask)
    if score is not None:
        spec = spec.replace(score=compose_scores(spec.score, score) if spec.score is not None else score)
    if dropout_p:
        spec = spec.replace(dropout_p=dropout_p)
    if dead_rows is not None:
        spec = spec.replace(dead_rows=dead_rows)
    seed = None if dropout_seed is None else torch.tensor([dropout_seed], dtype=torch.int64)
    layout = check_layout(spec.layout)
    seq_len = q.shape[2] if seq_len is None else seq_len
    chosen = choose_strategy(q, k, v, seq_len, world_size, spec, layout,
                             two_level=(world_size // inner_size, inner_size) if inner_size else None)
    planned = (hybrid_plan_name((world_size // inner_size, inner_size), layout, spec)
               if chosen == "hybrid" and inner_size else chosen)
    spec = effective_spec(q, k, seq_len, world_size, spec, planned)  # K/V chunk and tiles, as dispatch does
    return _SimulatedRing.apply(q, k, v, spec, world_size, chosen, layout, seq_len, list(mask_extras), seed,
                                inner_size, *score_extras)
