"""Measured time and bubble per attention site beside the cost model's prediction, with advice.

The advice is derived from the plan, never from a rule of thumb alone: a larger K/V block is
named only when the model predicts it lowers the bubble; "local is faster" only when the
model's local plan beats the one that ran; an infeasible strategy is named with the model's
own reason. A bubble above ``BUBBLE_LIMIT`` (5%, the practitioners' threshold) is what asks
for a larger block.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from ..cost_model.planner import Plan, plan, plans
from ..cost_model.profiles import default_profile_name
from ..errors import RingCompileError

BUBBLE_LIMIT = 0.05
RING_STRATEGIES = ("ring", "zigzag")


@dataclasses.dataclass
class SiteSummary:
    """One attention site (one strategy, one world size) over every rank's calls."""

    site: str
    strategy: str
    world_size: int
    workload: dict[str, Any]
    calls: dict[str, int]  # phase -> calls per rank
    measured_s: dict[str, float]  # phase -> mean seconds per call (slowest rank)
    measured_bubble: dict[str, float]  # phase -> wait / (compute + wait), all ranks
    predicted_s: dict[str, float] = dataclasses.field(default_factory=dict)
    predicted_bubble: dict[str, float] = dataclasses.field(default_factory=dict)
    profile: str = ""
    advice: list[str] = dataclasses.field(default_factory=list)

    def format(self) -> str:
        w = self.workload
        lines = [f"site {self.site or 'attention'}: {self.strategy} on {self.world_size} ranks, "
                 f"S={w.get('seq_len')} B={w.get('batch')} H={w.get('heads')}/{w.get('kv_heads')} "
                 f"D={w.get('head_dim')} {w.get('dtype')} {'causal' if w.get('causal') else 'full'} "
                 f"block={w.get('block_size') or 'planner'} (profile {self.profile})"]
        for phase in ("forward", "backward"):
            if phase not in self.measured_s:
                continue
            ms, b = self.measured_s[phase] * 1e3, self.measured_bubble[phase]
            line = f"  {phase:<8} {self.calls[phase]} calls/rank, measured {ms:.2f} ms bubble {b:.0%}"
            if phase in self.predicted_s:
                line += (f"; predicted {self.predicted_s[phase] * 1e3:.2f} ms "
                         f"bubble {self.predicted_bubble[phase]:.0%}")
            lines.append(line)
        lines += [f"  advice: {a}" for a in self.advice] or ["  advice: none, the plan holds"]
        return "\n".join(lines)


