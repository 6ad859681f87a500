"""plan / plans / choose_for_call / crossovers: the planner's API and its consistency."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ringcompile
from ringcompile.cost_model.crossover import best_pieces, crossovers
from ringcompile.cost_model.planner import choose_for_call
from ringcompile.errors import OptionError

BIG = dict(seq_len=1 << 20, world_size=8, heads=32, kv_heads=8, head_dim=128)


def test_plans_are_sorted_and_complete():
    ranked = ringcompile.plans(**BIG, profile="h100-nvlink")
    assert {p.strategy for p in ranked} == {"ring", "zigzag", "allgather", "ulysses", "local"}
    times = [p.time for p in ranked]
    assert times == sorted(times)
    best = ringcompile.plan(**BIG, profile="h100-nvlink")
    assert best.strategy == ranked[0].strategy and best.time == ranked[0].time
    for p in ranked:
        assert p.layout in ("contiguous", "zigzag")
        assert 0 <= p.bubble < 1 and p.time > 0
        assert p.memory.peak == pytest.approx(sum(p.memory.terms.values()))
        assert set(p.tiles) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}


def test_ring_memory_is_o_s_over_n_and_allgather_o_s():
    small = ringcompile.plan(**(BIG | {"seq_len": 1 << 18}), strategy="ring", block_size=4096)
    big = ringcompile.plan(**BIG, strategy="ring", block_size=4096)
    assert big.memory.peak / small.memory.peak == pytest.approx(4, rel=0.05)
    ag = ringcompile.plan(**BIG, strategy="allgather")
    assert ag.memory.terms["gathered K/V"] == 2 * 8 * (1 << 20) * 128 * 2


def test_explain_shows_formulas_numbers_and_runner_up():
    p = ringcompile.plan(**BIG, causal=True, profile="h100-infiniband")
    text = p.explain()
    assert "Max(" in text and "F=" in text and "W=" in text
    assert f"chosen: {p.strategy}" in text
    up = p.runner_up
    assert up is not None and f"runner-up: {up[0]}" in text and "slower" in text
    assert "c >=" in text and "peak per rank" in text
    import json

    data = json.loads(json.dumps(p.to_dict()))
    assert data["strategy"] == p.strategy and data["workload"]["seq_len"] == BIG["seq_len"]


def test_named_strategy_and_errors():
    assert ringcompile.plan(**BIG, strategy="allgather").strategy == "allgather"
    with pytest.raises(OptionError, match="divisible"):
        ringcompile.plan(**(BIG | {"kv_heads": 4}), strategy="ulysses")
    with pytest.raises(OptionError, match="one of"):
        ringcompile.plan(**BIG, strategy="bogus")
    with pytest.raises(OptionError, match="multiple of kv_heads"):
        ringcompile.plan(**(BIG | {"kv_heads": 5}))
    with pytest.raises(OptionError, match="unknown profile"):
        ringcompile.plan(**BIG, profile="no-such-profile")


def test_slow_link_makes_local_win():
    """A short sequence over a slow link: ring attention cannot win, and the planner says so."""
    p = ringcompile.plan(seq_len=4096, world_size=8, heads=8, kv_heads=8, head_dim=128,
                         profile="a100-infiniband")
    assert p.strategy == "local"
    assert "cannot win" in p.explain()


def test_causal_prefers_zigzag_on_fast_links():
    p = ringcompile.plan(**BIG, causal=True, profile="h100-nvlink", backward=True)
    assert p.strategy == "zigzag" and p.layout == "zigzag"


def test_choose_for_call_is_cheap_and_restricted():
    kw = dict(world_size=4, batch=1, heads=8, kv_heads=8, head_dim=64, dtype="float32", causal=True,
              backward=False, profile="cpu-gloo-loopback")
    first = choose_for_call(seq_len=4096, **kw)
    assert first.strategy in ("ring", "zigzag", "allgather", "ulysses")
    t0 = time.perf_counter()
    for s in range(5000, 5200):
        choose_for_call(seq_len=s, **kw)
    assert (time.perf_counter() - t0) / 200 < 5e-3     # generous: microseconds in practice
    assert choose_for_call(seq_len=4096, **kw) is first
    assert choose_for_call(seq_len=4096, layout="zigzag", **kw).strategy == "zigzag"
    assert choose_for_call(seq_len=4096, layout="contiguous", **kw).strategy != "zigzag"
    one = choose_for_call(seq_len=4096, **(kw | {"world_size": 1}))
    assert one.strategy == "local"
    import torch

    assert choose_for_call(seq_len=4096, **(kw | {"dtype": torch.float32})).strategy == first.strategy
    no_uly = choose_for_call(seq_len=4096, **(kw | {"kv_heads": 2}))
    assert no_uly.strategy != "ulysses"


@given(st.integers(1024, 1 << 22), st.sampled_from([2, 4, 8]), st.booleans(), st.booleans())
def test_choose_for_call_agrees_with_plans(seq_len, n, causal, backward):
    kw = dict(world_size=n, heads=16, kv_heads=8 if n <= 8 else 16, head_dim=128, dtype="bfloat16",
              causal=causal, backward=backward, profile="h100-infiniband")
    chosen = choose_for_call(seq_len=seq_len, batch=1, **kw)
    ranked = [p for p in ringcompile.plans(seq_len=seq_len, **kw) if p.strategy != "local"]
    assert chosen.time == pytest.approx(ranked[0].time)


def test_crossovers_flip_the_order():
    kw = dict(world_size=8, heads=32, kv_heads=8, head_dim=128, causal=True, profile="h100-infiniband")
    found = crossovers(**kw)
    assert found
    for c in found:
        # the crossover is in the unpadded model; padding to N (2N) chunks moves S by < 2N tokens,
        # so the order is checked a little either side
        lo = {p.strategy: p.time for p in ringcompile.plans(seq_len=int(c.seq_len * 0.9), **kw)}
        hi = {p.strategy: p.time for p in ringcompile.plans(seq_len=int(c.seq_len * 1.1), **kw)}
        assert lo[c.faster_below] <= lo[c.faster_above] * 1.02, c
        assert hi[c.faster_above] <= hi[c.faster_below] * 1.02, c
    pieces = best_pieces(**kw)
    assert pieces[0].start == 256 and all(a.end == b.start for a, b in zip(pieces, pieces[1:], strict=False))


def test_profile_path_works_like_a_name(tmp_path):
    from ringcompile.cost_model.profiles import load_profile

    text = load_profile("a100-nvlink").to_toml()
    path = tmp_path / "mine.toml"
    path.write_text(text)
    by_name = ringcompile.plan(**BIG, profile="a100-nvlink")
    by_path = ringcompile.plan(**BIG, profile=str(path))
    assert by_path.time == pytest.approx(by_name.time) and by_path.strategy == by_name.strategy


@pytest.mark.parametrize("backward", [False, True])
def test_shared_host_prefers_the_balanced_layout_when_ranks_outnumber_cores(backward):
    """4 CPU ranks on 2 cores: the contiguous causal ring's unequal loads keep the last rank busy after
    the others finish, so zigzag (equal loads) must win, and explain() says the cores are shared."""
    import dataclasses

    from ringcompile.cost_model.profiles import load_profile

    prof = dataclasses.replace(load_profile("cpu-gloo-loopback"), cores=2.0)
    ranked = ringcompile.plans(seq_len=16384, world_size=4, heads=8, kv_heads=4, head_dim=64, dtype="float32",
                               causal=True, backward=backward, profile=prof)
    times = {p.strategy: p.time for p in ranked}
    assert times["zigzag"] < times["ring"]
    assert "shared host: 4 ranks on 2 cores" in ranked[0].explain() or ranked[0].strategy == "local"


def test_shared_slowdown_and_step_overhead_only_touch_shared_hosts():
    """A dedicated-device profile ignores both; on a shared host they raise distributed times, and the
    one-process local baseline never sees the shared slowdown."""
    import dataclasses

    from ringcompile.cost_model.profiles import load_profile

    args = dict(seq_len=8192, world_size=2, heads=8, kv_heads=8, head_dim=64, dtype="float32", causal=True)
    cpu = load_profile("cpu-gloo-loopback")
    base = {p.strategy: p.time for p in ringcompile.plans(**args, profile=dataclasses.replace(
        cpu, shared_slowdown=1.0, step_overhead=0.0))}
    slow = {p.strategy: p.time for p in ringcompile.plans(**args, profile=dataclasses.replace(
        cpu, shared_slowdown=1.5, step_overhead=0.0))}
    assert slow["zigzag"] > 1.3 * base["zigzag"] and slow["local"] == pytest.approx(base["local"])
    over = {p.strategy: p.time for p in ringcompile.plans(**args, profile=dataclasses.replace(
        cpu, shared_slowdown=1.0, step_overhead=0.01))}
    assert over["zigzag"] == pytest.approx(base["zigzag"] + 2 * 0.01, rel=1e-6)   # N = 2 steps
    gpu = load_profile("h100-nvlink")
    assert gpu.cores == 0 and gpu.shared_slowdown == 1.0 and gpu.step_overhead == 0.0
