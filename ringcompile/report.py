"""``ringcompile.explain()`` and its Report: which attentions the backend finds, and what it makes of them.

It compiles the model with a capturing backend that runs discovery and the rewrite on every
graph Dynamo captures (nothing distributed runs, and the model itself executes unchanged),
calls it once on the given inputs, and reports per site and per rejected candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .log import get_logger
from .options import Options
from .passes import Decision, PipelineState, run_pipeline, stages_through
from .site import AttentionSite

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One attention site as the report shows it."""

    location: str
    pattern: str
    mask: str
    score_mod: str
    gqa_groups: int
    rewritten: bool
    reason: str | None
    layout: str = "bhsd"
    scale: float | None = None
    dropout_p: float = 0.0
    softmax_dtype: str | None = None
    graph: int = 0
    stage: str = ""  # the pipeline stage that decided the site's final state (rewritten or why not)

    @classmethod
    def from_site(cls, site: AttentionSite, graph: int, stage: str = "") -> SiteReport:
        return cls(location=site.location, pattern=site.pattern, mask=site.mask_description,
                   score_mod=site.score_description, gqa_groups=site.gqa_groups, rewritten=site.rewritten,
                   reason=site.reason, layout=site.layout, scale=site.scale, dropout_p=site.dropout_p,
                   softmax_dtype=_dtype_name(site.softmax_dtype),
                   graph=graph, stage=stage)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


@dataclasses.dataclass(frozen=True)
class NotRewritten:
    """An attention-like subgraph left as it was, and why."""

    location: str
    pattern: str
    reason: str
    graph: int = 0
    stage: str = ""  # the pipeline stage that left it alone


@dataclasses.dataclass(frozen=True)
class DecisionReport:
    """One decision of one pipeline stage (provenance): which stage decided what, where, and why."""

    graph: int
    stage: str
    location: str
    pattern: str
    outcome: str
    reason: str

    def __str__(self) -> str:
        where = f"graph {self.graph} [{self.stage}] {self.location} ({self.pattern})"
        return f"{where}: {self.outcome}: {self.reason}"


@dataclasses.dataclass
class Report:
    """What ``explain`` found. ``print(report)`` shows a table.

    sites:          every attention site found (rewritten or not, see ``rewritten``/``reason``).
    not_rewritten:  attention-like subgraphs seen but not rewritten (rejected candidates and
                    sites whose rewrite failed), with reasons.
    graphs:         number of graphs Dynamo captured (graphs - 1 graph breaks, roughly).
    fallbacks:      graphs the backend could not process at all, with the reason.
    decisions:      every decision of every pipeline stage, in order (``by_stage()`` groups them);
                    each softmax / SDPA / flex call the graph holds appears here with its reason.
    """

    sites: list[SiteReport] = dataclasses.field(default_factory=list)
    not_rewritten: list[NotRewritten] = dataclasses.field(default_factory=list)
    graphs: int = 0
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    decisions: list[DecisionReport] = dataclasses.field(default_factory=list)

    def by_stage(self) -> dict[str, list[DecisionReport]]:
        """The decisions grouped by the stage that made them (pipeline order)."""
        out: dict[str, list[DecisionReport]] = {}
        for d in self.decisions:
            out.setdefault(d.stage, []).append(d)
        return out

    @property
    def graph_breaks(self) -> int:
        return max(self.graphs - 1, 0)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    def __str__(self) -> str:
        lines = [f"ringcompile explain: {len(self.sites)} attention site(s), "
                 f"{len(self.rewritten)} rewritten, {self.graphs} graph(s) captured"]
        if self.sites:
            header = ("#", "location", "pattern", "layout", "mask", "score_mod", "gqa", "dropout",
                      "rewritten")
            rows = [header]
            for i, s in enumerate(self.sites):
                rows.append((str(i), s.location, s.pattern, s.layout, s.mask, s.score_mod, str(s.gqa_groups),
                             f"{s.dropout_p:g}", "yes" if s.rewritten else f"no ({s.stage}): {s.reason}"))
            lines += _table(rows)
        if self.not_rewritten:
            lines.append("")
            lines.append("attention-like subgraphs not rewritten:")
            for n in self.not_rewritten:
                lines.append(f"  - {n.location} [{n.pattern}] ({n.stage}): {n.reason}")
        for reason in self.fallbacks:
            lines.append(f"graph left unchanged: {reason}")
        if self.decisions:
            lines.append("")
            lines.append("decisions by stage:")
            lines += [f"  {d}" for d in self.decisions]
        return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


class _Capture:
    """A torch.compile backend that analyses each graph and then runs the original graph."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.report = Report()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        from .backend import may_hold_attention, rewrite_cache_attention

        index = self.report.graphs
        self.report.graphs += 1
        state = None
        try:
            # analyse what the backend would run (the original graph runs here; the rewrite works on a copy)
            analysed, decoded = rewrite_cache_attention(gm)
            state = PipelineState(analysed, self.options)
            state.decisions[:0] = decoded
            if may_hold_attention(analysed):
                run_pipeline(state, stages_through("rewrite"))
        except Exception as exc:  # noqa: BLE001 - reported, never raised: explain must not fail on a model
            self.report.fallbacks.append(f"graph {index} ({state.stage if state else '?'}): "
                                         f"{type(exc).__name__}: {exc}")
            self._add_decisions(index, state.decisions if state else [])
            return gm.forward
        self._add_decisions(index, state.decisions)
        for site in state.sites:
            stage = _last_stage(state.decisions, site.location, site.pattern)
            self.report.sites.append(SiteReport.from_site(site, index, stage))
            if not site.rewritten:
                self.report.not_rewritten.append(NotRewritten(site.location, site.pattern,
                                                              site.reason or "not rewritten", index, stage))
        for d in state.decisions:  # rejected candidates and uncovered attention calls
            if d.leaves_attention_unsharded and d.outcome in ("not a site", "left alone"):
                self.report.not_rewritten.append(NotRewritten(d.location, d.pattern, d.reason, index,
                                                              d.stage))
        return gm.forward

    def _add_decisions(self, index: int, decisions: Sequence[Decision]) -> None:
        self.report.decisions += [DecisionReport(index, d.stage, d.location, d.pattern, d.outcome, d.reason)
                                  for d in decisions]


def _last_stage(decisions: Sequence[Decision], location: str, pattern: str) -> str:
    stages = [d.stage for d in decisions if d.location == location and d.pattern == pattern]
    return stages[-1] if stages else ""


def explain(model_or_fn: Callable, *args: Any, options: dict[str, Any] | None = None,
            dynamic: bool | None = None, **kwargs: Any) -> Report:
    """Trace ``model_or_fn(*args, **kwargs)`` like torch.compile and report the attention it holds.

    ``options`` are the backend options (validated like torch.compile's); nothing is sharded.
    """
    opts = Options.from_mapping(options)
    # an already torch.compile'd module: analyse the original
    model_or_fn = getattr(model_or_fn, "_orig_mod", model_or_fn)
    capture = _Capture(opts)
    compiled = torch.compile(model_or_fn, backend=capture, dynamic=dynamic)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return capture.report
