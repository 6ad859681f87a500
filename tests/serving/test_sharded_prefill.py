"""``cache_append`` given the prefill graph's sequence shard (``seq_layout``, written by the sharding pass):
each rank stores exactly its slots of the cache's prefill layout (contiguous or zigzag; the padding past the
true length nowhere), the same buffers as from the full K/V; later appends and a decode over those shards
match float64 attention on the whole cache; a shard in another layout or of another world size raises.
Also the placement table's rule for the op and the planner following the cache's layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringcompile.cache_codes import causal_layout
from ringcompile.errors import ShapeMismatchError
from ringcompile.runtime.cache_append import cache_append, shard_capacity, shard_layout
from ringcompile.runtime.decode import decode_partials
from ringcompile.runtime.layouts import shard_tensor
from ringcompile.runtime.simulated import simulate

B, H, D = 2, 2, 3
LAYOUTS = ("contiguous", "zigzag")


def _empty(world: int, rank: int, prefill: int, max_len: int, layout: str):
    cap = shard_capacity(world, prefill, max_len, layout)[rank]
    return (torch.zeros(B, H, cap, D, dtype=torch.float64), torch.zeros(B, H, cap, D, dtype=torch.float64),
            torch.full((cap,), -1, dtype=torch.long))


def _prefill(world: int, rank: int, k: torch.Tensor, v: torch.Tensor, max_len: int, layout: str,
             sharded: bool):
    """Rank ``rank``'s buffers after the prefill of k / v (B, H, n, D): from its shard or the full K/V."""
    n = k.shape[2]
    keys, values, slots = _empty(world, rank, n, max_len, layout)
    if sharded:
        sk, sv = (shard_tensor(t, 2, world, rank, layout) for t in (k, v))
        cache_append(keys, values, slots, sk, sv, torch.arange(n), rank, world, n, layout, True, layout)
    else:
        cache_append(keys, values, slots, k, v, torch.arange(n), rank, world, n, layout, True)
    return keys, values, slots


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 4), n=st.integers(1, 19), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 99))
def test_a_sharded_prefill_stores_exactly_the_layouts_slots(world, n, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for _ in range(2))
    cl = shard_layout(world, n, layout)
    seen: list[int] = []
    for r in range(world):
        keys, values, slots = _prefill(world, r, k, v, n + 3, layout, sharded=True)
        want = cl.slots(r, n)
        assert slots[:len(want)].tolist() == want and bool((slots[len(want):] == -1).all())
        assert torch.equal(keys[:, :, :len(want)], k[:, :, want])
        assert torch.equal(values[:, :, :len(want)], v[:, :, want])
        assert not keys[:, :, len(want):].any() and not values[:, :, len(want):].any()
        seen += want
        full = _prefill(world, r, k, v, n + 3, layout, sharded=False)    # the replicated contract
        assert all(torch.equal(a, b) for a, b in zip((keys, values, slots), full, strict=True))
    assert sorted(seen) == list(range(n))                                # every slot on exactly one rank


@pytest.mark.parametrize("world, prefill", [(2, 12), (2, 11), (4, 16), (3, 10)])
def test_appends_and_decode_after_a_sharded_prefill_match_float64(world, prefill):
    layout = causal_layout(prefill, world)
    steps, Hq, max_len = 5, 4, prefill + 8
    T = prefill + steps
    gen = torch.Generator().manual_seed(world * 100 + prefill)
    full_k, full_v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    cl = shard_layout(world, prefill, layout)
    shards = []
    for r in range(world):
        keys, values, slots = _prefill(world, r, full_k[:, :, :prefill], full_v[:, :, :prefill], max_len,
                                       layout, sharded=True)
        for t in range(prefill, T):
            cache_append(keys, values, slots, full_k[:, :, t:t + 1], full_v[:, :, t:t + 1], torch.tensor([t]),
                         r, world, prefill, layout)
        want = cl.slots(r, T)
        assert slots[:len(want)].tolist() == want and torch.equal(keys[:, :, :len(want)], full_k[:, :, want])
        shards.append((keys, values, slots))
    assert max(int((s >= 0).sum()) for _, _, s in shards) <= math.ceil(T / world) + 1
    q = torch.randn(B, Hq, 1, D, generator=gen, dtype=torch.float64)
    keep = torch.rand(B, 1, 1, max_len, generator=gen) > 0.3
    keep[..., T - 1] = True
    ref_k, ref_v = (t.repeat_interleave(Hq // H, 1) for t in (full_k, full_v))
    scores = (q @ ref_k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~keep[..., :T], float("-inf"))
    want_out = torch.softmax(scores, -1) @ ref_v

    def body(comm):
        keys, values, slots = shards[comm.rank]
        out, _, _ = decode_partials(comm, q.float(), keys.float(), values.float(), slots,
                                    torch.tensor([T - 1]), slot_mask=keep, layout=cl)
        return out

    for out in simulate(body, world):
        torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)


def test_a_shard_in_another_layout_or_world_raises():
    k = torch.randn(B, H, 8, D, dtype=torch.float64)
    keys, values, slots = _empty(2, 0, 8, 10, "contiguous")
    zig = shard_tensor(k, 2, 2, 0, "zigzag")
    with pytest.raises(ShapeMismatchError, match="prefill layout"):
        cache_append(keys, values, slots, zig, zig, torch.arange(8), 0, 2, 8, "contiguous", True, "zigzag")
    four = shard_tensor(k, 2, 4, 0, "contiguous")      # a 4-rank shard handed to a 2-rank cache
    with pytest.raises(ShapeMismatchError, match="world size"):
        cache_append(keys, values, slots, four, four, torch.arange(8), 0, 2, 8, "contiguous", True,
                     "contiguous")


def test_the_placement_rule_and_the_planner_follow_the_caches_layout():
    import torch.fx as fx

    from ringcompile.options import Options
    from ringcompile.passes.placements import local_shard_rule
    from ringcompile.passes.shard import choose_layout

    g = fx.Graph()
    a = [g.placeholder(f"x{i}") for i in range(6)]
    node = g.call_function(torch.ops.ringcompile.cache_append.default, (*a, 0, 2, 12, "zigzag", True))
    rule = local_shard_rule(node)
    assert rule is not None and rule.wants == "zigzag" and dict(rule.seq_args) == {(3,): 2, (4,): 2}
    assert rule.layout_arg == (11, "seq_layout")
    later = g.call_function(torch.ops.ringcompile.cache_append.default, (*a, 0, 2, 12, "zigzag", False))
    assert local_shard_rule(later) is None           # a chunk / decode write takes full K/V
    assert local_shard_rule(g.call_function(torch.ops.aten.add.Tensor, (a[0], a[1]))) is None
    assert choose_layout(Options(), [], 11, 2, cache_layout="zigzag") == "zigzag"
    assert choose_layout(Options(layout="contiguous"), [], 12, 2, cache_layout="zigzag") == "contiguous"
    assert [causal_layout(n, 2) for n in (11, 12, 16, 18)] == ["contiguous", "zigzag", "zigzag", "contiguous"]
