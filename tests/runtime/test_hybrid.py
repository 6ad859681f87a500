"""Strategy "hybrid" (Ulysses inside a node, ring across nodes): the simulated two-level world
(virtual ranks) against float64 eager attention on the unsharded input, forward and gradients."""

import math

import pytest
import torch
from attention_cases import MASKS, attention_case
from hypothesis import given, settings
from hypothesis import strategies as st

from ringcompile.errors import OptionError, ShapeMismatchError
from ringcompile.kernels.reference import attention_reference
from ringcompile.runtime.execute import run_forward
from ringcompile.runtime.layouts import shard_tensor
from ringcompile.runtime.simulated import simulate, simulated_ring_attention
from ringcompile.runtime.strategies.hybrid import from_node_order, kv_replication, to_node_order
from ringcompile.runtime.two_level import split_simulated
from ringcompile.runtime.user_spec import build_spec


def check_hybrid(outer, inner, mask, hq, hkv, S, seed, layout="contiguous", block_size=None, B=1, D=4):
    (q, k, v), m, s, me, se = attention_case(mask, B, hq, hkv, S, D, seed)
    out = simulated_ring_attention(q, k, v, world_size=outer * inner, inner_size=inner, strategy="hybrid",
                                   mask=m, score=s, mask_extras=me, score_extras=se, enable_gqa=True,
                                   layout=layout, block_size=block_size)
    ref = attention_reference(q, k, v, mask=m, score=s, mask_extras=me, score_extras=se)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    dout = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(seed + 1))
    wrt = [q, k, v, *se]
    for a, b in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(ref, wrt, dout), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", [(2, 2), (2, 4), (4, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_mask_and_head_layout(shape, mask, heads):
    outer, inner = shape
    layout = "zigzag" if "causal" in mask or mask == "alibi" else "contiguous"
    check_hybrid(outer, inner, mask, *heads, S=4 * outer * inner + 3, seed=hash((shape, mask)) % 1000,
                 layout=layout)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("heads", [(2, 1), (4, 1), (6, 2)])
def test_gqa_with_fewer_kv_heads_than_the_node_replicates_them(heads, layout):
    """kv heads 1 or 2 on 2 or 4 ranks a node: each kv head is copied only as often as needed."""
    hq, hkv = heads
    inner = 2 if hq % 4 else 4
    check_hybrid(2, inner, "causal", hq, hkv, S=19, seed=hq + hkv, layout=layout, block_size=3)


@settings(max_examples=25, deadline=None)
@given(outer=st.integers(1, 4), inner=st.sampled_from([1, 2, 4]), mask=st.sampled_from(MASKS),
       S=st.integers(1, 29), hkv=st.sampled_from([1, 2, 4]), groups=st.integers(1, 2),
       block=st.sampled_from([None, 1, 3]), layout=st.sampled_from(["contiguous", "zigzag"]),
       seed=st.integers(0, 10_000))
def test_random_two_level_worlds(outer, inner, mask, S, hkv, groups, block, layout, seed):
    """Any outer x inner, any length (padding), kv heads below/at/above the node size, chunked rings."""
    hq = math.lcm(hkv * groups, inner)   # kv heads and the node size divide the query heads
    check_hybrid(outer, inner, mask, hq, hkv, S, seed, layout=layout, block_size=block)


def test_kv_replication_is_the_least_that_divides():
    assert [kv_replication(h, 8) for h in (1, 2, 4, 8, 16, 6)] == [8, 4, 2, 1, 1, 4]
    for hkv in range(1, 9):
        for inner in (1, 2, 4, 8):
            r = kv_replication(hkv, inner)
            assert (hkv * r) % inner == 0 and all((hkv * x) % inner for x in range(1, r))


def test_eight_by_eight_virtual_ranks():
    check_hybrid(8, 8, "causal", 8, 8, S=128, seed=3, layout="zigzag", D=2)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_node_order_round_trip(layout):
    x = torch.randn(1, 2, 24, 3)
    assert torch.equal(from_node_order(to_node_order(x, 3, layout), 3, layout), x)
    if layout == "zigzag":  # node 0 of 2 nodes x 3: chunks 0,1,2 and 9,10,11 of 12, in global order
        idx = torch.cat([shard_tensor(torch.arange(48), 0, 6, r, "zigzag") for r in range(3)])
        assert to_node_order(idx.view(1, 1, -1), 3, layout).flatten().tolist() == (
            list(range(0, 12)) + list(range(36, 48)))


def test_query_heads_not_divisible_by_the_node_raise():
    (q, k, v), *_ = attention_case("none", 1, 3, 3, 8, 4, 0)
    with pytest.raises(OptionError, match="query heads"):
        simulated_ring_attention(q, k, v, world_size=4, inner_size=2, strategy="hybrid")


def test_flat_group_raises_a_clear_error():
    (q, k, v), *_ = attention_case("none", 1, 2, 2, 8, 4, 0)
    with pytest.raises(OptionError, match="two-level group"):
        simulated_ring_attention(q, k, v, world_size=2, strategy="hybrid")


