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

    @classmethod
    def from_site(cls, site: AttentionSite, graph: int) -> SiteReport:
        return cls(location=site.location, pattern=site.pattern, mask=site.mask_description,
                   score_mod=site.score_description, gqa_groups=site.gqa_groups, rewritten=site.rewritten,
                   reason=site.reason, layout=site.layout, scale=site.scale, dropout_p=site.dropout_p,
                   softmax_dtype=_dtype_name(site.softmax_dtype),
                   graph=graph)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).replace("torch.", "") if dtype is not None else None


@dataclasses.dataclass(frozen=True)
class NotRewritten:
    """An attention-like subgraph left as it was, and why."""

    location: str
    pattern: str
    reason: str
    graph: int = 0


@dataclasses.dataclass
class Report:
    """What ``explain`` found. ``print(report)`` shows a table.

    sites:          every attention site found (rewritten or not, see ``rewritten``/``reason``).
    not_rewritten:  attention-like subgraphs seen but not rewritten (rejected candidates and
                    sites whose rewrite failed), with reasons.
    graphs:         number of graphs Dynamo captured (graphs - 1 graph breaks, roughly).
    fallbacks:      graphs the backend could not process at all, with the reason.
    """

    sites: list[SiteReport] = dataclasses.field(default_factory=list)
    not_rewritten: list[NotRewritten] = dataclasses.field(default_factory=list)
    graphs: int = 0
    fallbacks: list[str] = dataclasses.field(default_factory=list)

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
                             f"{s.dropout_p:g}", "yes" if s.rewritten else f"no: {s.reason}"))
            lines += _table(rows)
        if self.not_rewritten:
            lines.append("")
            lines.append("attention-like subgraphs not rewritten:")
            for n in self.not_rewritten:
                lines.append(f"  - {n.location} [{n.pattern}]: {n.reason}")
        for reason in self.fallbacks:
            lines.append(f"graph left unchanged: {reason}")
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
        from .backend import transform

        index = self.report.graphs
        self.report.graphs += 1
        try:
            _, entry = transform(gm, self.options)
        except Exception as exc:  # noqa: BLE001 - reported, never raised: explain must not fail on a model
            self.report.fallbacks.append(f"graph {index}: {type(exc).__name__}: {exc}")
            return gm.forward
        for site in entry.sites:
            rep = SiteReport.from_site(site, index)
            self.report.sites.append(rep)
            if not site.rewritten:
                self.report.not_rewritten.append(NotRewritten(site.location, site.pattern,
                                                              site.reason or "not rewritten", index))
        for rej in entry.rejected:
            self.report.not_rewritten.append(NotRewritten(rej.location, rej.pattern, rej.reason, index))
        return gm.forward


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
