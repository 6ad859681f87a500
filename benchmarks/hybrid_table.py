"""Issue 13: the cost model's ranking of ring, zigzag, allgather, ulysses and every hybrid split
(all-to-all inside a node x ring across nodes) on the two-level profiles; prints Markdown tables.
The last table is what strategy "auto" ranks on a 2-D group per shard layout: on contiguous shards
a causal hybrid runs contiguous node chunks (``hybrid-<o>x<i>-contiguous``, the imbalanced ring).

    python benchmarks/hybrid_table.py
"""

from __future__ import annotations

import dataclasses

from ringcompile.cost_model.planner import choose_for_call, format_seconds, plans
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
    _layout_table()


# what choice._auto_candidates offers on each shard layout of a 2 x 8 group (heads divide 16: ulysses too)
AUTO_LAYOUTS = {"zigzag": ("zigzag", "ulysses", "hybrid-2x8"),
                "contiguous": ("ring", "allgather", "ulysses", "hybrid-2x8-contiguous")}


def _layout_table() -> None:
    print("\nh100-nvlink-ib: N=16 (2 nodes x 8), H_q=H_kv=32, D=128, bf16, causal, fwd+bwd: "
          "strategy \"auto\" on each shard layout\n")
    print("| S | hybrid-2x8 (zigzag) | hybrid-2x8-contiguous | ulysses | auto, zigzag shards "
          "| auto, contiguous shards |\n|---|---|---|---|---|---|")
    kw = dict(world_size=16, batch=1, heads=32, kv_heads=32, head_dim=128, dtype="bfloat16", causal=True,
              backward=True, profile="h100-nvlink-ib")
    for s in (32768, 131072, 524288):
        chosen = {lay: choose_for_call(seq_len=s, strategies=names, **kw)
                  for lay, names in AUTO_LAYOUTS.items()}
        times = {n: format_seconds(t) for p in chosen.values() for n, t, _ in p.alternatives if t is not None}
        print(f"| {s:,} | {times['hybrid-2x8']} | {times['hybrid-2x8-contiguous']} | {times['ulysses']} "
              f"| {chosen['zigzag'].strategy} | {chosen['contiguous'].strategy} |")


if __name__ == "__main__":
    main()
