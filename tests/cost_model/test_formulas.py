"""The cost model's formulas against values derived by hand."""

from __future__ import annotations

import pytest
import sympy as sp
from hypothesis import given
from hypothesis import strategies as st

from ringcompile.cost_model import symbols as sym
from ringcompile.cost_model.evaluate import ARGS, strategy_functions
from ringcompile.cost_model.memory import memory_terms, memory_total
from ringcompile.cost_model.strategies import (
    kv_bytes,
    overlap_condition,
    pair_compute,
    pair_flops,
    ring_threshold,
    strategy_model,
)


def num(expr: sp.Expr, values: dict) -> float:
    """Evaluate with numbers (xreplace: much faster than subs on Max/Min expressions)."""
    return float(expr.xreplace({k: sp.Float(v) for k, v in values.items()}))


HW = {sym.d: 1, sym.F: 1e12, sym.M: 1e11, sym.W: 1e10, sym.Wa: 1e10, sym.alpha: 1e-5, sym.P: 0, sym.o: 0,
      sym.k: 128, sym.kb: 2.5, sym.tc: 128, sym.Ph: 4, sym.h: 0}   # P_h = N: one device per rank


def test_block_pair_flops_and_bytes():
    # B=2, H=3 query heads, 5 queries x 7 keys, D=11: Q K^T and P V are 2*5*7*11 FLOPs per head each
    assert pair_flops(5, 7, 3).subs({sym.B: 2, sym.D: 11}) == 2 * 3 * 2 * (2 * 5 * 7 * 11)
    # K and V for 13 tokens, 4 KV heads, D=16, bf16 (2 bytes), batch 2: 2 tensors * 2*4*13*16 * 2 bytes
    assert kv_bytes(13).subs({sym.B: 2, sym.Hkv: 4, sym.D: 16, sym.e: 2}) == 2 * (2 * 4 * 13 * 16) * 2


def test_pair_compute_terms():
    vals = {sym.B: 1, sym.D: 64, sym.F: 1e12, sym.M: 1e11, sym.P: 3, sym.o: 1e-4, sym.k: 256, sym.d: 1}
    t = num(pair_compute(512, 256, 2), vals)
    flops = 4 * 2 * 512 * 256 * 64
    score_bytes = 4 * 3 * 2 * 512 * 256         # 3 fp32 passes over a 2 x 512 x 256 score tile
    tiles = 2 * (512 / 256) * (256 / 256)       # 256-token squares of each of the 2 heads' score matrices
    assert abs(t - (flops / 1e12 + score_bytes / 1e11 + tiles * 1e-4)) < 1e-15


def test_overlap_threshold_closed_form():
    # with no score traffic and no tile overhead, compute 4 B Hq c^2 D f / F = transfer 2 B Hkv c D e / W
    # gives c = F e Hkv / (2 W Hq f): the paper's c >= F/B for bf16 (e=2) and MHA
    c_star = ring_threshold(sp.Integer(1)).subs({sym.P: 0, sym.o: 0, sym.d: 1})
    assert sp.simplify(c_star - sym.F * sym.e * sym.Hkv / (2 * sym.W * sym.Hq)) == 0
    # a block-sparse mask of density d does d times the work per step: the block must grow by 1/d
    sparse = ring_threshold(sp.Integer(1)).subs({sym.P: 0, sym.o: 0})
    assert sp.simplify(sparse - c_star / sym.d) == 0
    half = ring_threshold(sp.Rational(1, 2)).subs({sym.P: 0, sym.o: 0, sym.d: 1})
    assert sp.simplify(half - 2 * c_star) == 0


@pytest.mark.parametrize("link", [1e10, 1e8])     # compute-bound, then transfer-bound
def test_ring_time_hand_computed(link):
    """Ring, full mask, forward, N=4: T = comp + 3 * max(comp, comm)."""
    vals = dict(HW) | {sym.S: 8192, sym.N: 4, sym.B: 1, sym.Hq: 8, sym.Hkv: 8, sym.D: 128, sym.e: 2,
                       sym.c: 1024, sym.f: 1, sym.W: link}
    x = 8192 / 4
    comp = 4 * 8 * x * x * 128 / 1e12
    comm = 2 * (x / 1024) * 1e-5 + 2 * 8 * x * 128 * 2 / link    # K and V in 2 chunks each
    model = strategy_model("ring", False, False)
    assert num(model.time, vals) == pytest.approx(comp + 3 * max(comp, comm), rel=1e-12)
    assert num(model.compute, vals) == pytest.approx(4 * comp, rel=1e-12)
    assert (comm > comp) == (link < 1e9)


