"""Serving paths (decode_attention, the chunk op's chunk_attention) with a model's mask as the whole rule.

A compiled graph's SDPA (or HF's eager chain) reads the gathered cache in one process: all W slots of
the preallocated cache, zeros where nothing is written yet, with the model's mask and no other rule.
Two things differ from the shard's own causal rule there: a query row that keeps NO key (a custom
mask; a padded query under an additive finfo.min mask gets softmax over ``s + finfo.min`` on all W
slots, unwritten zero keys included; a boolean row gets 0 from torch's SDPA), and a mask that keeps
a LATER written slot (a prefix-LM chunk). Reference: that one-process computation in float64 on the
gathered cache; fresh random inputs per case.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ringcompile.runtime.chunk_prefill import chunk_attention
from ringcompile.runtime.decode import decode_partials
from ringcompile.runtime.simulated import simulate

B, HQ, HKV, D, W, T = 2, 4, 2, 8, 12, 9  # W preallocated slots, T written
MIN32 = torch.finfo(torch.float32).min


def _cache(seed: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.zeros(B, HKV, W, D)
    v = torch.zeros(B, HKV, W, D)
    k[:, :, :T] = torch.randn(B, HKV, T, D, generator=g)
    v[:, :, :T] = torch.randn(B, HKV, T, D, generator=g)
    return k, v, g


def _shard(k: torch.Tensor, v: torch.Tensor, rank: int, world: int):
    slots = torch.arange(rank, T, world)  # round robin over the written slots
    return k[:, :, slots], v[:, :, slots], slots


def _one_process(q, k, v, mask):
    """The graph in one process: attention over all W gathered slots with the mask, float64."""
    g = HQ // HKV
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    if mask.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # a row keeping nothing: 0
    scores = q @ k.transpose(-1, -2) / D ** 0.5 + mask.double()  # HF eager: add, softmax, matmul
    return torch.softmax(scores, -1) @ v


def _decode_mask(additive: bool) -> torch.Tensor:
    """(B, 1, 1, W): batch 0 HF's causal mask at the query slot T - 1, batch 1 keeps nothing."""
    keep = torch.zeros(B, 1, 1, W, dtype=torch.bool)
    keep[0, ..., :T] = True
    return torch.zeros(keep.shape).masked_fill(~keep, MIN32) if additive else keep


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("additive", [True, False], ids=["finfo-min", "bool"])
def test_decode_row_with_no_kept_key_is_one_process_value(world, additive):
    """finfo.min: the dead row is sum(v over written slots) / W (uniform over all W slots, the W - T
    unwritten ones with zero values), not the mean over the T written ones; bool: 0, as SDPA gives."""
    k, v, g = _cache(100 + world + 10 * additive)
    q = torch.randn(B, HQ, 1, D, generator=g)
    mask = _decode_mask(additive)
    want = _one_process(q, k, v, mask)

    def rank(comm):
        ks, vs, slots = _shard(k, v, comm.rank, comm.world_size)
        return decode_partials(comm, q, ks, vs, slots, torch.tensor([T - 1]), slot_mask=mask,
                               whole_mask=True)[0]

    for out in simulate(rank, world, timeout=20.0):
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    if not additive:  # the direct API (serving/hf.py's ring_decode: HF's mask made boolean) agrees: 0
        def direct(comm):
            ks, vs, slots = _shard(k, v, comm.rank, comm.world_size)
            return decode_partials(comm, q, ks, vs, slots, torch.tensor([T - 1]), slot_mask=mask)[0]
        for out in simulate(direct, world, timeout=20.0):
            assert (out[1] == 0).all()
    if additive:  # the case really is a dead row whose value depends on the unwritten slots
        assert not torch.allclose(want[1], v[1, :, :T].double().mean(1, keepdim=True).repeat_interleave(2, 0))


def test_the_compiled_decode_op_passes_the_mask_as_the_whole_rule():
    """``torch.ops.ringcompile.decode_attention`` (what the decode rule emits) on one rank: the
    finfo.min dead row gets one process's value."""
    import ringcompile.runtime.decode_op  # noqa: F401  (registers the op)

    k, v, g = _cache(7)
    q = torch.randn(B, HQ, 1, D, generator=g)
    mask = _decode_mask(True)
    slots = torch.cat([torch.arange(T), torch.full((W - T,), -1)])  # the preallocated shard: -1 unwritten
    out = torch.ops.ringcompile.decode_attention(q, k, v, slots, torch.tensor([T - 1]), mask, -1, -1,
                                                 D ** -0.5, "single", 20.0, [])
    torch.testing.assert_close(out.double(), _one_process(q, k, v, mask), atol=2e-6, rtol=1e-5)


def _chunk_mask(C: int) -> torch.Tensor:
    """(B, 1, C, W) bool over a chunk at slots [T - C, T): causal, except batch 0's first query also
    keeps the whole chunk (a prefix-LM's bidirectional prefix) and batch 1's second keeps nothing."""
    qs = torch.arange(T - C, T).view(-1, 1)
    keep = (torch.arange(W).view(1, -1) <= qs).expand(B, 1, C, W).clone()
    keep[0, 0, 0, T - C:T] = True
    keep[1, 0, 1] = False
    return keep


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("method", ["pass_q", "pass_kv"])
def test_chunk_mask_keeping_a_later_slot_or_nothing_is_one_process_value(world, method):
    """Each rank takes its ceil(C/N) queries (padded with slot -1 and mask rows that keep nothing, as
    the chunk op does): the row that keeps later chunk slots sees them, the row keeping nothing is 0."""
    C = 5
    k, v, g = _cache(200 + world + len(method))
    q = torch.randn(B, HQ, C, D, generator=g)
    mask = _chunk_mask(C)
    want = _one_process(q, k, v, mask)
    c = -(-C // world)

    def rank(comm):
        r = comm.rank
        lo, hi = min(C, r * c), min(C, (r + 1) * c)
        pad = c - (hi - lo)
        mine_q = torch.cat([q[:, :, lo:hi], q.new_zeros(B, HQ, pad, D)], 2)
        mine_slots = torch.cat([torch.arange(T - C + lo, T - C + hi), torch.full((pad,), -1)])
        mine_mask = torch.cat([mask[:, :, lo:hi], mask.new_zeros(B, 1, pad, W)], 2)
        ks, vs, slots = _shard(k, v, r, comm.world_size)
        out = chunk_attention(mine_q, ks, vs, q_slots=mine_slots, kv_slots=slots, cache_len=T, method=method,
                              slot_mask=mine_mask, comm=comm, whole_mask=True)
        return out[:, :, : hi - lo], lo, hi

    for out, lo, hi in simulate(rank, world, timeout=20.0):
        torch.testing.assert_close(out.double(), want[:, :, lo:hi], atol=2e-6, rtol=1e-5)
    assert (want[1, :, 1] == 0).all()
