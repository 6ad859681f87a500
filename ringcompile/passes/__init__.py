"""The compile-time pipeline: the named, ordered stages the backend runs on each Dynamo graph.

``STAGES`` is the pipeline (``ringcompile.backend`` runs all of it, ``explain()`` runs it through
``rewrite``). Each stage reads and writes one ``PipelineState`` and records every decision it
makes (what, where, why) as a ``Decision`` naming the stage, so a report can say which stage
decided each thing. The pass modules are imported when their stage runs, not at package import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.fx as fx

from ringcompile.options import Options
from ringcompile.site import AttentionSite


@dataclasses.dataclass(frozen=True)
class Decision:
    """One thing a stage decided. ``leaves_attention_unsharded`` marks attention the graph will run
    unsharded because of it (what the no-silent-fallback warning lists)."""

    stage: str
    location: str
    pattern: str
    outcome: str
    reason: str
    leaves_attention_unsharded: bool = False


@dataclasses.dataclass
class PipelineState:
    """What the stages pass along: the graph (Dynamo's, then the aten one), the sites, the decisions."""

    graph: fx.GraphModule
    options: Options
    sites: list[AttentionSite] = dataclasses.field(default_factory=list)
    rejected: list[Any] = dataclasses.field(default_factory=list)
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    stage: str | None = None  # the stage running (or the one that raised)

    def decide(self, location: str, pattern: str, outcome: str, reason: str, unsharded: bool = False) -> None:
        self.decisions.append(Decision(self.stage or "?", location, pattern, outcome, reason, unsharded))

    def unsharded_attention(self) -> list[Decision]:
        return [d for d in self.decisions if d.leaves_attention_unsharded]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[PipelineState], None]

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or "").strip()


def normalize_stage(state: PipelineState) -> None:
    """Reads the Dynamo graph (torch IR, fake example values); writes ``state.graph``: one pre-autograd
    aten graph, every spelling of matmul/softmax/SDPA in one form (``passes.normalize``)."""
    from .normalize import normalize

    dynamo_nodes = len(state.graph.graph.nodes)
    state.graph = normalize(state.graph)
    state.decide("graph", "graph", "normalised",
                 f"retraced {dynamo_nodes} Dynamo nodes into {len(state.graph.graph.nodes)} aten nodes")


def find_attention_stage(state: PipelineState) -> None:
    """Reads the aten graph; writes ``state.sites`` (one AttentionSite per attention, with its mask and
    score mods) and ``state.rejected`` (attention-like subgraphs left alone, with reasons), and lists
    every softmax / SDPA / flex call no site covers (``passes.find_attention``). The graph is unchanged,
    except for unused head-split views of Bloom's baddbmm biases (``rewrite.split_merged_head_biases``)."""
    from . import hops
    from .find_attention import find_attention
    from .rewrite import split_merged_head_biases

    split_merged_head_biases(state.graph)  # views discovery may use; dead unless a site reads them
    state.sites, state.rejected = find_attention(state.graph)
    state.rejected = [*state.rejected, *state.graph.meta.get(hops.REJECTED_KEY, [])]  # inside opaque HOPs
    for site in state.sites:
        if site.reason is None:
            state.decide(site.location, site.pattern, "site",
                         f"mask={site.mask_description}, score_mod={site.score_description}, "
                         f"gqa={site.gqa_groups}, layout={site.layout}")
        else:
            state.decide(site.location, site.pattern, "site, not rewritable", site.reason, unsharded=True)
    for rej in state.rejected:
        if getattr(rej, "attention", True):
            state.decide(rej.location, rej.pattern, "not a site", rej.reason, unsharded=True)
        else:  # a softmax that is not attention (a router, a feature softmax): reported, never warned about
            state.decide(rej.location, rej.pattern, "not attention", rej.reason)
    _account_for_candidates(state)


def rewrite_stage(state: PipelineState) -> None:
    """Reads the sites; writes the graph: each rewritable site becomes one ``ring_attention`` call and
    its old subgraph is removed; sets ``site.rewritten`` or ``site.reason`` (``passes.rewrite``)."""
    from .flex_sites import connect_lse
    from .rewrite import rewrite_attention

    pending = [s for s in state.sites if s.reason is None]
    if pending:
        from . import hops

        rewrite_attention(state.graph, state.sites, state.options)
        hops.mark_ring_ops_saved(state.graph)  # checkpointed regions reuse (out, lse), never re-run the ring
    # a flex return_lse caller reads the ring op's lse; a flex marker left (not rewritten) cannot run,
    # so the graph falls back with its rule's reason
    connect_lse(state.graph, state.sites, state.rejected)
    for site in pending:
        if site.rewritten:
            state.decide(site.location, site.pattern, "rewritten", "one ringcompile.ring_attention call")
        else:
            state.decide(site.location, site.pattern, "not rewritten", site.reason or "rewrite declined",
                         unsharded=True)


def shard_stage(state: PipelineState) -> None:
    """Reads the rewritten graph and the options' process group; writes the graph sharded along the
    sequence (inputs sliced, collectives inserted, ``graph.meta["ringcompile_shard"]``), or leaves it
    unsharded when there is nothing to shard or one rank (``passes.shard``)."""
    if not state.options.shard_graph:
        state.decide("graph", "graph", "not sharded", "option shard_graph=False")
        return
    if not any(s.rewritten for s in state.sites):
        state.decide("graph", "graph", "not sharded", "no rewritten attention in the graph")
        return
    world = world_size(state.options)
    if world <= 1:
        state.decide("graph", "graph", "not sharded", "world size 1")
        return
    from .shard import shard_graph

    state.graph = shard_graph(state.graph, state.sites, state.options)
    report = state.graph.meta.get("ringcompile_shard")
    what = f"over {world} ranks"
    if report is not None:
        what = (f"sequence {report.seq_len} over {report.world_size} ranks ({report.layout}), "
                f"inputs {report.seeds}, {len(report.gathers)} gathers")
    state.decide("graph", "graph", "sharded", what)
    for name, why in (report.gather_reasons if report is not None else {}).items():
        state.decide(name, "gather", "gathered", why)