def test_ranks_disagreeing_on_the_mesh_shape_raise_before_any_exchange():
    """Rank 3 factors 4 ranks as 1 x 4, the others as 2 x 2: all raise ShapeMismatchError at once."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 8, 4, generator=g, dtype=torch.float64)
    spec = build_spec(strategy="hybrid", timeout=20.0)
    errors = []

    def body(comm):
        two = split_simulated(comm, 4 if comm.rank == 3 else 2)
        inner_a2a = two.inner.all_to_all
        two.inner.all_to_all = lambda *a, **kw: errors.append("exchanged") or inner_a2a(*a, **kw)
        x = shard_tensor(q, 2, 4, comm.rank, "contiguous")
        try:
            run_forward(two, x, x, x, [], [], 8, spec, "hybrid", "contiguous")
        except ShapeMismatchError as e:
            return str(e)
        return None

    messages = simulate(body, 4, timeout=20.0)
    assert all(m is not None and "mesh shape" in m for m in messages), messages
    assert errors == []


def test_gloo_two_by_two_mesh():
    """4 gloo ranks as a 2 x 2 DeviceMesh: every mask kind x {MHA, GQA}, fwd+bwd; the mesh check; then
    rank 3 dies at its first ring step across nodes: its outer peer (rank 1) fails in the ring, its inner
    peer (rank 2) in the node's output all-to-all, rank 0 after them; all within the timeout."""
    import hybrid_bodies
    from ring_harness import run_ranks

    timeout = 4.0
    results = run_ranks(hybrid_bodies.hybrid_body, 4, 150.0, 21, timeout, allow_missing=(3,))
    assert results[3] is None, results[3]  # it passed its own checks and died in the last phase
    failures = [f for r in results[:3] for f in r["failures"]]
    assert not failures, "\n".join(failures)
    killed = [r["killed"] for r in results[:3]]
    for rank, r in enumerate(killed):
        assert r["raised"] == "CommunicationError", (rank, r)
        assert r["seconds"] < 3 * timeout + 5, (rank, r)
    assert "ring transfer" in killed[1]["message"], killed[1]
    assert "all-to-all" in killed[2]["message"], killed[2]


def test_auto_picks_hybrid_on_a_two_level_group_when_the_model_says_so():
    """On h100-nvlink-ib, 8 x 8 ranks, S = 128K causal: the planner's hybrid-8x8 wins, so "auto" runs
    "hybrid"; on a flat group the same call never does."""
    from ringcompile.runtime.choice import choose_strategy

    q = torch.empty(1, 32, 2048, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, 2048, 128, dtype=torch.bfloat16, device="meta")
    spec = build_spec(is_causal=True).replace(profile="h100-nvlink-ib")
    assert choose_strategy(q, k, k, 131072, 64, spec, "zigzag", backward=True, two_level=(8, 8)) == "hybrid"
    assert choose_strategy(q, k, k, 131072, 64, spec, "zigzag", backward=True) != "hybrid"


def test_auto_on_the_simulated_two_level_world_matches_the_reference():
    (q, k, v), m, *_ = attention_case("causal", 1, 4, 2, 16, 4, 5)
    out = simulated_ring_attention(q, k, v, world_size=4, inner_size=2, strategy="auto", mask=m,
                                   enable_gqa=True, layout="zigzag")
    torch.testing.assert_close(out, attention_reference(q, k, v, mask=m), atol=1e-9, rtol=1e-9)


def test_hybrid_outer_ring_chunk_comes_from_the_plan():
    """Without block_size, the outer ring's K/V chunk is the planner's for the split (node-chunk tokens)."""
    from ringcompile.runtime.call_plan import effective_spec

    q = torch.empty(1, 32, 4096, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, 4096, 128, dtype=torch.bfloat16, device="meta")
    spec = build_spec(is_causal=True, strategy="hybrid").replace(profile="h100-nvlink-ib")
    chunk = effective_spec(q, k, 4096 * 64, 64, spec, "hybrid-8x8").block_size
    assert chunk is not None and 0 < chunk < 8 * 4096


