"""Shared by the decode tests (simulated and spawned ranks): a random full cache, its shards under a
CacheLayout, and float64 attention on the whole cache with HF's slot semantics as the reference."""

from __future__ import annotations

import dataclasses

import torch

from ringcompile.runtime.cache_layout import CacheLayout


@dataclasses.dataclass
class Case:
    q: torch.Tensor            # (B, Hq, Sq, D), replicated
    k: torch.Tensor            # (B, Hkv, T, D), the whole cache
    v: torch.Tensor
    q_slots: torch.Tensor      # (Sq,)
    key_padding: torch.Tensor | None   # (B, T) bool, left padding
    window: int | None
    layout: CacheLayout

    @property
    def cache_len(self) -> int:
        return self.k.shape[2]

    def shard(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots = torch.tensor(self.layout.slots(rank, self.cache_len), dtype=torch.long)
        return self.k[:, :, slots], self.v[:, :, slots], slots


def make_case(seed: int, world: int, *, batch: int = 2, heads: tuple[int, int] = (4, 2), prefill: int = 13,
              appended: int = 3, q_len: int = 1, window: int | None = None, left_pad: bool = True,
              dtype: torch.dtype = torch.float32, D: int = 8, policy: str = "shortest",
              prefill_layout: str = "contiguous") -> Case:
    """A cache of prefill + appended slots; the queries are the last ``q_len`` slots (a decode step or a
    prompt chunk whose K/V was appended before the call)."""
    g = torch.Generator().manual_seed(seed)
    T = prefill + appended
    hq, hkv = heads
    q = torch.randn(batch, hq, q_len, D, generator=g).to(dtype)
    k = torch.randn(batch, hkv, T, D, generator=g).to(dtype)
    v = torch.randn(batch, hkv, T, D, generator=g).to(dtype)
    pad = None
    if left_pad:
        lead = torch.randint(0, max(1, prefill // 2), (batch,), generator=g)
        lead[0] = 0
        pad = torch.arange(T).view(1, -1) >= lead.view(-1, 1)
    return Case(q, k, v, torch.arange(T - q_len, T), pad, window,
                CacheLayout(world, prefill, prefill_layout, policy))


def reference(case: Case) -> torch.Tensor:
    """float64 attention of every query over the whole cache: causal on slots, window, padding; rows
    that see nothing are 0."""
    q, k, v = (t.double() for t in (case.q, case.k, case.v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    T = k.shape[2]
    qs, ks = case.q_slots.view(-1, 1), torch.arange(T).view(1, -1)
    keep = ks <= qs
    if case.window is not None:
        keep = keep & (qs - ks < case.window)
    keep = keep.view(1, 1, *keep.shape)
    if case.key_padding is not None:
        keep = keep & case.key_padding.view(q.shape[0], 1, 1, T)
    p = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    return torch.nan_to_num(p) @ v


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def chunk_shards(case: Case, world: int, rank: int):
    """A prompt chunk (the case's queries, its last q_len slots) sequence-sharded over the ranks, each rank
    having appended its chunk shard's K/V to its prefill shard: (q, q_slots, k, v, kv_slots) of ``rank``.
    Query rows padding the chunk to a multiple of N carry slot -1."""
    T, C = case.cache_len, case.q.shape[2]
    c = -(-C // world)
    lo, hi = rank * c, min(C, (rank + 1) * c)
    q = torch.zeros(*case.q.shape[:2], c, case.q.shape[-1], dtype=case.q.dtype)
    q_slots = torch.full((c,), -1, dtype=torch.long)
    if hi > lo:
        q[:, :, :hi - lo] = case.q[:, :, lo:hi]
        q_slots[:hi - lo] = case.q_slots[lo:hi]
    pre = CacheLayout(world, T - C, "contiguous").slots(rank, T - C)
    slots = torch.tensor(pre + list(range(T - C + lo, T - C + max(lo, hi))), dtype=torch.long)
    return q, q_slots, case.k[:, :, slots], case.v[:, :, slots], slots