@pytest.mark.parametrize("link", [1e10, 1e8])
def test_zigzag_causal_halves_each_step(link):
    vals = dict(HW) | {sym.S: 8192, sym.N: 4, sym.B: 1, sym.Hq: 8, sym.Hkv: 8, sym.D: 128, sym.e: 2,
                       sym.c: 2048, sym.W: link}
    full = num(pair_compute(2048, 2048, 8), vals)
    diag = full * (0.5 + 128 / (2 * 2048))   # the own block: lower triangle plus the 128-token tile band
    comm = 2 * 1e-5 + 2 * 8 * 2048 * 128 * 2 / link
    zig = strategy_model("zigzag", True, False)
    expected = max(diag, comm) + 2 * max(full / 2, comm) + full / 2
    assert num(zig.time, vals) == pytest.approx(expected, rel=1e-12)
    ring = strategy_model("ring", True, False)   # contiguous: the last rank computes every step
    expected = max(diag, comm) + 2 * max(full, comm) + full
    assert num(ring.time, vals) == pytest.approx(expected, rel=1e-12)


def test_allgather_hand_computed():
    vals = dict(HW) | {sym.S: 8192, sym.N: 4, sym.B: 1, sym.Hq: 8, sym.Hkv: 8, sym.D: 128, sym.e: 2,
                       sym.W: 1e8}
    full = num(pair_compute(2048, 2048, 8), vals)
    gather = 2 * 3 * 1e-5 + 3 / 4 * (2 * 8 * 8192 * 128 * 2) / 1e8
    model = strategy_model("allgather", True, False)
    diag = full * (0.5 + 128 / (2 * 2048))
    assert num(model.time, vals) == pytest.approx(max(diag, gather) + 3 * full, rel=1e-12)


def test_memory_terms_hand_computed():
    vals = {sym.S: 4096, sym.N: 4, sym.B: 2, sym.Hq: 8, sym.Hkv: 2, sym.D: 64, sym.e: 2, sym.c: 512,
            sym.k: 128}
    x = 1024
    ring = {k: int(v.subs(vals)) for k, v in memory_terms("ring", False, False).items()}
    assert ring["local q"] == 2 * 8 * x * 64 * 2
    assert ring["local k,v"] == 2 * 2 * 2 * x * 64 * 2
    assert ring["local lse (fp32)"] == 2 * 8 * x * 4
    assert ring["K/V receive buffers (2 chunks)"] == 2 * 2 * 2 * 2 * 512 * 64 * 2
    ag = {k: int(v.subs(vals)) for k, v in memory_terms("allgather", False, True).items()}
    assert ag["gathered K/V"] == 2 * 2 * 2 * 4096 * 64 * 2
    assert ag["gathered dK/dV (fp32)"] == 2 * 2 * 2 * 4096 * 64 * 4
    assert ag["local dk,dv accumulators (fp32)"] == 2 * 2 * 2 * x * 64 * 4
    uly_vals = vals | {sym.Hkv: 4}   # ulysses needs the KV heads divisible by N too
    uly = {k: int(v.subs(uly_vals)) for k, v in memory_terms("ulysses", False, False).items()}
    assert uly["full-sequence heads: q"] == 2 * 2 * 4096 * 64 * 2      # H/N = 2 query heads, all tokens
    assert uly["full-sequence heads: k,v"] == 2 * 2 * 1 * 4096 * 64 * 2
    local = int(memory_total("local", False, False).subs(vals))
    assert local > int(memory_total("ring", False, False).subs(vals))


def test_threshold_agrees_with_sympy_solve():
    comp, comm = overlap_condition(sp.Integer(1))
    roots = [r for r in sp.solve(sp.Eq(comp, comm), sym.c) if r != 0]
    assert len(roots) == 1 and sp.simplify(roots[0] - ring_threshold(sp.Integer(1))) == 0


@given(st.sampled_from(["ring", "zigzag", "allgather", "ulysses", "local"]), st.booleans(), st.booleans(),
       st.integers(10, 20), st.sampled_from([2, 4, 8]))
def test_time_is_at_least_compute_and_grows_with_s(name, causal, backward, log_s, n):
    fns = strategy_functions(name, causal, backward)
    base = dict(HW) | {sym.N: n, sym.Ph: n, sym.B: 1, sym.Hq: 8, sym.Hkv: 8, sym.D: 64, sym.e: 2, sym.f: 1}

    def args(s):
        return [float((base | {sym.S: s, sym.c: s / n})[a]) for a in ARGS]

    t_small, t_big = fns.time(*args(2**log_s)), fns.time(*args(2**(log_s + 1)))
    compute = fns.compute(*args(2**log_s))
    assert t_small >= compute * (1 - 1e-12)
    assert t_big > t_small
    assert 0 <= 1 - compute / t_small < 1


