"""Issue 13: the cost model's ranking of ring, zigzag, allgather, ulysses and every hybrid split
(all-to-all inside a node x ring across nodes) on the two-level profiles; prints Markdown tables.

    python benchmarks/hybrid_table.py
"""

from __future__ import annotations

import dataclasses

from ringcompile.cost_model.planner import format_seconds, plans
from ringcompile.cost_model.profiles import load_profile
from ringcompile.cost_model.strategies import hybrid_split

WORKLOAD = dict(world_size=64, heads=32, kv_heads=8, head_dim=128, causal=True, backward=True)
FLAT = ("ring", "zigzag", "allgather", "ulysses")


def _row(ranked, label: str) -> str:
    times = {p.strategy: p.time for p in ranked}
    hybrid = min((p for p in ranked if hybrid_split(p.strategy)), key=lambda p: p.time)
    ring = min(times["ring"], times["zigzag"])
    flat = " | ".join(format_seconds(times[n]) if n in times else "infeasible" for n in FLAT)
    best = f"{hybrid.strategy} {format_seconds(hybrid.time)} (bubble {hybrid.bubble:.0%})"
    return f"| {label} | {flat} | {best} | {ring / hybrid.time:.2f}x | {ranked[0].strategy} |"


def main() -> None:
    header = ("| {} | ring | zigzag | allgather | ulysses | best hybrid (outer x inner) | best ring / hybrid "
              "| chosen |\n|---|---|---|---|---|---|---|---|")
    for name in ("h100-nvlink-ib", "a100-nvlink-ib"):
        prof = load_profile(name)
        print(f"\n{name}: N=64 (8 nodes x 8), H_q=32, H_kv=8, D=128, bf16, causal, fwd+bwd\n")
        print(header.format("S"))
        for s in (32768, 131072, 524288, 1048576):
            print(_row(plans(seq_len=s, profile=prof, **WORKLOAD), f"{s:,}"))
        print(f"\n{name}, S=131,072, inter-node bandwidth swept (intra-node fixed)\n")
        print(header.format("inter-node GB/s"))
        for x in (0.5, 1, 2, 4, 9):
            swept = dataclasses.replace(prof, inter_bandwidth=prof.inter_bandwidth * x)
            print(_row(plans(seq_len=131072, profile=swept, **WORKLOAD), f"{swept.inter_bandwidth / 1e9:g}"))


if __name__ == "__main__":
    main()
