"""The ``ring`` torch.compile backend: run the declared pipeline (``passes.STAGES``), compile the rest.

Any failure before the inner compiler (other than a bad user option) falls back to compiling
the original graph unchanged: the answer is then correct but unsharded, and a WARNING says why.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.fx as fx

from .dynamo_breaks import checked_on_first_call, warn_hop_breaks
from .errors import OptionError, UnshardedAttentionError
from .log import get_logger
from .options import Options
from .passes import Decision, PipelineState, run_pipeline, stages_through, world_size
from .passes.flex_guards import GUARDS_KEY, guarded
from .site import AttentionSite

log = get_logger(__name__)


@dataclasses.dataclass
class CompiledGraph:
    """What the backend learned about one Dynamo graph (kept for explain() and tests)."""

    sites: list[AttentionSite]
    rejected: list[Any]
    graph: fx.GraphModule | None
    fallback_reason: str | None = None
    decisions: list[Decision] = dataclasses.field(default_factory=list)  # per stage: what and why


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
    """The pipeline through ``rewrite`` (normalise, find, rewrite) on a Dynamo graph; raises on failure.

    A graph without any softmax or SDPA is returned as it is (no retrace).
    """
    gm, decoded, state = _prologue(gm, options)
    if state is None:
        return gm, CompiledGraph([], [], gm, decisions=decoded)
    run_pipeline(state, stages_through("rewrite"))
    return state.graph, _entry(state)


def _state(gm: fx.GraphModule, options: Options) -> PipelineState | None:
    return PipelineState(gm, options) if may_hold_attention(gm) else None


def _prologue(gm: fx.GraphModule,
              options: Options) -> tuple[fx.GraphModule, list[Decision], PipelineState | None]:
    """What both entry points (``transform`` for explain, ``ring_backend`` for compile) do first: the
    decode rewrite over a sharded cache, then the pipeline state (None: nothing attention-like)."""
    gm, decoded = rewrite_cache_attention(gm)
    state = _state(gm, options)
    if state is not None:
        state.decisions[:0] = decoded
    return gm, decoded, state


def holds_sharded_cache(gm: fx.GraphModule) -> bool:
    """Does the graph read a sharded KV cache (``ringcompile::cache_gather``)?"""
    return any(n.op == "call_function" and "cache_gather" in str(n.target) for n in gm.graph.nodes)


def rewrite_cache_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[Decision]]:
    """Attention over a sharded KV cache (``sharded_cache(..., compiled=True)``) becomes decode_attention
    on the shard before the pipeline runs (``passes/rules/decode.py``): the graph to go on with and what
    was rewritten, as decisions.

    The rewrite works on a copy, so a failure half-way returns the untouched graph (whose gathered cache
    is correct), never a partly rewritten one.
    """
    if not holds_sharded_cache(gm):
        return gm, []
    from .passes.rules.decode import rewrite_cache_attention

    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # Graph deepcopy: new nodes, meta copied shallow
    work.meta.update(gm.meta)
    try:
        done = rewrite_cache_attention(work)
    except Exception as exc:  # noqa: BLE001 - the gathered cache is still correct
        log.warning("ringcompile: attention over the sharded KV cache left on the gathered cache: %s: %s",
                    type(exc).__name__, exc)
        return gm, []
    decided = [Decision("decode", d.location, d.pattern, d.reason.split(" ")[0], d.reason)
               for d in done if d.rewritten]
    return (work, decided) if decided else (gm, [])


def _entry(state: PipelineState) -> CompiledGraph:
    return CompiledGraph(state.sites, state.rejected, state.graph, decisions=state.decisions)


def _unsharded_message(left: list[Decision]) -> str:
    """Each site once: a call inside an opaque HOP body is found both as the HOP's rejection and as a
    body candidate; the first decision (the one with the specific reason) names it."""
    named: dict[str, Decision] = {}
    for d in left:
        named.setdefault(d.location, d)
    return "; ".join(f"{d.location} [{d.pattern}] ({d.stage}: {d.outcome}): {d.reason}"
                     for d in named.values())


def _check_all_sharded(state: PipelineState, fallback: str | None = None) -> None:
    """No silent fallback: one WARNING per graph that leaves attention unsharded on more than one rank
    (UnshardedAttentionError under ``require_sharded=True``); a fallback with one rank keeps its warning."""
    ranks = world_size(state.options)
    left = state.unsharded_attention()
    if ranks <= 1 or not left:
        if fallback is not None:
            log.warning("ringcompile: falling back to the original graph (attention not rewritten): %s",
                        fallback)
        return
    what = _unsharded_message(left)
    if fallback is not None:
        what = f"falling back to the original graph ({fallback}); {what}"
    if state.options.require_sharded:
        raise UnshardedAttentionError(
            f"require_sharded=True, but this graph would run attention unsharded on each of {ranks} ranks: "
            f"{what}. Rewrite that attention in a supported form (ringcompile.explain() lists what is "
            "recognised), or drop require_sharded to accept the unsharded (correct, slower) graph.")
    if _plain_cache_warned(left):
        log.info("ringcompile: attention left unsharded on %d ranks (warned before): %s", ranks, what)
        return
    log.warning("ringcompile: attention left unsharded on %d ranks: %s", ranks, what)


# the attention locations (one model) already warned about for running over an unsharded HF KV cache
_PLAIN_CACHE_WARNED: set[tuple[str, ...]] = set()


def _plain_cache_warned(left: list[Decision]) -> bool:
    """One WARNING per compiled model, not per decode graph (each recompile would repeat it): True when
    every unsharded site of this graph is attention over an unsharded HF cache at locations already
    warned about; records them otherwise."""
    from .passes.rules.decode import PLAIN_CACHE_REASON

    if not all(PLAIN_CACHE_REASON in d.reason for d in left):
        return False
    key = tuple(sorted({d.location for d in left}))
    if key in _PLAIN_CACHE_WARNED:
        return True
    _PLAIN_CACHE_WARNED.add(key)
    return False


def inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> Callable:
    """Hand a graph to the inner compiler named by ``options.inner``."""
    if options.inner == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def _profile_node_size(opts: Options) -> int | None:
    """The node size of a two-level ``profile`` when it should factor the group: strategy "auto" or
    "hybrid" on the whole world (a 1-D group, not a mesh) wider than one node, which it divides."""
    if opts.profile is None or opts.strategy not in ("auto", "hybrid") or opts.mesh_dim is not None:
        return None
    from .cost_model.profiles import load_profile
    from .runtime.group import resolve_group

    try:
        prof = load_profile(opts.profile)
    except OptionError as exc:   # the planner reports a bad profile where it plans (and falls back)
        log.info("profile %r not read for the two-level group (%s)", opts.profile, exc)
        return None
    if not prof.two_level:
        return None
    flat = resolve_group(opts.group)
    import torch.distributed as dist

    n = flat.world_size
    if flat.is_single or n != dist.get_world_size() or n <= prof.node_size or n % prof.node_size:
        log.info("profile %s has %d ranks a node; the %d-rank group stays one level (hybrid needs the whole "
                 "world as >= 2 nodes of that size)", prof.name, prof.node_size, n)
        return None
    return prof.node_size


def _two_level(opts: Options) -> Options:
    """``node_size`` (or a two-level profile's node size): the group as a 2-D mesh ("cp_outer",
    "cp_inner"), built once (a collective every rank runs here, at the same compile)."""
    node_size = opts.node_size if opts.node_size is not None else _profile_node_size(opts)
    if node_size is None:
        return opts
    from .runtime.group import TWO_LEVEL_DIMS, factored_mesh

    mesh = factored_mesh(opts.group, node_size, opts.timeout)
    return opts if mesh is None else dataclasses.replace(opts, group=mesh, mesh_dim=TWO_LEVEL_DIMS)


def ring_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 options: Mapping[str, Any] | Options | None = None) -> Callable:
    """``torch.compile(model, backend="ring", options={...})`` lands here: run ``passes.STAGES``."""
    warn_hop_breaks()
    return checked_on_first_call(_compile(gm, example_inputs, options))


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any],
             options: Mapping[str, Any] | Options | None) -> Callable:
    opts = options if isinstance(options, Options) else Options.from_mapping(options)
    opts = _two_level(opts)
    gm, decoded, state = _prologue(gm, opts)
    if state is None:
        _record(CompiledGraph([], [], gm, decisions=decoded))
        return inner_compile(gm, example_inputs, opts)
    try:
        run_pipeline(state)
    except OptionError:
        raise
    except Exception as exc:  # noqa: BLE001 - any internal failure: run the original graph instead
        reason = f"{type(exc).__name__}: {exc}"
        state.decide("graph", "graph", "graph left unchanged", reason, unsharded=True)
        _record(CompiledGraph([], [], None, fallback_reason=reason, decisions=state.decisions))
        _check_all_sharded(state, fallback=f"{state.decisions[-1].stage} failed: {reason}")
        return inner_compile(gm, example_inputs, opts)
    entry = _entry(state)
    _record(entry)
    _check_all_sharded(state)
    compiled = inner_compile(state.graph, example_inputs, opts)
    guards = state.graph.meta.get(GUARDS_KEY)
    if not guards:
        return compiled
    # facts about input contents the rewrite relied on (Dynamo guards shapes only): checked on every
    # call; a call that breaks one runs the original graph
    return guarded(compiled, lambda: inner_compile(gm, example_inputs, opts), guards)


def rewritten_op_count(gm: fx.GraphModule) -> int:
    """How many ring_attention calls a graph holds (for tests and reports)."""
    from .ops import is_ring_call

    return sum(1 for n in gm.graph.nodes if is_ring_call(n))
