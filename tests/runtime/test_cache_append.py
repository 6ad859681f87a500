"""The preallocated shard ops (``runtime/cache_append.py``) on one process: appends land at the layout's
local index on the owner, the gathered cache is the unsharded one, and decode_attention over the
shards (their unwritten tail marked -1) equals float64 attention on the whole cache."""

from __future__ import annotations

import math

import pytest
import torch

from ringcompile.runtime.cache_append import cache_append, cache_gather, shard_capacity, shard_layout
from ringcompile.runtime.decode import decode_partials
from ringcompile.runtime.simulated import simulate

B, H, D, MAX = 2, 2, 8, 20


def _shards(world: int, prefill: int, steps: int, gen: torch.Generator):
    """Every rank's shard after a ``prefill``-token prefill and ``steps`` one-token appends; the full K/V."""
    T = prefill + steps
    full_k = torch.randn(B, H, T, D, generator=gen)
    full_v = torch.randn(B, H, T, D, generator=gen)
    caps = shard_capacity(world, prefill, MAX)
    shards = []
    for r in range(world):
        k, v = torch.zeros(B, H, caps[r], D), torch.zeros(B, H, caps[r], D)
        slots = torch.full((caps[r],), -1, dtype=torch.long)
        cache_append(k, v, slots, full_k[:, :, :prefill], full_v[:, :, :prefill], torch.arange(prefill), r,
                     world, prefill)
        for t in range(prefill, T):
            new_k, new_v = full_k[:, :, t:t + 1], full_v[:, :, t:t + 1]
            cache_append(k, v, slots, new_k, new_v, torch.tensor([t]), r, world, prefill)
        shards.append((k, v, slots))
    return shards, full_k, full_v


@pytest.mark.parametrize("world, prefill, steps", [(2, 11, 6), (3, 7, 9), (4, 5, 1)])
def test_appends_follow_the_layout(world, prefill, steps):
    gen = torch.Generator().manual_seed(world * 100 + prefill)
    shards, full_k, full_v = _shards(world, prefill, steps, gen)
    T = prefill + steps
    layout = shard_layout(world, prefill)
    assert [int((s >= 0).sum()) for _, _, s in shards] == layout.lengths(T)
    for r, (k, v, slots) in enumerate(shards):
        want = layout.slots(r, T)
        assert slots[:len(want)].tolist() == want and bool((slots[len(want):] == -1).all())
        assert torch.equal(k[:, :, :len(want)], full_k[:, :, want])
        assert torch.equal(v[:, :, :len(want)], full_v[:, :, want])
    assert max(len(layout.slots(r, T)) for r in range(world)) <= math.ceil(T / world) + 1


def test_gather_on_one_rank_places_every_slot():
    shards, full_k, full_v = _shards(1, 9, 4, torch.Generator().manual_seed(3))
    k, v, slots = shards[0]
    got_k, got_v = cache_gather(k, v, slots, torch.tensor([12]), MAX, 9, "single", 10.0)
    assert got_k.shape == (B, H, MAX, D)
    assert torch.equal(got_k[:, :, :13], full_k) and torch.equal(got_v[:, :, :13], full_v)
    assert not got_k[:, :, 13:].any()


@pytest.mark.parametrize("world", [2, 3])
def test_decode_over_preallocated_shards_matches_float64(world):
    prefill, steps, Hq = 10, 5, 4
    gen = torch.Generator().manual_seed(world)
    shards, full_k, full_v = _shards(world, prefill, steps, gen)
    T = prefill + steps
    q = torch.randn(B, Hq, 1, D, generator=gen)
    keep = torch.rand(B, 1, 1, MAX, generator=gen) > 0.3
    keep[..., T - 1] = True
    ref_k = full_k.double().repeat_interleave(Hq // H, 1)
    ref_v = full_v.double().repeat_interleave(Hq // H, 1)
    scores = q.double() @ ref_k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(~keep[..., :T], float("-inf"))
    want = torch.softmax(scores, -1) @ ref_v

    def body(comm):
        k, v, slots = shards[comm.rank]
        out, _, _ = decode_partials(comm, q, k, v, slots, torch.tensor([T - 1]), slot_mask=keep,
                                    layout=shard_layout(world, prefill))
        return out

    outs = simulate(body, world)
    for out in outs:
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