def summarize(calls: Iterable[dict[str, Any]], profile: str | None = None) -> list[SiteSummary]:
    """One SiteSummary per (site, strategy, world size), with predictions and advice."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in calls:
        groups[(c.get("site", ""), c["strategy"], c["world_size"])].append(c)
    return [_summarize(site, strategy, n, group, profile) for (site, strategy, n), group in groups.items()]


def _summarize(site: str, strategy: str, n: int, group: list[dict[str, Any]],
               profile: str | None) -> SiteSummary:
    workload = dict(group[0].get("workload", {}))
    calls, measured, bubble = {}, {}, {}
    for phase in ("forward", "backward"):
        mine = [c for c in group if c["phase"] == phase]
        if not mine:
            continue
        per_rank: dict[int, list[float]] = defaultdict(list)
        for c in mine:
            per_rank[c["rank"]].append(c["total_s"])
        calls[phase] = max(len(v) for v in per_rank.values())
        measured[phase] = max(sum(v) / len(v) for v in per_rank.values())
        wait, busy = sum(c["wait_s"] for c in mine), sum(c["compute_s"] + c["wait_s"] for c in mine)
        bubble[phase] = wait / busy if busy > 0 else 0.0
    summary = SiteSummary(site, strategy, n, workload, calls, measured, bubble)
    summary.profile = profile or default_profile_name(workload.get("device"))
    try:
        _predict(summary)
    except (RingCompileError, KeyError, TypeError, ValueError) as exc:
        summary.advice.append(f"no prediction: the cost model cannot plan this call ({exc})")
    return summary


def _plan_kwargs(s: SiteSummary, backward: bool) -> dict[str, Any]:
    w = s.workload
    return dict(seq_len=int(w["seq_len"]), world_size=s.world_size, heads=int(w["heads"]),
                kv_heads=int(w.get("kv_heads") or w["heads"]), head_dim=int(w["head_dim"]),
                batch=int(w.get("batch") or 1), dtype=w.get("dtype") or "float32",
                causal=bool(w.get("causal")), backward=backward, profile=s.profile)


def _predict(s: SiteSummary) -> None:
    """Fill the predicted times and bubbles, then the advice, from the plan of what ran."""
    kw = _plan_kwargs(s, False)
    if s.strategy == "local":  # full tensors on every rank: one device's cost
        kw["world_size"] = 1
    block = s.workload.get("block_size")
    fwd = plan(**kw, strategy=s.strategy, block_size=block)
    s.predicted_s["forward"], s.predicted_bubble["forward"] = fwd.time, fwd.bubble
    ran = fwd
    if "backward" in s.measured_s:
        kw["backward"] = True
        ran = plan(**kw, strategy=s.strategy, block_size=block)
        bwd = ran.time - fwd.time  # the model plans forward+backward; the backward is the difference
        s.predicted_s["backward"] = max(0.0, bwd)
        idle = ran.bubble * ran.time - fwd.bubble * fwd.time
        s.predicted_bubble["backward"] = max(0.0, idle) / bwd if bwd > 0 else 0.0
    s.advice.extend(_advice(s, ran, kw))


def _advice(s: SiteSummary, ran: Plan, kw: dict[str, Any]) -> list[str]:
    out = []
    measured_bubble = max(s.measured_bubble.values(), default=0.0)
    bubble = max(measured_bubble, ran.bubble)
    if s.strategy in RING_STRATEGIES and bubble > BUBBLE_LIMIT:
        better = _larger_block(ran, kw)
        if better is not None:
            out.append(f"bubble {bubble:.0%} > {BUBBLE_LIMIT:.0%}: block {ran.block_size} -> "
                       f"{better.block_size} tokens, predicted bubble {better.bubble:.0%}")
        else:
            out.append(f"bubble {bubble:.0%} > {BUBBLE_LIMIT:.0%}, and no larger block is predicted to "
                       "lower it: the link is the bottleneck at this size")
    if s.world_size > 1 and s.strategy != "local":
        local = plan(**{**kw, "world_size": 1}, strategy="local")
        if local.time < ran.time:
            out.append(f"the link is too slow for {s.strategy} to win at S={kw['seq_len']}: local attention "
                       f"is predicted {ran.time / local.time:.1f}x faster")
        ranked = plans(**kw)
        best = ranked[0]
        if best.strategy not in (s.strategy, "local") and best.time < 0.9 * ran.time:
            out.append(f"strategy {best.strategy!r} is predicted {ran.time / best.time:.1f}x faster than "
                       f"{s.strategy!r} here")
        out.extend(f"{name}: {reason}" for name, _, reason in best.alternatives if reason)
    return out


def _larger_block(ran: Plan, kw: dict[str, Any]) -> Plan | None:
    """The smallest larger K/V block predicted to bring the bubble under the limit (else the lowest)."""
    local = max(1, kw["seq_len"] // kw["world_size"])
    candidates, block = [], ran.block_size * 2
    while block <= local:
        candidates.append(plan(**kw, strategy=ran.strategy, block_size=block))
        block *= 2
    if ran.block_size < local:
        candidates.append(plan(**kw, strategy=ran.strategy, block_size=local))
    lower = [p for p in candidates if p.bubble < ran.bubble - 1e-6 and p.block_size > ran.block_size]
    if not lower:
        return None
    under = [p for p in lower if p.bubble <= BUBBLE_LIMIT]
    return min(under, key=lambda p: p.block_size) if under else min(lower, key=lambda p: p.bubble)


def format_summaries(summaries: Iterable[SiteSummary]) -> str:
    return "\n\n".join(s.format() for s in summaries) + "\n"