STAGES: tuple[Stage, ...] = (
    Stage("normalize", normalize_stage),
    Stage("find_attention", find_attention_stage),
    Stage("rewrite", rewrite_stage),
    Stage("shard", shard_stage),
)


def stages_through(name: str) -> tuple[Stage, ...]:
    """The pipeline up to and including the stage called ``name``."""
    names = [s.name for s in STAGES]
    if name not in names:
        raise KeyError(f"no stage {name!r}; stages are {names}")
    return STAGES[: names.index(name) + 1]


def run_pipeline(state: PipelineState, stages: Sequence[Stage] = STAGES) -> PipelineState:
    """Run ``stages`` in order on ``state``; an exception propagates with ``state.stage`` naming the
    stage that raised (the backend then compiles the original graph)."""
    for stage in stages:
        state.stage = stage.name
        stage.run(state)
    state.stage = None
    return state


def world_size(options: Options) -> int:
    """Ranks of the options' group (1 without torch.distributed), through the runtime's pass interface."""
    from ringcompile.graph_ops import world_size as group_world_size

    return group_world_size(options.group, options.mesh_dim)


# --------------------------------------------------------------------- no silent fallback

_MATMUL_NAMES = ("matmul", "bmm", "einsum", "baddbmm")


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target.lower()
    name = getattr(target, "name", None)
    name = name() if callable(name) else getattr(target, "__name__", str(target))
    return str(name).lower()


def candidate_kind(node: fx.Node) -> str | None:
    """"sdpa", "flex" or "softmax" for a call that computes (part of) attention, else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = _target_name(node)
    if "flex_attention" in name and "backward" not in name:
        return "flex"
    if "scaled_dot_product" in name and "backward" not in name:
        return "sdpa"
    if "softmax" in name and "log_softmax" not in name and "backward" not in name:
        return "softmax"
    return None


def _near_matmul(node: fx.Node, depth: int = 4) -> bool:
    """Whether a matmul feeds ``node`` or consumes its result within ``depth`` steps."""
    frontier, seen = {node}, {node}
    for _ in range(depth):
        near = {m for n in frontier for m in (*n.users, *n.all_input_nodes)}
        frontier = {m for m in near if m.op == "call_function"} - seen
        if any(m.op == "call_function" and any(k in _target_name(m) for k in _MATMUL_NAMES)
               for m in frontier):
            return True
        seen |= frontier
    return False


def _unmatched_softmax_reason(node: fx.Node) -> str:
    """Why a softmax next to a matmul is no site; names blocked local attention (LongT5, BigBird) by its
    shape: scores (B, blocks, H, block, k * block) have a block dim besides batch and heads."""
    val = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    shape = tuple(getattr(val, "shape", ()))
    if len(shape) >= 5:
        return (f"blocked local attention: the scores {list(shape)} carry a block dim besides batch and "
                "heads (the sequence is split into blocks, each attending to its neighbouring blocks, as "
                "LongT5 / BigBird local attention); that is not one attention over the sequence, so it is "
                "not rewritten and runs unsharded")
    return "next to a matmul, but no attention rule matched it"


def _graphs(gm: fx.GraphModule) -> Iterator[tuple[str, fx.Graph]]:
    """The graph and every subgraph module (higher-order op bodies), with the body's name."""
    for name, module in gm.named_modules():
        if isinstance(module, fx.GraphModule):
            yield name, module.graph


def _account_for_candidates(state: PipelineState) -> None:
    """Every softmax / SDPA / flex call that no site or rejection covers gets a decision with the reason."""
    from .locations import location_of

    covered: set[fx.Node] = set()
    for site in state.sites:
        covered |= site.nodes | {site.output}
    covered |= {getattr(rej, "node", None) for rej in state.rejected}
    for body, graph in _graphs(state.graph):
        for node in graph.nodes:
            kind = candidate_kind(node)
            if kind is None or node in covered:
                continue
            where = location_of(node)
            if body:
                reason = (f"inside the body {body!r} of a higher-order op the passes keep opaque (cond, a "
                          "custom autograd.Function, ...): it runs unsharded (checkpoint / wrap / "
                          "invoke_subgraph bodies are inlined and searched)")
                attention = kind != "softmax" or _near_matmul(node)
                state.decide(where, kind, "left alone", reason, unsharded=attention)
            elif kind == "softmax" and not _near_matmul(node):
                state.decide(where, kind, "left alone", "no matmul feeds it or reads it: not attention")
            elif kind == "softmax":
                state.decide(where, kind, "left alone", _unmatched_softmax_reason(node), unsharded=True)
            else:
                reason = {"flex": "FlexAttention calls are not rewritten yet",
                          "sdpa": "an SDPA variant the matcher does not know"}[kind]
                state.decide(where, kind, "left alone", reason, unsharded=True)


__all__ = ["STAGES", "Decision", "PipelineState", "Stage", "candidate_kind", "run_pipeline", "stages_through",
           "world_size"]
