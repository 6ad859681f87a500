"""Serving terms of the cost model: cache bytes shrink as 1/N, decode attention compute shrinks with N
while the merge grows with it, and ``ringcompile plan --decode`` prints them."""

from __future__ import annotations

import math

import pytest
from ringcompile.cost_model.decode import cache_bytes_per_rank, choose_chunk_method, estimate_decode

from ringcompile.cli import main


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
