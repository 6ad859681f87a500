"""The cost model's hybrid splits (inner all-to-all x outer ring) on two-level profiles: every split is
ranked with time, bubble and memory; the formula reduces to its parts; the published trend holds."""

from __future__ import annotations

import dataclasses

import pytest

from ringcompile.cli import main
from ringcompile.cost_model import symbols as sym
from ringcompile.cost_model.evaluate import HYBRID_ARGS, strategy_functions
from ringcompile.cost_model.planner import plan, plans
from ringcompile.cost_model.profiles import load_profile
from ringcompile.cost_model.strategies import hybrid_split, kv_replication
from ringcompile.errors import OptionError
from ringcompile.runtime.strategies import hybrid as runtime_hybrid

LLAMA = dict(heads=32, kv_heads=8, head_dim=128, causal=True, backward=True)
SPLITS = {"hybrid-32x2", "hybrid-16x4", "hybrid-8x8", "hybrid-4x16", "hybrid-2x32"}


def _best(ranked, hybrid: bool):
    return next(p for p in ranked
                if (hybrid_split(p.strategy) is not None) == hybrid and p.strategy != "local")


@pytest.mark.parametrize("name", ["h100-nvlink-ib", "a100-nvlink-ib"])
def test_shipped_two_level_profiles(name):
    prof = load_profile(name)
    assert prof.node_size == 8 and prof.intra_bandwidth > 5 * prof.inter_bandwidth
    assert prof.link("intra")[0] == prof.link_bandwidth   # a flat group inside a node uses NVLink
    assert not load_profile("h100-nvlink").two_level     # old profiles load as one level


def test_every_split_ranked_with_time_bubble_memory():
    ranked = plans(seq_len=131072, world_size=64, profile="h100-nvlink-ib", **LLAMA)
    names = {p.strategy for p in ranked}
    assert SPLITS <= names and {"ring", "zigzag", "allgather", "local"} <= names
    assert [p.time for p in ranked] == sorted(p.time for p in ranked)
    for p in ranked:
        assert p.time > 0 and 0 <= p.bubble < 1 and p.memory.peak > 0
        if hybrid_split(p.strategy):
            assert p.layout == "zigzag" and "node-chunk heads: q" in p.memory.terms


@pytest.mark.parametrize("name", ["h100-nvlink-ib", "a100-nvlink-ib"])
def test_hybrid_beats_a_ring_across_nodes_when_links_are_slow(name):
    """USP (Fang & Zhao 2024) / TransformerEngine a2a+p2p: across nodes, a2a inside + ring outside wins
    when the inter-node link is slow relative to a ring step's compute; the margin shrinks as it speeds
    up, and as the sequence (so the step's compute) grows."""
    prof = load_profile(name)

    def margin(profile, seq_len=131072):
        ranked = plans(seq_len=seq_len, world_size=64, profile=profile, **LLAMA)
        ring = min(p.time for p in ranked if p.strategy in ("ring", "zigzag"))
        return ring / _best(ranked, hybrid=True).time

    shipped = margin(prof)
    assert shipped > 1.5
    faster = [margin(dataclasses.replace(prof, inter_bandwidth=prof.inter_bandwidth * x)) for x in (2, 4)]
    assert shipped > faster[0] > faster[1]
    assert margin(prof, seq_len=1 << 20) < shipped


