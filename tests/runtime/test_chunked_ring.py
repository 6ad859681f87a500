"""K/V chunking of ring transfers and the planner's Plan reaching the runtime (issue 5).

Against float64 eager attention on the unsharded input: gloo ranks (N = 2, 4) with chunks that do
not divide the shard, and hypothesis over the simulated ring. Plus the schedule itself (the exact
ring_shift calls), the plan's chunk for strategy "auto", the fallback when the planner fails,
``pieces_in``, the compute block choice, and tiles reaching the Triton launcher (no GPU needed).
"""

import logging
import threading
from types import SimpleNamespace

import multirank_bodies as bodies
import pytest
import torch
from attention_cases import check_simulated
from hypothesis import given
from hypothesis import strategies as st
from ring_harness import run_ranks

from ringcompile import mods
from ringcompile.cost_model import planner
from ringcompile.kernels.reference import attention_reference
from ringcompile.kernels.select import BlockKernels, block_kernels
from ringcompile.runtime import call_plan
from ringcompile.runtime.local import DEFAULT_BLOCK
from ringcompile.runtime.simulated import SimulatedCommunicator, simulated_ring_attention
from ringcompile.runtime.strategies.common import Piece, compute_block, pieces_in
from ringcompile.runtime.strategies.ring import chunk_spans
from ringcompile.spec import AttentionSpec


@pytest.mark.multirank
@pytest.mark.parametrize("world, seq_len, block_size", [(2, 19, 3), (4, 19, 2)])
def test_gloo_chunked_ring_and_zigzag_match_float64(world, seq_len, block_size):
    results = run_ranks(bodies.chunked_body, world, 240.0, seq_len, block_size)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:40])


@pytest.mark.multirank
def test_killed_rank_with_chunks_in_flight_raises_communication_error():
    timeout = 5.0
    results = run_ranks(bodies.killed_rank_body, 3, 120.0, timeout, 5, allow_missing=(2,))
    assert results[2] is None  # the victim died without reporting
    for rank, r in enumerate(results[:2]):
        assert r["raised"] == "CommunicationError", (rank, r)
        assert f"rank {rank} of 3" in r["message"] and "ring step" in r["message"], r["message"]
        assert "chunk" in r["message"], r["message"]
        assert r["seconds"] < 3 * timeout + 5, r


@given(world=st.integers(1, 6), strategy=st.sampled_from(["ring", "zigzag"]),
       mask=st.sampled_from(["none", "causal", "sliding", "padding", "document"]), S=st.integers(1, 30),
       block=st.integers(1, 30), hkv=st.integers(1, 2), groups=st.integers(1, 2), seed=st.integers(0, 10_000))
def test_simulated_chunked_ring_matches_reference(world, strategy, mask, S, block, hkv, groups, seed):
    block = min(block, S)  # block_size in 1..S
    check_simulated(strategy, world, mask, 1 + seed % 2, hkv * groups, hkv, S, 4, seed, block_size=block)


@pytest.fixture
def shift_log(monkeypatch):
    """(rank, step, channel, tokens) of every simulated ring_shift."""
    calls: list[tuple[int, int, int, int]] = []
    lock = threading.Lock()
    original = SimulatedCommunicator.ring_shift

    def counting(self, tensors, step, channel=0, what="K/V"):
        with lock:
            calls.append((self.rank, step, channel, tensors[0].shape[2]))
        return original(self, tensors, step, channel, what)

    monkeypatch.setattr(SimulatedCommunicator, "ring_shift", counting)
    return calls


def _expected(world: int, local: int, chunk: int | None, phase: str) -> list[tuple[int, int, int, int]]:
    """Sorted (rank, step, channel, tokens) of one forward or backward: K/V chunk j on channel 2j for
    steps 0..N-2; in the backward also its dK/dV accumulator on channel 2j+1 for steps 0..N-1."""
    spans = chunk_spans(local, chunk)
    kv = [(s, 2 * j, hi - lo) for s in range(world - 1) for j, (lo, hi) in enumerate(spans)]
    grads = [(s, 2 * j + 1, hi - lo) for s in range(world) for j, (lo, hi) in enumerate(spans)]
    per_rank = kv + (grads if phase == "backward" else [])
    return sorted((r, *c) for r in range(world) for c in per_rank)


@pytest.mark.parametrize("strategy, block, chunks", [("ring", 3, {3, 2}), ("zigzag", 3, {3, 2}),
                                                     ("ring", 8, {8}), ("ring", None, {8})])
