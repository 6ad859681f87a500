"""Serving terms: per-token decode latency, per-rank KV cache bytes, prefill time, pass-Q vs pass-KV.

Decode (``runtime/decode.py``) is memory-bound: each rank reads its cache shard once per layer
and token (2 * B * Hkv * ceil(T/N) * D elements), does 4 * B * Hq * ceil(T/N) * D FLOPs, and
joins two small all_gathers (the metadata check and the packed (out, lse), B * Hq * (Dv + 1)
fp32 per rank). The rest of the step (projections, MLP) runs replicated on every rank, so its
weight reads (``params`` elements) do not shrink with N. Plain formulas over the hardware profile
(no sympy: every term is a closed form and nothing is solved for).

Chunked prefill against a sharded cache moves either the cache (pass-KV, grows with T) or the
queries plus their partials (pass-Q, grows with the chunk C); ``choose_chunk_method`` takes the
one that moves fewer bytes, as arXiv 2411.01783 does (its heuristic compares the same volumes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .profiles import DTYPE_BYTES, Profile, dtype_name, load_profile

FP32 = 4


@dataclasses.dataclass(frozen=True)
class DecodeEstimate:
    """Predicted serving numbers for one configuration (seconds and bytes, per rank)."""

    world_size: int
    cache_len: int
    cache_bytes_per_rank: int
    token_latency: float          # one decode step, whole model
    attention_time: float         # of which: attention compute over the local shard, all layers
    merge_time: float             # of which: the two all_gathers per layer
    dense_time: float             # of which: replicated projections / MLP weight reads
    prefill_time: float           # the prompt (cache_len tokens), whole model
    prefill_strategy: str

    def lines(self) -> list[str]:
        from .planner import format_bytes, format_seconds

        return [f"N={self.world_size}: cache/rank {format_bytes(self.cache_bytes_per_rank)}, "
                f"decode {format_seconds(self.token_latency)}/token (attention "
                f"{format_seconds(self.attention_time)}, merge {format_seconds(self.merge_time)}, dense "
                f"{format_seconds(self.dense_time)}), prefill {format_seconds(self.prefill_time)} "
                f"({self.prefill_strategy})"]


def _compute_share(prof: Profile, world: int) -> float:
    """How much slower each rank computes when ``world`` CPU ranks share the host's cores."""
    cores = prof.host_cores() if prof.cores else 0
    if cores <= 0 or world <= 1:
        return 1.0
    return max(1.0, world / cores) * prof.shared_slowdown


def all_gather_time(prof: Profile, nbytes_per_rank: float, world: int) -> float:
    """A ring all_gather: N - 1 steps of one message each."""
    if world <= 1:
        return 0.0
    return (world - 1) * (prof.link_latency + nbytes_per_rank / prof.link_bandwidth)


def cache_bytes_per_rank(*, cache_len: int, world_size: int, kv_heads: int, head_dim: int, layers: int = 1,
                         batch: int = 1, dtype: Any = "bfloat16") -> int:
    """K and V of every layer on the fullest rank (balanced shards: ceil(T / N) slots)."""
    e = DTYPE_BYTES[dtype_name(dtype)]
    return 2 * layers * batch * kv_heads * math.ceil(cache_len / world_size) * head_dim * e


def decode_attention_time(prof: Profile, *, cache_len: int, world_size: int, heads: int, kv_heads: int,
                          head_dim: int, batch: int = 1, dtype: Any = "bfloat16") -> tuple[float, float]:
    """(compute, merge) seconds of one decode attention call on the slowest rank."""
    name = dtype_name(dtype)
    e = DTYPE_BYTES[name]
    local = math.ceil(cache_len / world_size)
    read = 2 * batch * kv_heads * local * head_dim * e
    flops = 4 * batch * heads * local * head_dim
    compute = max(read / prof.memory_bandwidth, flops / (prof.flops(name) * prof.kernel_efficiency))
    compute *= _compute_share(prof, world_size)
    merge = (all_gather_time(prof, 16 * 8, world_size)                       # metadata vector
             + all_gather_time(prof, batch * heads * (head_dim + 1) * FP32, world_size))
    return compute, merge


def estimate_decode(*, cache_len: int, world_size: int, heads: int, head_dim: int,
                    kv_heads: int | None = None, layers: int = 1, batch: int = 1, dtype: Any = "bfloat16",
                    params: int = 0, profile: str | Profile | None = "h100-nvlink") -> DecodeEstimate:
    """Per-token decode latency, per-rank cache bytes and prefill time of a ``layers``-layer model with
    ``params`` weights outside attention (0: attention only)."""
    from .planner import plan

    prof = load_profile(profile)
    kv_heads = kv_heads or heads
    name = dtype_name(dtype)
    compute, merge = decode_attention_time(prof, cache_len=cache_len, world_size=world_size, heads=heads,
                                           kv_heads=kv_heads, head_dim=head_dim, batch=batch, dtype=name)
    e = DTYPE_BYTES[name]
    share = _compute_share(prof, world_size)
    dense = max(params * e / prof.memory_bandwidth, 2 * params * batch / prof.flops(name)) * share
    best = plan(seq_len=cache_len, world_size=world_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                batch=batch, dtype=name, causal=True, profile=prof)
    prefill_dense = 2 * params * batch * math.ceil(cache_len / world_size) / prof.flops(name) * share
    return DecodeEstimate(world_size, cache_len,
                          cache_bytes_per_rank(cache_len=cache_len, world_size=world_size, kv_heads=kv_heads,
                                               head_dim=head_dim, layers=layers, batch=batch, dtype=name),
                          layers * (compute + merge) + dense, layers * compute, layers * merge, dense,
                          layers * best.time + prefill_dense, best.strategy)


def chunk_bytes(*, q_len: int, cache_len: int, heads: int, kv_heads: int, head_dim: int,
                elem_bytes: int = 2) -> dict[str, float]:
    """Bytes each method moves per batch row (whole group): pass-KV the cache, pass-Q the queries out
    and the fp32 partials back."""
    return {"pass_kv": 2 * kv_heads * cache_len * head_dim * elem_bytes,
            "pass_q": heads * q_len * (head_dim * elem_bytes + (head_dim + 1) * FP32)}


def choose_chunk_method(*, q_len: int, cache_len: int, heads: int, kv_heads: int, head_dim: int,
                        elem_bytes: int = 2) -> str:
    """"pass_q" when moving the chunk's queries (and partials back) is cheaper than moving the cache."""
    moved = chunk_bytes(q_len=q_len, cache_len=cache_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        elem_bytes=elem_bytes)
    return "pass_q" if moved["pass_q"] < moved["pass_kv"] else "pass_kv"