def test_hybrid_formula_is_its_ring_plus_the_node_all_to_alls():
    """Hand check: hybrid(N_i) = zigzag on N/N_i ranks with H/N_i heads (r H_kv/N_i kv heads), plus the
    inner all-to-alls' bytes over W_i and their latencies."""
    vals = {sym.S: 65536.0, sym.N: 16.0, sym.B: 1.0, sym.Hq: 8.0, sym.Hkv: 2.0, sym.D: 64.0, sym.e: 2.0,
            sym.f: 1.0, sym.d: 1.0, sym.c: 4096.0, sym.F: 3e14, sym.M: 2e12, sym.W: 2e10, sym.Wa: 1.6e10,
            sym.alpha: 1e-5, sym.P: 0.0, sym.o: 0.0, sym.k: 128.0, sym.kb: 2.5, sym.tc: 128.0, sym.Ph: 16.0,
            sym.h: 0.0, sym.Ni: 4.0, sym.r: 2.0, sym.Wi: 3e11, sym.alpha_i: 5e-6}
    hybrid = strategy_functions("hybrid", True, False).time(*[vals[a] for a in HYBRID_ARGS])
    ring_vals = vals | {sym.N: 4.0, sym.Hq: 2.0, sym.Hkv: 1.0}   # 4 nodes; 8/4 q heads; 2*2/4 kv heads
    ring = strategy_functions("zigzag", True, False).time(*[ring_vals[a] for a in HYBRID_ARGS[:-4]])
    x = 65536 / 16
    bytes_in = 1 * (8 + 2 * 4) * x * 64 * 2            # q, replicated k, v of the local shard
    bytes_out = 1 * 8 * x * (64 + 1) * 4               # fp32 out with lse
    a2a = (3 + 1) * 3 * 5e-6 + 3 / 4 * (bytes_in + bytes_out) / 3e11
    assert hybrid == pytest.approx(ring + a2a, rel=1e-12)


def test_kv_replication_matches_the_runtime():
    for hkv in range(1, 17):
        for inner in (2, 4, 8, 16):
            assert kv_replication(hkv, inner) == runtime_hybrid.kv_replication(hkv, inner)


def test_explain_says_kv_heads_are_replicated():
    text = plan(seq_len=65536, world_size=16, heads=16, kv_heads=2, head_dim=64, causal=True,
                profile="h100-nvlink-ib", strategy="hybrid-2x8").explain()
    assert "replicated 4x" in text and "ring over 2 nodes" in text


def test_infeasible_splits_and_one_level_profiles():
    ranked = plans(seq_len=8192, world_size=8, heads=6, head_dim=64, profile="h100-nvlink-ib")
    reasons = dict((n, r) for n, t, r in ranked[0].alternatives if t is None)
    assert "hybrid-2x4" in reasons and "hybrid-4x2" not in reasons
    assert not any(hybrid_split(p.strategy) for p in plans(seq_len=8192, world_size=8, heads=8, head_dim=64))
    with pytest.raises(OptionError, match="two-level"):
        plan(seq_len=8192, world_size=8, heads=8, head_dim=64, profile="h100-nvlink", strategy="hybrid")
    best = plan(seq_len=8192, world_size=8, heads=8, head_dim=64, profile="h100-nvlink", node_size=4,
                strategy="hybrid")
    assert hybrid_split(best.strategy) is not None