def test_lambdified_matches_expression():
    model = strategy_model("zigzag", True, True)
    vals = dict(HW) | {sym.S: 12288, sym.N: 4, sym.B: 2, sym.Hq: 8, sym.Hkv: 2, sym.D: 64, sym.e: 2,
                       sym.c: 1024, sym.f: 1}
    fns = strategy_functions("zigzag", True, True)
    assert fns.time(*[float(vals[a]) for a in ARGS]) == pytest.approx(num(model.time, vals))


def test_ulysses_hand_computed():
    """q,k,v all-to-all in (3 calls), full-sequence attention on H/N heads, fp32 out+lse back (1 call)."""
    vals = dict(HW) | {sym.S: 8192, sym.N: 4, sym.B: 1, sym.Hq: 8, sym.Hkv: 4, sym.D: 64, sym.e: 2,
                       sym.Wa: 5e9}
    x = 2048
    qkv_in = 3 * 3 * 1e-5 + 3 / 4 * (8 + 2 * 4) * x * 64 * 2 / 5e9
    out_back = 1 * 3 * 1e-5 + 3 / 4 * 8 * x * 65 * 4 / 5e9
    comp = 4 * 2 * 8192 * 8192 * 64 / 1e12      # 8 / 4 = 2 heads per rank, every query and key
    model = strategy_model("ulysses", False, False)
    assert num(model.time, vals) == pytest.approx(qkv_in + comp + out_back, rel=1e-12)


def processor_sharing(loads: list[float], cores: float) -> float:
    """Event simulation of fair sharing: while j jobs remain, each progresses at min(1, cores / j)."""
    remaining, t = sorted(loads), 0.0
    while remaining:
        rate = min(1.0, cores / len(remaining))
        step = remaining[0]
        t += step / rate
        remaining = [r - step for r in remaining[1:]]
    return t


@given(n=st.integers(1, 9), cores=st.sampled_from([1.0, 1.16, 1.95, 2.0, 3.0, 4.0, 16.0]),
       base=st.floats(0.01, 10), inc=st.floats(0.0, 10))
def test_shared_makespan_matches_a_simulation(n, cores, base, inc):
    from ringcompile.cost_model.strategies import shared_makespan

    expr = shared_makespan(sym.S, sym.D)   # stand-in symbols for base and increment
    got = num(expr, {sym.S: base, sym.D: inc, sym.N: n, sym.Ph: cores})
    assert got == pytest.approx(processor_sharing([base + r * inc for r in range(n)], cores), rel=1e-9)


def test_shared_host_bound():
    """4 CPU ranks on 2 cores share them fairly: zigzag's equal loads take total work / 2; the
    unbalanced contiguous causal ring (loads diag + r blocks) takes longer, but less longer than
    on 4 devices, because ranks that finish early hand their core to the others."""
    vals = dict(HW) | {sym.S: 8192, sym.N: 4, sym.B: 1, sym.Hq: 8, sym.Hkv: 8, sym.D: 128, sym.e: 2,
                       sym.c: 2048, sym.Ph: 2}
    full = num(pair_compute(2048, 2048, 8), vals)
    diag = full * (0.5 + 128 / (2 * 2048))
    ring = num(strategy_model("ring", True, False).time, vals)
    assert ring == pytest.approx(processor_sharing([diag + r * full for r in range(4)], 2), rel=1e-12)
    assert ring > (4 * diag + 6 * full) / 2                                    # more than work / cores
    zig = num(strategy_model("zigzag", True, False).time, vals)
    assert zig == pytest.approx(4 * (diag + 3 * full / 2) / 2, rel=1e-12)
    dedicated = num(strategy_model("ring", True, False).time, vals | {sym.Ph: 4})
    assert dedicated == pytest.approx(diag + 3 * full, rel=1e-12)
    assert ring / zig < dedicated / num(strategy_model("zigzag", True, False).time, vals | {sym.Ph: 4})


def test_step_overhead_is_charged_per_step_and_shared():
    """h seconds of host work per ring step per rank: N steps per pass, 2N with the backward."""
    vals = dict(HW) | {sym.S: 4096, sym.N: 4, sym.B: 1, sym.Hq: 4, sym.Hkv: 4, sym.D: 64, sym.e: 4,
                       sym.c: 1024, sym.Ph: 4}
    for backward, steps in ((False, 4), (True, 8)):
        model = strategy_model("zigzag", True, backward)
        base = num(model.compute, vals)
        assert num(model.compute, vals | {sym.h: 1e-3}) == pytest.approx(base + steps * 1e-3, rel=1e-9)
        assert num(model.work, vals | {sym.h: 1e-3}) == pytest.approx(4 * (base + steps * 1e-3), rel=1e-9)
