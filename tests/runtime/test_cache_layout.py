"""The sharded cache's slot ownership: closed-form lengths match the slot lists, slots partition the
cache, and the shortest-shard policy keeps shards balanced."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringcompile.errors import OptionError
from ringcompile.runtime.cache_layout import CacheLayout, append_owner


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 5), prefill=st.integers(0, 40), appended=st.integers(0, 40),
       layout=st.sampled_from(["contiguous", "zigzag"]), policy=st.sampled_from(["shortest", "round_robin"]))
def test_lengths_slots_and_owners_agree(world, prefill, appended, layout, policy):
    cl = CacheLayout(world, prefill, layout, policy)
    T = prefill + appended
    slots = [cl.slots(r, T) for r in range(world)]
    assert sorted(t for s in slots for t in s) == list(range(T))          # a partition of the cache
    assert cl.lengths(T) == [len(s) for s in slots]                        # closed form = the history
    owners = cl.owners(T)
    assert all(owners[t] == r == cl.owner(t) for r, s in enumerate(slots) for t in s)
    for r, s in enumerate(slots):                                          # appends only ever add at the end
        assert s[:len(cl.slots(r, max(prefill, T - 1)))] == cl.slots(r, max(prefill, T - 1))


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 5), prefill=st.integers(0, 30), appended=st.integers(0, 30),
       cut=st.integers(0, 60),
       policy=st.sampled_from(["shortest", "round_robin"]))
def test_a_cropped_cache_is_the_layout_at_the_shorter_length(world, prefill, appended, cut, policy):
    """What ``ShardedCacheLayer.crop`` relies on: dropping slots >= n from every shard leaves exactly the
    layout's shards at length n (also inside the prefill), so the metadata check still passes and the
    next appends go where they would have gone."""
    cl = CacheLayout(world, prefill, "contiguous", policy)
    T = prefill + appended
    n = min(cut, T)
    for r in range(world):
        assert [t for t in cl.slots(r, T) if t < n] == cl.slots(r, n)
    assert cl.lengths(n) == [len(cl.slots(r, n)) for r in range(world)]


@settings(max_examples=40, deadline=None)
@given(world=st.integers(2, 5), prefill=st.integers(0, 40), appended=st.integers(0, 60))
def test_shortest_policy_only_narrows_the_imbalance(world, prefill, appended):
    cl = CacheLayout(world, prefill, "contiguous", "shortest")
    spread = [max(ls) - min(ls) for ls in (cl.lengths(prefill + a) for a in range(appended + 1))]
    assert all(b <= max(a, 1) for a, b in zip(spread, spread[1:], strict=False))
    start = spread[0]
    if appended >= start * world:                      # enough appends to fill the short shards
        assert spread[-1] <= 1


def test_append_owner_rules():
    assert append_owner([3, 3, 2, 2], 10, "shortest") == 2
    assert append_owner([3, 3, 3, 3], 10, "shortest") == 0
    assert append_owner([3, 3, 2, 2], 10, "round_robin") == 2
    assert append_owner([0, 0, 0], 7, "round_robin") == 1
    with pytest.raises(OptionError, match="append policy"):
        append_owner([1, 2], 0, "random")
    with pytest.raises(OptionError):
        CacheLayout(2, 5, "diagonal")