def test_cli_ranks_the_splits_and_reports_crossovers(capsys):
    rc = main(["plan", "--seq", "131072", "--world-size", "16", "--node-size", "8", "--heads", "32",
               "--kv-heads", "8", "--head-dim", "128", "--causal", "--backward",
               "--profile", "h100-nvlink-ib"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("hybrid-")]
    assert {"hybrid-8x2", "hybrid-4x4", "hybrid-2x8"} <= set(rows)
    assert "crossovers" in out and "best strategy by S" in out


@pytest.mark.parametrize("seq_len", [131072, 1 << 20])
def test_contiguous_causal_split_models_the_imbalance_of_its_layout(seq_len):
    """On contiguous shards a causal hybrid's outer ring is the contiguous ring over nodes: the last node
    computes every later step in full, so its time approaches (N_o - 1/2) / (N_o / 2) = 2 - 1/N_o of the
    zigzag split's when compute-bound; it keeps the contiguous layout, and its full steps hide a transfer
    of half the block (f = 1, not 1/2)."""
    kw = dict(seq_len=seq_len, world_size=64, profile="h100-nvlink-ib", **LLAMA)
    zig = plan(strategy="hybrid-8x8", **kw)
    contiguous = plan(strategy="hybrid-8x8-contiguous", **kw)
    assert zig.layout == "zigzag" and contiguous.layout == "contiguous"
    ratio = contiguous.time / zig.time
    assert 1.5 < ratio < 2 - 1 / 8 + 0.01, ratio
    assert contiguous.overlap_threshold == pytest.approx(zig.overlap_threshold / 2)
    assert "contiguous node chunks" in contiguous.explain()
    full = dict(kw, causal=False)   # without a causal mask both layouts are the same schedule
    assert plan(strategy="hybrid-8x8-contiguous", **full).time == pytest.approx(
        plan(strategy="hybrid-8x8", **full).time)
    assert "hybrid-8x8-contiguous" not in {p.strategy for p in plans(**kw)}   # the planner lays out zigzag


def test_auto_on_contiguous_causal_shards_ranks_the_layout_it_runs():
    """16 ranks as 2 x 8 on h100-nvlink-ib, H = H_kv = 32, S = 128K causal: on zigzag shards the hybrid
    split wins; on contiguous shards its real (imbalanced) time loses to Ulysses, which "auto" then runs.
    The zigzag-balanced estimate would have picked hybrid on both."""
    import torch

    from ringcompile.cost_model.planner import choose_for_call
    from ringcompile.runtime.choice import choose_strategy
    from ringcompile.runtime.user_spec import build_spec

    q = torch.empty(1, 32, 8192, 128, dtype=torch.bfloat16, device="meta")
    spec = build_spec(is_causal=True).replace(profile="h100-nvlink-ib")
    def auto(layout: str) -> str:
        return choose_strategy(q, q, q, 131072, 16, spec, layout, backward=True, two_level=(2, 8))

    assert auto("zigzag") == "hybrid" and auto("contiguous") == "ulysses"
    kw = dict(seq_len=131072, world_size=16, batch=1, heads=32, kv_heads=32, head_dim=128, dtype="bfloat16",
              causal=True, backward=True, profile="h100-nvlink-ib")
    names = ("ulysses", "hybrid-2x8", "hybrid-2x8-contiguous")
    times = {n: t for n, t, _ in choose_for_call(strategies=names, **kw).alternatives}
    assert times["hybrid-2x8"] < times["ulysses"] < times["hybrid-2x8-contiguous"]


@pytest.mark.parametrize("profile", ["h100-nvlink", "h100-nvlink-ib"])
def test_best_pieces_cover_the_range_once_per_change(profile):
    """`plan --world-size 64 --node-size 8`: the best-strategy ranges tile [256, 16M] with no two neighbours
    naming the same strategy (a bisection that meets a third strategy's tie once split a range in two)."""
    from ringcompile.cost_model.crossover import best_pieces

    pieces = best_pieces(world_size=64, node_size=8, profile=profile, **LLAMA)
    assert pieces[0].start == 256 and pieces[-1].end == (1 << 24) + 1
    pairs = zip(pieces, pieces[1:], strict=False)
    assert all(a.end == b.start and a.strategy != b.strategy for a, b in pairs)
    assert any(hybrid_split(p.strategy) for p in pieces)


def test_the_issue_spellings_rank_the_splits_beside_the_flat_strategies(capsys):
    """`ringcompile.plans(..., world_size=64, node_size=8, profile="h100-nvlink-ib")`, `ringcompile.plan(...,
    strategy="hybrid")` and `ringcompile plan --world-size 64 --node-size 8` all rank every split."""
    import ringcompile

    ranked = ringcompile.plans(seq_len=131072, world_size=64, node_size=8, profile="h100-nvlink-ib", **LLAMA)
    assert SPLITS <= {p.strategy for p in ranked} and {"ring", "zigzag", "allgather"} <= {p.strategy
                                                                                         for p in ranked}
    best_split = min((p for p in ranked if hybrid_split(p.strategy)), key=lambda p: p.time)
    chosen = ringcompile.plan(seq_len=131072, world_size=64, node_size=8, profile="h100-nvlink-ib",
                              strategy="hybrid", **LLAMA)
    assert chosen.strategy == best_split.strategy and chosen.time == pytest.approx(best_split.time)
    assert main(["plan", "--seq", "131072", "--world-size", "64", "--node-size", "8", "--heads", "32",
                 "--kv-heads", "8", "--head-dim", "128", "--causal", "--backward",
                 "--profile", "h100-nvlink-ib"]) == 0
    out = capsys.readouterr().out
    crossing = [line for line in out.splitlines() if line.strip().startswith("S=") and "->" in line]
    assert any("hybrid-" in line and ("ring" in line or "zigzag" in line) for line in crossing), out
    assert {s for s in SPLITS} <= {line.split()[0] for line in out.splitlines() if line.startswith("hybrid-")}
