"""Per-rank peak memory of each strategy, as named sympy terms (bytes).

Terms are what a rank holds at its peak: its local q/k/v/out shards, the fp32 output
accumulator and lse, the ring's double-buffered receive chunks, the gathered K/V
(allgather), the full-sequence head slices (ulysses), one score tile of workspace, and in
the backward the gradient accumulators and the dK/dV chunks in flight.
"""

from __future__ import annotations

import functools

import sympy as sp

from .symbols import ACC, B, D, Hkv, Hq, N, Ni, S, c, e, k, r


def _shards(tokens: sp.Expr, q_heads: sp.Expr, kv_heads: sp.Expr, prefix: str) -> dict[str, sp.Expr]:
    return {
        f"{prefix}q": B * q_heads * tokens * D * e,
        f"{prefix}k,v": 2 * B * kv_heads * tokens * D * e,
        f"{prefix}out": B * q_heads * tokens * D * e,
        f"{prefix}out accumulator (fp32)": B * q_heads * tokens * D * ACC,
        f"{prefix}lse (fp32)": B * q_heads * tokens * ACC,
    }


def _grads(tokens: sp.Expr, q_heads: sp.Expr, kv_heads: sp.Expr, prefix: str) -> dict[str, sp.Expr]:
    return {
        f"{prefix}dout": B * q_heads * tokens * D * e,
        f"{prefix}dq accumulator (fp32)": B * q_heads * tokens * D * ACC,
        f"{prefix}dk,dv accumulators (fp32)": 2 * B * kv_heads * tokens * D * ACC,
    }


@functools.cache
def memory_terms(name: str, causal: bool, backward: bool) -> dict[str, sp.Expr]:
    """Named per-rank memory terms (bytes) of strategy ``name``; their sum is the peak."""
    x = S / N
    tile = {"score tile workspace (fp32)": 3 * B * Hq * k**2 * ACC}
    if name == "local":
        terms = _shards(S, Hq, Hkv, "")
        if backward:
            terms |= _grads(S, Hq, Hkv, "")
        return terms | tile
    terms = _shards(x, Hq, Hkv, "local ")
    if backward:
        terms |= _grads(x, Hq, Hkv, "local ")
    if name in ("ring", "zigzag"):
        terms["K/V receive buffers (2 chunks)"] = 2 * 2 * B * Hkv * c * D * e
        if backward:
            terms["dK/dV chunks in flight (fp32, 2)"] = 2 * 2 * B * Hkv * c * D * ACC
    elif name == "allgather":
        terms["gathered K/V"] = 2 * B * Hkv * S * D * e
        if backward:
            terms["gathered dK/dV (fp32)"] = 2 * B * Hkv * S * D * ACC
    elif name == "hybrid" or name.startswith("hybrid-"):   # node chunk for H/N_i heads, then the ring
        node, hq, hkv = S * Ni / N, Hq / Ni, r * Hkv / Ni
        terms |= _shards(node, hq, hkv, "node-chunk heads: ")
        terms["K/V receive buffers (2 chunks)"] = 2 * 2 * B * hkv * c * D * e
        if backward:
            terms |= _grads(node, hq, hkv, "node-chunk heads: ")
            terms["dK/dV chunks in flight (fp32, 2)"] = 2 * 2 * B * hkv * c * D * ACC
    elif name == "ulysses":
        terms |= _shards(S, Hq / N, Hkv / N, "full-sequence heads: ")
        if backward:
            terms |= _grads(S, Hq / N, Hkv / N, "full-sequence heads: ")
    else:
        raise ValueError(f"unknown strategy {name!r}")
    return terms | tile


def memory_total(name: str, causal: bool, backward: bool) -> sp.Expr:
    return sp.Add(*memory_terms(name, causal, backward).values())