def test_a_level_of_one_rank_on_a_real_group_shape():
    """1 x 4 as a process-group mesh builds it: the outer level is ``Alone`` (one rank, no exchange)."""
    from ringcompile import mods
    from ringcompile.runtime.layouts import unshard_tensor
    from ringcompile.runtime.two_level import Alone, SubCommunicator, TwoLevelCommunicator

    (q, k, v), *_ = attention_case("none", 1, 4, 2, 16, 4, 11)
    spec = build_spec(is_causal=True, strategy="hybrid", timeout=20.0)

    def body(comm):
        two = TwoLevelCommunicator(comm, Alone(20.0), SubCommunicator(comm, range(4), "inner"))
        shards = [shard_tensor(t.detach(), 2, 4, comm.rank, "zigzag") for t in (q, k, v)]
        return run_forward(two, *shards, [], [], 16, spec, "hybrid", "zigzag")[0]

    out = unshard_tensor(simulate(body, 4, timeout=20.0), 2, "zigzag", 16)
    ref = attention_reference(q, k, v, mask=mods.causal())
    torch.testing.assert_close(out, ref.detach(), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("shape,heads,layout,mask", [((2, 2), (4, 2), "zigzag", "causal"),
                                                     ((2, 4), (8, 2), "contiguous", "alibi"),
                                                     ((4, 2), (2, 1), "zigzag", "sliding_window")],
                         ids=["2x2-gqa-causal", "2x4-gqa-alibi", "4x2-mqa-window"])
def test_dropout_drops_what_one_process_and_the_flat_ring_drop(shape, heads, layout, mask):
    """The keep mask is a hash of global (b, h, q, kv) and the seed: after the all-to-all an inner rank
    holds heads [h0, h0 + H/N_i), and its kernels shift the hash by h0, so hybrid equals the world-1 run
    with the same seed, the flat ring, and float64 eager attention with that mask; gradients too."""
    outer, inner = shape
    S = 4 * outer * inner + 3
    (q, k, v), m, s, me, se = attention_case(mask, 2, *heads, S, 4, sum(shape) + heads[0])
    kw = dict(mask=m, score=s, mask_extras=me, score_extras=se, enable_gqa=True, dropout_p=0.3,
              dropout_seed=4321)
    out = simulated_ring_attention(q, k, v, world_size=outer * inner, inner_size=inner, strategy="hybrid",
                                   layout=layout, block_size=3, **kw)
    one = simulated_ring_attention(q, k, v, world_size=1, strategy="local", **kw)
    ring = simulated_ring_attention(q, k, v, world_size=outer * inner, strategy="ring", layout=layout, **kw)
    ref = attention_reference(q, k, v, mask=m, score=s, mask_extras=me, score_extras=se, dropout_p=0.3,
                              dropout_seed=4321)
    plain = attention_reference(q, k, v, mask=m, score=s, mask_extras=me, score_extras=se)
    assert not torch.allclose(ref, plain)  # dropout did something
    for other in (one, ring, ref):
        torch.testing.assert_close(out, other, atol=1e-9, rtol=1e-9)
    dout = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(7))
    wrt = [q, k, v, *se]
    got = torch.autograd.grad(out, wrt, dout)
    for other in (one, ring, ref):
        for a, b in zip(got, torch.autograd.grad(other, wrt, dout), strict=True):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_dropout_with_another_seed_drops_other_entries():
    (q, k, v), m, *_ = attention_case("causal", 1, 4, 4, 12, 4, 2)
    a, b = (simulated_ring_attention(q, k, v, world_size=4, inner_size=2, strategy="hybrid", mask=m,
                                     layout="zigzag", dropout_p=0.3, dropout_seed=seed) for seed in (1, 2))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, attention_reference(q, k, v, mask=m, dropout_p=0.3, dropout_seed=2),
                               atol=1e-9, rtol=1e-9)


def test_a_rank_dying_in_the_node_all_to_all_makes_the_others_raise_within_the_timeout():
    """Rank 2 passes the mesh check, then dies as its node's all-to-all starts (it sends nothing): its inner
    peer (rank 3) raises CommunicationError in the all-to-all, its outer peer (rank 0) in the ring across
    nodes, rank 1 after them; each within a few timeouts (the gloo test kills a rank in the outer ring)."""
    import time

    from ringcompile.errors import CommunicationError

    timeout = 1.0
    (q, k, v), *_ = attention_case("none", 1, 4, 4, 16, 4, 13)
    spec = build_spec(is_causal=True, strategy="hybrid", timeout=timeout)

    class Died(Exception):
        pass

    def body(comm):
        two = split_simulated(comm, 2)
        if comm.rank == 2:
            def die(*args, **kwargs):
                raise Died
            two.inner.all_to_all = die
        shards = [shard_tensor(t.detach(), 2, 4, comm.rank, "zigzag") for t in (q, k, v)]
        start = time.monotonic()
        try:
            run_forward(two, *shards, [], [], 16, spec, "hybrid", "zigzag")
            return ("finished", "", time.monotonic() - start)
        except Died:
            return ("died", "", 0.0)
        except CommunicationError as e:
            return ("CommunicationError", str(e), time.monotonic() - start)

    results = simulate(body, 4, timeout=timeout)
    assert results[2][0] == "died"
    for rank in (0, 1, 3):
        raised, message, seconds = results[rank]
        assert raised == "CommunicationError" and seconds < 4 * timeout + 2, (rank, results[rank])
    assert "all-to-all" in results[3][1], results[3]
    assert "ring" in results[0][1], results[0]


def test_a_profile_factors_the_group_only_where_it_can():
    """The backend's two-level profile hook leaves a one-process run, a flat strategy, a one-level profile
    and an unreadable profile alone (the 4-rank factoring itself runs in test_gloo_two_by_two_mesh)."""
    from ringcompile.backend import _profile_node_size
    from ringcompile.options import Options

    assert _profile_node_size(Options(profile="h100-nvlink-ib")) is None        # no process group here
    assert _profile_node_size(Options(profile="h100-nvlink-ib", strategy="ring")) is None
    assert _profile_node_size(Options(profile="h100-nvlink")) is None
    assert _profile_node_size(Options(profile="/nonexistent/profile.toml")) is None
