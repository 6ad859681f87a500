"""The cost model's Plan reaches the runtime: the ring's K/V chunk and the Triton tiles of a call.

Once the strategy is known, the planner's Plan for *that* strategy gives the K/V tokens per
ring transfer chunk (``Plan.block_size``) and the Triton tile sizes (``Plan.tiles``). What
the user set on the spec wins; tiles from the plan are used only on CUDA (elsewhere the
kernels' own defaults stay). The plan is deterministic in the call's static shape and its
sequence length, so every rank agrees on the chunking without talking. The result is the
spec the strategy runs, with ``block_size`` = the effective chunk and ``tiles`` = the
effective tiles; it is cached per (spec, chunk, tiles) so kernels cached per spec stay warm.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

from ringcompile.log import get_logger
from ringcompile.spec import AttentionSpec

log = get_logger(__name__)

CHUNKED = ("ring", "zigzag")  # strategies whose K/V travel in chunks
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DERIVED_PER_SPEC = 64
_LOCK = threading.Lock()
_WARNED: set[str] = set()


def planner_query(q: torch.Tensor, k: torch.Tensor, seq_len: int, world_size: int, spec: AttentionSpec,
                  strategies: tuple[str, ...], backward: bool = True) -> dict[str, Any]:
    """The arguments of ``cost_model.planner.choose_for_call`` for this call, among ``strategies``."""
    causal = spec.mask is not None and "causal" in spec.mask.kinds
    return dict(seq_len=int(seq_len), world_size=world_size, batch=q.shape[0], heads=q.shape[1],
                kv_heads=k.shape[1], head_dim=q.shape[-1], dtype=q.dtype, causal=causal, backward=backward,
                layout=None, strategies=strategies, device=q.device.type, profile=spec.profile)


def call_plan(q: torch.Tensor, k: torch.Tensor, seq_len: int, world_size: int, spec: AttentionSpec,
              strategy: str) -> Any | None:
    """The planner's Plan for ``strategy`` on this call (forward+backward, as for training), or None."""
    from ringcompile.cost_model.planner import choose_for_call  # lazily: the cost model is heavy

    try:
        return choose_for_call(**planner_query(q, k, seq_len, world_size, spec, (strategy,)))
    except Exception as e:  # the planner is advisory: whole shards and default tiles still run
        message = f"{type(e).__name__}: {e}"
        if message not in _WARNED:
            _WARNED.add(message)
            log.warning("cost-model plan for strategy %r failed (%s); K/V travel as whole shards and the "
                        "kernels use their default tiles", strategy, message)
        return None


def effective_spec(q: torch.Tensor, k: torch.Tensor, seq_len: int, world_size: int, spec: AttentionSpec,
                   strategy: str, plan: Any | None = None) -> AttentionSpec:
    """``spec`` with ``block_size`` and ``tiles`` resolved for this call (the user's, else the plan's).

    ``plan`` may be given when the caller already holds the Plan for ``strategy``.
    """
    # a hybrid split "hybrid-<outer>x<inner>" plans its outer ring's chunk (tokens of the node chunk)
    need_chunk = ((strategy in CHUNKED or strategy.startswith("hybrid-")) and spec.block_size is None
                  and world_size > 1)
    need_tiles = q.device.type == "cuda" and spec.tiles is None
    if not (need_chunk or need_tiles):
        return spec
    if plan is None or getattr(plan, "strategy", None) != strategy:
        plan = call_plan(q, k, seq_len, world_size, spec, strategy)
    chunk, tiles = spec.block_size, spec.tiles
    if plan is not None:
        if need_chunk and getattr(plan, "block_size", None):
            chunk = int(plan.block_size)
        if need_tiles and getattr(plan, "tiles", None):
            tiles = dict(plan.tiles)
    log.debug("attention %s: strategy %s, K/V chunk %s tokens (q length %d), tiles %s%s", spec.name or "<op>",
              strategy, chunk if chunk is not None else "whole-shard", q.shape[2], tiles,
              " (from the plan)" if plan is not None else "")
    return derived_spec(spec, chunk, tiles)


def _tiles_key(tiles: Any) -> Any:
    if isinstance(tiles, dict):
        return tuple(sorted((str(k), v) for k, v in tiles.items()))
    try:
        hash(tiles)
    except TypeError:
        return ("id", id(tiles))
    return tiles


def derived_spec(spec: AttentionSpec, chunk: int | None, tiles: Any) -> AttentionSpec:
    """``spec.replace(block_size=chunk, tiles=tiles)``, the same object for the same inputs."""
    if chunk == spec.block_size and tiles is spec.tiles:
        return spec
    key = (chunk, _tiles_key(tiles))
    with _LOCK:
        per_spec = _DERIVED.get(spec)
        if per_spec is None:
            per_spec = _DERIVED[spec] = OrderedDict()
        found = per_spec.get(key)
        if found is None:
            found = per_spec[key] = spec.replace(block_size=chunk, tiles=tiles)
            if len(per_spec) > _DERIVED_PER_SPEC:
                per_spec.popitem(last=False)
        else:
            per_spec.move_to_end(key)
        return found
