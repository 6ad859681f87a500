"""Serving terms: per-token decode latency, per-rank KV cache bytes, prefill time, pass-Q vs pass-KV.

Decode (``runtime/decode.py``) is memory-bound: each rank reads its cache shard once per layer
and token (2 * B * Hkv * ceil(T/N) * D elements), does 4 * B * Hq * ceil(T/N) * D FLOPs, and
joins two small all_gathers (the metadata check and the packed (out, lse), B * Hq * (Dv + 1)
fp32 per rank). Each call also costs host time outside kernels and collectives
(``DecodeHostCost.call``: a documented default per device, or measured by ``calibrate_decode_host``,
which also measures the eager kernel's effective read bandwidth). The rest of the step
(projections, MLP) runs replicated on every rank, so its weight reads (``params`` elements) do
not shrink with N. Plain formulas over the hardware profile (no sympy: every term is a closed form
and nothing is solved for).

Chunked prefill against a sharded cache moves either the cache (pass-KV, a ring whose transfers
overlap the attention, grows with T) or the queries plus their partials (pass-Q, grows with the
chunk C, not overlapped); ``choose_chunk_method`` takes the one predicted faster
(``chunk_method_times``), as arXiv 2411.01783's heuristic does: pass-KV when its transfers hide
under compute, else the smaller transfer. Without a world size it compares the bytes moved.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .profiles import DTYPE_BYTES, Profile, dtype_name, load_profile

FP32 = 4
# Host seconds per decode-attention call outside its kernels and collectives (Python argument checks,
# slot/mask tensors, the merge's small ops): the default ``DecodeHostCost.call``. CPU: measured on the
# 2-core CI VM (torch 2.13, one thread, ``calibrate_decode_host``: 0.10-0.12 ms at a 16-slot cache);
# CUDA: ~20 small kernel launches at ~3 us. ``calibrate_decode_host`` measures it on the host at hand.
DEFAULT_CALL_SECONDS = {"cpu": 1.2e-4, "cuda": 6e-5}


@dataclasses.dataclass(frozen=True)
class DecodeHostCost:
    """What a hardware profile does not say about one decode-attention call.

    call:           host seconds per call outside kernels and collectives (charged once per layer);
    read_bandwidth: effective bytes/s of the local shard attention (0: the profile's memory bandwidth;
                    the eager kernel makes several passes over the scores, so measured is lower);
    collective:     seconds of one small all_gather at this world size (0: the profile's link model).
    """

    call: float
    read_bandwidth: float = 0.0
    collective: float = 0.0

    @classmethod
    def default(cls, prof: Profile) -> DecodeHostCost:
        return cls(DEFAULT_CALL_SECONDS.get(prof.device, DEFAULT_CALL_SECONDS["cuda"]))


def calibrate_decode_host(*, small: int = 16, large: int = 16384, heads: int = 4, kv_heads: int = 2,
                          head_dim: int = 32, repeats: int = 15) -> DecodeHostCost:
    """Measure ``call`` and ``read_bandwidth`` in this process: the median of ``repeats`` one-rank decode
    calls at a ``small`` and a ``large`` cache (float32, batch 1; the median, not the fastest, because a
    served step is a typical one, also on a shared host); the small one is the per-call cost, the slope
    between them the bandwidth. Takes well under a second; the caller sets the thread count."""
    import statistics
    import time

    import torch

    from ringcompile.runtime.decode import decode_attention

    def typical(T: int) -> float:
        g = torch.Generator().manual_seed(T)
        q = torch.randn(1, heads, 1, head_dim, generator=g)
        k, v = (torch.randn(1, kv_heads, T, head_dim, generator=g) for _ in range(2))
        slots, at = torch.arange(T), torch.tensor([T - 1])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            decode_attention(q, k, v, kv_slots=slots, q_slots=at, cache_len=T)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_small, t_large = typical(small), typical(large)
    moved = 2 * kv_heads * (large - small) * head_dim * FP32
    return DecodeHostCost(call=t_small, read_bandwidth=moved / max(t_large - t_small, 1e-9))


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
    host_time: float = 0.0        # of which: per-call host work (DecodeHostCost.call x layers)

    def lines(self) -> list[str]:
        from .planner import format_bytes, format_seconds

        return [f"N={self.world_size}: cache/rank {format_bytes(self.cache_bytes_per_rank)}, "
                f"decode {format_seconds(self.token_latency)}/token (attention "
                f"{format_seconds(self.attention_time)}, merge {format_seconds(self.merge_time)}, host "
                f"{format_seconds(self.host_time)}, dense {format_seconds(self.dense_time)}), prefill "
                f"{format_seconds(self.prefill_time)} ({self.prefill_strategy})"]


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
                          head_dim: int, batch: int = 1, dtype: Any = "bfloat16",
                          host: DecodeHostCost | None = None) -> tuple[float, float]:
    """(compute, merge) seconds of one decode attention call on the slowest rank (``host`` overrides the
    profile's bandwidth and collective model where it was measured; its ``call`` is charged by the caller)."""
    name = dtype_name(dtype)
    e = DTYPE_BYTES[name]
    local = math.ceil(cache_len / world_size)
    read = 2 * batch * kv_heads * local * head_dim * e
    flops = 4 * batch * heads * local * head_dim
    bandwidth = host.read_bandwidth if host is not None and host.read_bandwidth > 0 else prof.memory_bandwidth
    compute = max(read / bandwidth, flops / (prof.flops(name) * prof.kernel_efficiency))
    compute *= _compute_share(prof, world_size)
    if host is not None and host.collective > 0 and world_size > 1:
        return compute, 2 * host.collective
    merge = (all_gather_time(prof, 16 * 8, world_size)                       # metadata vector
             + all_gather_time(prof, batch * heads * (head_dim + 1) * FP32, world_size))
    return compute, merge


def estimate_decode(*, cache_len: int, world_size: int, heads: int, head_dim: int,
                    kv_heads: int | None = None, layers: int = 1, batch: int = 1, dtype: Any = "bfloat16",
                    params: int = 0, profile: str | Profile | None = "h100-nvlink",
                    host: DecodeHostCost | None = None) -> DecodeEstimate:
    """Per-token decode latency, per-rank cache bytes and prefill time of a ``layers``-layer model with
    ``params`` weights outside attention (0: attention only). ``host``: the per-call host cost (default
    ``DecodeHostCost.default``; ``calibrate_decode_host`` measures one), charged once per layer."""
    from .planner import plan

    prof = load_profile(profile)
    host = DecodeHostCost.default(prof) if host is None else host
    kv_heads = kv_heads or heads
    name = dtype_name(dtype)
    compute, merge = decode_attention_time(prof, cache_len=cache_len, world_size=world_size, heads=heads,
                                           kv_heads=kv_heads, head_dim=head_dim, batch=batch, dtype=name,
                                           host=host)
    e = DTYPE_BYTES[name]
    share = _compute_share(prof, world_size)
    dense = max(params * e / prof.memory_bandwidth, 2 * params * batch / prof.flops(name)) * share
    best = plan(seq_len=cache_len, world_size=world_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                batch=batch, dtype=name, causal=True, profile=prof)
    prefill_dense = 2 * params * batch * math.ceil(cache_len / world_size) / prof.flops(name) * share
    return DecodeEstimate(world_size, cache_len,
                          cache_bytes_per_rank(cache_len=cache_len, world_size=world_size, kv_heads=kv_heads,
                                               head_dim=head_dim, layers=layers, batch=batch, dtype=name),
                          layers * (compute + merge + host.call) + dense, layers * compute, layers * merge,
                          dense, layers * best.time + prefill_dense, best.strategy, layers * host.call)


def chunk_bytes(*, q_len: int, cache_len: int, heads: int, kv_heads: int, head_dim: int,
                elem_bytes: int = 2) -> dict[str, float]:
    """Bytes each method moves per batch row (whole group): pass-KV the cache, pass-Q the queries out
    and the fp32 partials back."""
    return {"pass_kv": 2 * kv_heads * cache_len * head_dim * elem_bytes,
            "pass_q": heads * q_len * (head_dim * elem_bytes + (head_dim + 1) * FP32)}


def chunk_method_times(*, q_len: int, cache_len: int, heads: int, kv_heads: int, head_dim: int,
                       world_size: int, batch: int = 1, dtype: Any = "bfloat16",
                       profile: str | Profile | None = None) -> dict[str, float]:
    """Predicted seconds of one chunk-attention call (``runtime/chunk_prefill.py``) per method, on the
    slowest rank: a ``q_len``-token chunk sequence-sharded over ``world_size`` ranks against a
    ``cache_len``-slot sharded cache (chunk included).

    Both methods compute the same: the rank's c = ceil(C/N) queries against all T slots, in N pieces
    of ceil(T/N). pass-KV rotates the cache shards, each step's transfer overlapping the next piece's
    compute ((N - 1) max(piece, message) + piece); pass-Q all_gathers the queries, computes, and
    returns fp32 partials by all_to_all, nothing overlapped."""
    prof = load_profile(profile)
    name = dtype_name(dtype)
    e, n = DTYPE_BYTES[name], world_size
    c, local = math.ceil(q_len / n), math.ceil(cache_len / n)
    read = 2 * batch * kv_heads * local * head_dim * e
    flops = 4 * batch * heads * c * local * head_dim
    piece = max(read / prof.memory_bandwidth, flops / (prof.flops(name) * prof.kernel_efficiency))
    piece *= _compute_share(prof, n)
    if n <= 1:
        return {"pass_kv": piece, "pass_q": piece}
    message = prof.link_latency + read / prof.link_bandwidth
    q_gather = all_gather_time(prof, batch * heads * c * head_dim * e, n)
    partials = (n - 1) * (prof.link_latency + batch * heads * c * (head_dim + 1) * FP32
                          / (prof.link_bandwidth * prof.alltoall_efficiency))
    return {"pass_kv": (n - 1) * max(piece, message) + piece, "pass_q": q_gather + n * piece + partials}


def choose_chunk_method(*, q_len: int, cache_len: int, heads: int, kv_heads: int, head_dim: int,
                        elem_bytes: int = 2, world_size: int | None = None, batch: int = 1,
                        dtype: Any = None, profile: str | Profile | None = None) -> str:
    """The faster of "pass_q" / "pass_kv" by ``chunk_method_times`` when ``world_size`` is given (the
    KV ring hides its transfers under compute when the chunk is long enough); without it, the one
    moving fewer bytes (pass-Q when Hq C (D e + 4 (D + 1)) < 2 Hkv T D e)."""
    if world_size is not None:
        if dtype is None:
            dtype = {8: "float64", 4: "float32"}.get(elem_bytes, "bfloat16")
        times = chunk_method_times(q_len=q_len, cache_len=cache_len, heads=heads, kv_heads=kv_heads,
                                   head_dim=head_dim, world_size=world_size, batch=batch, dtype=dtype,
                                   profile=profile)
        return "pass_q" if times["pass_q"] < times["pass_kv"] else "pass_kv"
    moved = chunk_bytes(q_len=q_len, cache_len=cache_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        elem_bytes=elem_bytes)
    return "pass_q" if moved["pass_q"] < moved["pass_kv"] else "pass_kv"