def test_the_runtime_really_chunks(shift_log, strategy, block, chunks):
    """S = 24 on 3 ranks: 8-token shards travel as ceil(8 / block) messages each, forward and backward."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 24, 4, generator=g, dtype=torch.float64).requires_grad_(True)
               for _ in range(3))
    out = simulated_ring_attention(q, k, v, world_size=3, strategy=strategy, is_causal=True, block_size=block)
    assert sorted(shift_log) == _expected(3, 8, block, "forward")
    assert {c[3] for c in shift_log} == chunks
    shift_log.clear()
    dout = torch.randn(out.shape, dtype=out.dtype, generator=g)
    got = torch.autograd.grad(out, [q, k, v], dout)
    assert sorted(shift_log) == _expected(3, 8, block, "backward")
    ref = attention_reference(q, k, v, mask=mods.causal())
    for a, b in zip(got, torch.autograd.grad(ref, [q, k, v], dout), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def _fake_plan(strategy="ring", block_size=2, tiles=None):
    return SimpleNamespace(strategy=strategy, layout="contiguous", block_size=block_size,
                           tiles=tiles or {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1})


def test_auto_runs_the_plans_chunk(shift_log, monkeypatch):
    asked: list[dict] = []

    def fake(**kw):
        asked.append(kw)
        return _fake_plan()

    monkeypatch.setattr(planner, "choose_for_call", fake)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 20, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = simulated_ring_attention(q, k, v, world_size=2, strategy="auto", is_causal=True)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask=mods.causal()))
    assert sorted(shift_log) == _expected(2, 10, 2, "forward")  # 10-token shards, 2-token chunks
    assert any(kw.get("strategies") == ("ring",) and kw.get("layout") is None for kw in asked), asked


def test_a_user_block_size_beats_the_plan(shift_log, monkeypatch):
    monkeypatch.setattr(planner, "choose_for_call", lambda **kw: _fake_plan())
    q, k, v = (torch.randn(1, 2, 20, 4, dtype=torch.float64) for _ in range(3))
    simulated_ring_attention(q, k, v, world_size=2, strategy="ring", block_size=4)
    assert sorted(shift_log) == _expected(2, 10, 4, "forward")


def test_a_failing_planner_falls_back_to_whole_shards(shift_log, monkeypatch, caplog):
    def broken(**kw):
        raise RuntimeError("no profile today")

    monkeypatch.setattr(planner, "choose_for_call", broken)
    call_plan._WARNED.clear()
    q, k, v = (torch.randn(1, 2, 20, 4, dtype=torch.float64) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="ringcompile"):
        out = simulated_ring_attention(q, k, v, world_size=2, strategy="ring", is_causal=True)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask=mods.causal()))
    assert sorted(shift_log) == _expected(2, 10, None, "forward")
    messages = [r.getMessage() for r in caplog.records]
    assert any("no profile today" in m and "whole shards" in m for m in messages), messages


@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), lo=st.integers(0, 30),
       width=st.integers(1, 30), gap=st.integers(0, 50))
def test_pieces_in_cuts_pieces_by_local_range(lengths, lo, width, gap):
    """Token by token: a chunk's pieces hold exactly the shard's tokens in [lo, hi), at global offsets."""
    pieces, local, start = [], 0, 3
    for n in lengths:
        pieces.append(Piece(local, start, n))
        local, start = local + n, start + n + gap
    hi = lo + width
    whole = {p.local + i: p.start + i for p in pieces for i in range(p.length)}
    want = {t - lo: g for t, g in whole.items() if lo <= t < hi}
    got = {}
    for p in pieces_in(pieces, lo, hi):
        assert p.length > 0
        for i in range(p.length):
            assert p.local + i not in got
            got[p.local + i] = p.start + i
    assert got == want


def test_compute_block_whole_chunks_only_on_the_fused_path():
    cpu = BlockKernels("cpu", None, None, preferred_block=16384)
    plain = BlockKernels("x", None, None)
    assert compute_block(AttentionSpec(), cpu) == 16384
    assert compute_block(AttentionSpec(mask=mods.causal()), cpu) == 16384
    for spec in (AttentionSpec(mask=mods.sliding_window(8)), AttentionSpec(mask=mods.key_padding()),
                 AttentionSpec(mask=mods.causal(), score=mods.alibi()),
                 AttentionSpec(mask=mods.causal(), dropout_p=0.1)):
        assert compute_block(spec, cpu) == DEFAULT_BLOCK, spec
    assert compute_block(AttentionSpec(mask=mods.causal()), plain) == DEFAULT_BLOCK


def _cuda_like(shape):
    """Just what the plan lookup reads from a tensor: a CUDA device type without a GPU."""
    return SimpleNamespace(shape=shape, dtype=torch.bfloat16, device=SimpleNamespace(type="cuda"))


def test_plan_tiles_reach_the_triton_launcher():
    pytest.importorskip("triton")
    from ringcompile.kernels.triton import triton_block_kernels
    from ringcompile.kernels.triton.launch import Tiles, planner_tiles

    q, k = _cuda_like((1, 8, 2048, 64)), _cuda_like((1, 8, 2048, 64))
    spec = AttentionSpec(mask=mods.causal(), strategy="ring")
    run = call_plan.effective_spec(q, k, 4096, 2, spec, "ring")
    plan = planner.choose_for_call(seq_len=4096, world_size=2, batch=1, heads=8, kv_heads=8, head_dim=64,
                                   dtype=torch.bfloat16, causal=True, backward=True, strategies=("ring",),
                                   device="cuda")
    assert run.tiles == plan.tiles and run.block_size == plan.block_size
    assert call_plan.effective_spec(q, k, 4096, 2, spec, "ring") is run  # cached: kernels stay warm
    blocks = triton_block_kernels(run).forward.__self__
    assert blocks.tiles == planner_tiles(plan.tiles) and blocks.tiles is not None
    # the user's tiles win over the plan's; on CPU the plan's tiles are not used
    mine = call_plan.effective_spec(q, k, 4096, 2, spec.replace(tiles=Tiles(16, 32, 2, 1)), "ring")
    assert triton_block_kernels(mine).forward.__self__.tiles == Tiles(16, 32, 2, 1)
    cpu_q = torch.empty(1, 8, 2048, 64)
    assert call_plan.effective_spec(cpu_q, cpu_q, 4096, 2, spec, "ring").tiles is None


def test_cpu_kernels_get_whole_chunks():
    assert block_kernels(AttentionSpec(), torch.device("cpu")).preferred_block >= DEFAULT_BLOCK
