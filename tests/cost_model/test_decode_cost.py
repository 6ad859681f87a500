"""Serving terms of the cost model: cache bytes shrink as 1/N, decode attention compute shrinks with N
while the merge grows with it, and ``ringcompile plan --decode`` prints them."""

from __future__ import annotations

import math

import pytest

from ringcompile.cli import main
from ringcompile.cost_model.decode import (
    DEFAULT_CALL_SECONDS,
    DecodeHostCost,
    cache_bytes_per_rank,
    calibrate_decode_host,
    choose_chunk_method,
    chunk_bytes,
    chunk_method_times,
    estimate_decode,
)


@pytest.mark.parametrize("T", [8192, 32771])
def test_cache_bytes_per_rank(T):
    one = cache_bytes_per_rank(cache_len=T, world_size=1, kv_heads=8, head_dim=128, layers=32,
                               dtype="bfloat16")
    assert one == 2 * 32 * 8 * T * 128 * 2
    for n in (2, 4, 8):
        per = cache_bytes_per_rank(cache_len=T, world_size=n, kv_heads=8, head_dim=128, layers=32,
                                   dtype="bfloat16")
        assert per == 2 * 32 * 8 * math.ceil(T / n) * 128 * 2 and per * n - one < 2 * 32 * 8 * 128 * 2 * n


def test_decode_terms_move_the_right_way():
    kw = dict(cache_len=1 << 20, heads=32, kv_heads=8, head_dim=128, layers=32, params=int(7e9),
              profile="h100-nvlink")
    one, four = estimate_decode(world_size=1, **kw), estimate_decode(world_size=4, **kw)
    assert one.merge_time == 0 and four.merge_time > 0
    assert four.attention_time == pytest.approx(one.attention_time / 4, rel=1e-3)
    assert four.dense_time == one.dense_time            # replicated: does not shrink with N
    assert four.prefill_time < one.prefill_time
    # a 1M-token cache: the attention read dominates one device, so 4 ranks decode faster
    assert four.token_latency < one.token_latency


def test_plan_decode_prints_serving_terms(capsys):
    rc = main(["plan", "--seq", "32768", "--world-size", "4", "--heads", "32", "--kv-heads", "8",
               "--head-dim", "128", "--decode", "--layers", "32", "--params", "7e9"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip().startswith(("N=1:", "N=4:"))]
    assert len(lines) == 2 and "cache/rank 4.0 GiB" in lines[0] and "cache/rank 1.0 GiB" in lines[1]
    assert "/token" in lines[1] and "prefill" in lines[1] and "pass-Q" in out


def test_chunk_choice_is_the_cheaper_transfer():
    for q_len, cache_len in ((1, 100), (64, 1 << 16), (1 << 16, 64)):
        pick = choose_chunk_method(q_len=q_len, cache_len=cache_len, heads=8, kv_heads=8, head_dim=64)
        q_bytes = 8 * q_len * (64 * 2 + 65 * 4)
        kv_bytes = 2 * 8 * cache_len * 64 * 2
        assert pick == ("pass_q" if q_bytes < kv_bytes else "pass_kv")


def test_chunk_choice_with_a_world_size_is_the_faster_predicted_method():
    """With N given the choice is by time: the KV ring hides its transfers under a long chunk's compute,
    so it wins even where pass-Q moves fewer bytes (a 4K chunk on a 32K GQA cache); a short chunk on a
    long cache still sends its queries."""
    shape = dict(heads=32, kv_heads=8, head_dim=128, world_size=4, profile="h100-nvlink")
    for C, T, want in ((128, 32768, "pass_q"), (32768, 4096, "pass_kv"), (4096, 32768, "pass_kv")):
        times = chunk_method_times(q_len=C, cache_len=T, **shape)
        assert choose_chunk_method(q_len=C, cache_len=T, **shape) == want == min(times, key=times.get)
    moved = chunk_bytes(q_len=4096, cache_len=32768, heads=32, kv_heads=8, head_dim=128)
    assert moved["pass_q"] < moved["pass_kv"]                    # the bytes rule would have sent queries


@pytest.mark.parametrize("world", [2, 4, 8])
def test_pass_kv_ring_time_is_hidden_compute_or_its_transfers(world):
    """(N - 1) max(piece, message) + piece: N pieces of compute (one piece = c queries against T/N slots
    on one rank) while each shard's message is shorter; N - 1 messages plus a piece once it is longer."""
    from ringcompile.cost_model.profiles import load_profile

    shape = dict(heads=8, kv_heads=8, head_dim=64, profile="h100-nvlink")
    C, T = 1 << 16, 1 << 12                                            # long chunk, short cache
    piece = chunk_method_times(q_len=C // world, cache_len=T // world, world_size=1, **shape)["pass_kv"]
    long_chunk = chunk_method_times(q_len=C, cache_len=T, world_size=world, **shape)
    assert long_chunk["pass_kv"] == pytest.approx(world * piece, rel=1e-9)
    assert long_chunk["pass_q"] > long_chunk["pass_kv"]                 # same compute plus collectives
    C, T = world, 1 << 22                                               # one query per rank, huge cache
    prof = load_profile("h100-nvlink")
    message = prof.link_latency + 2 * 8 * (T // world) * 64 * 2 / prof.link_bandwidth
    piece = chunk_method_times(q_len=1, cache_len=T // world, world_size=1, **shape)["pass_kv"]
    short = chunk_method_times(q_len=C, cache_len=T, world_size=world, **shape)
    assert message > piece
    assert short["pass_kv"] == pytest.approx((world - 1) * message + piece, rel=1e-9)
    assert short["pass_q"] < short["pass_kv"]


def test_host_cost_is_charged_once_per_layer_and_measured_terms_replace_the_profile():
    shape = dict(cache_len=1 << 16, world_size=4, heads=2, kv_heads=2, head_dim=64, layers=3,
                 profile="cpu-gloo-loopback")                        # MHA: the shard read bounds the step
    none = estimate_decode(**shape, host=DecodeHostCost(0.0))
    default = estimate_decode(**shape)
    assert default.host_time == pytest.approx(3 * DEFAULT_CALL_SECONDS["cpu"])
    assert default.token_latency - none.token_latency == pytest.approx(default.host_time)
    slow = estimate_decode(**shape, host=DecodeHostCost(0.0, read_bandwidth=1e9, collective=5e-3))
    profile_bandwidth = 21559148272.331886                          # cpu-gloo-loopback's memory_bandwidth
    assert slow.attention_time == pytest.approx(none.attention_time * profile_bandwidth / 1e9, rel=1e-9)
    assert slow.merge_time == pytest.approx(3 * 2 * 5e-3)


def test_calibrated_host_feeds_finite_positive_costs():
    """``calibrate_decode_host`` measures this host (no timing bound here: how close the calibrated
    prediction comes to a measured step is ``benchmarks/serving.py``'s "calibrated" column)."""
    host = calibrate_decode_host(large=1024, repeats=2)
    assert 0 < host.call < 1.0 and math.isfinite(host.read_bandwidth) and host.read_bandwidth > 0
    pred = estimate_decode(cache_len=8192, world_size=1, heads=4, kv_heads=2, head_dim=32, dtype="float32",
                           layers=3, profile="cpu-gloo-loopback", host=host)
    assert pred.host_time == pytest.approx(3 * host.call) and pred.token_latency > pred.host_time
