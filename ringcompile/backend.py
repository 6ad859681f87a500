"""The ``ring`` torch.compile backend: normalise, find attention, rewrite, shard, compile the rest.

Any failure before the inner compiler (other than a bad user option) falls back to compiling
the original graph unchanged: the answer is then correct but unsharded, and a WARNING says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx

from .errors import OptionError
from .log import get_logger
from .options import Options
from .site import AttentionSite

log = get_logger(__name__)


@dataclasses.dataclass
class CompiledGraph:
    """What the backend learned about one Dynamo graph (kept for explain() and tests)."""

    sites: list[AttentionSite]
    rejected: list[Any]
    graph: fx.GraphModule | None
    fallback_reason: str | None = None


# the graphs compiled by this process, oldest first (the last 1024 kept); tests and tools read them
HISTORY: list[CompiledGraph] = []
_HISTORY_LIMIT = 1024


def _record(entry: CompiledGraph) -> None:
    HISTORY.append(entry)
    del HISTORY[:-_HISTORY_LIMIT]


def may_hold_attention(gm: fx.GraphModule) -> bool:
    """Cheap pre-check on the Dynamo graph: no softmax, SDPA or flex call (HOP bodies included) means
    nothing to find."""
    from .passes.hops import attention_calls

    return bool(attention_calls(gm))


def transform(gm: fx.GraphModule, options: Options) -> tuple[fx.GraphModule, CompiledGraph]:
    """Steps 1-3 (normalise, find, rewrite) on a Dynamo graph; raises on failure.

    A graph without any softmax or SDPA is returned as it is (no retrace).
    """
    from .passes import hops
    from .passes.find_attention import find_attention
    from .passes.normalize import normalize
    from .passes.rewrite import rewrite_attention

    if not may_hold_attention(gm):
        return gm, CompiledGraph([], [], gm)
    aten_gm = normalize(gm)
    sites, rejected = find_attention(aten_gm)
    rejected = [*rejected, *aten_gm.meta.get(hops.REJECTED_KEY, [])]  # attention inside opaque HOPs
    if sites:
        rewrite_attention(aten_gm, sites, options)
        hops.mark_ring_ops_saved(aten_gm)  # checkpointed regions reuse (out, lse), never re-run the ring
    return aten_gm, CompiledGraph(sites, rejected, aten_gm)


def _world_size(options: Options) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    group = options.group
    if group is not None and hasattr(group, "get_group"):  # a DeviceMesh
        group = group.get_group(options.mesh_dim) if options.mesh_dim is not None else group.get_group()
    return dist.get_world_size(group)


def _shard(aten_gm: fx.GraphModule, sites: list[AttentionSite], options: Options) -> fx.GraphModule:
    if not options.shard_graph or not any(s.rewritten for s in sites) or _world_size(options) <= 1:
        return aten_gm
    try:
        from .passes.shard import shard_graph
    except ImportError as exc:
        log.warning("graph sharding unavailable (%s); attention runs unsharded on every rank", exc)
        return aten_gm
    result = shard_graph(aten_gm, sites, options)
    return result if isinstance(result, fx.GraphModule) else aten_gm


def inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> Callable:
    """Hand a graph to the inner compiler named by ``options.inner``."""
    if options.inner == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def ring_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 options: Mapping[str, Any] | Options | None = None) -> Callable:
    """``torch.compile(model, backend="ring", options={...})`` lands here."""
    opts = options if isinstance(options, Options) else Options.from_mapping(options)
    try:
        aten_gm, entry = transform(gm, opts)
        aten_gm = _shard(aten_gm, entry.sites, opts)
        entry.graph = aten_gm
    except OptionError:
        raise
    except Exception as exc:  # noqa: BLE001 - any internal failure: run the original graph instead
        log.warning("ringcompile: falling back to the original graph (attention not rewritten): %s: %s",
                    type(exc).__name__, exc)
        _record(CompiledGraph([], [], None, fallback_reason=f"{type(exc).__name__}: {exc}"))
        return inner_compile(gm, example_inputs, opts)
    _record(entry)
    return inner_compile(aten_gm, example_inputs, opts)


def rewritten_op_count(gm: fx.GraphModule) -> int:
    """How many ring_attention calls a graph holds (for tests and reports)."""
    target = torch.ops.ringcompile.ring_attention.default
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)
