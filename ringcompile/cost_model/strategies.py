"""Time expressions per strategy: compute, transfer, overlap, exposed communication (bubble).

A strategy's step time is ``Max(compute, transfer)`` when the next transfer overlaps the
current block (ring, zigzag) and ``compute + transfer`` when it cannot (allgather,
ulysses). Expressions describe the slowest rank, since a ring step finishes only when the
slowest rank has its next block. Causality and forward/backward change the *structure*
(which steps are half-empty, which extra transfers exist), so they select an expression;
everything numeric stays a symbol (see ``symbols``).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import sympy as sp

from .symbols import (
    ACC,
    B,
    D,
    F,
    Hkv,
    Hq,
    M,
    N,
    Ni,
    P,
    Ph,
    S,
    W,
    Wa,
    Wi,
    alpha,
    alpha_i,
    c,
    d,
    e,
    f,
    h,
    k,
    kb,
    o,
    r,
    tc,
)

STRATEGIES = ("ring", "zigzag", "allgather", "ulysses", "local")
HYBRID = "hybrid"   # one model; the planner names each split "hybrid-<outer>x<inner>"
# the same split on contiguous shards under a causal mask (the runtime's "auto" on contiguous shards):
# its outer ring runs contiguous node chunks, so the last node does the most work
HYBRID_CONTIGUOUS = "hybrid-contiguous"
CONTIGUOUS_SUFFIX = "-contiguous"
LAYOUT = {"ring": "contiguous", "zigzag": "zigzag", "allgather": "contiguous", "ulysses": "contiguous",
          "local": "contiguous", HYBRID: "contiguous", HYBRID_CONTIGUOUS: "contiguous"}
OVERLAPPED = {"ring": True, "zigzag": True, "allgather": False, "ulysses": False, "local": False,
              HYBRID: True, HYBRID_CONTIGUOUS: True}


def hybrid_name(outer: int, inner: int, contiguous: bool = False) -> str:
    """"hybrid-<outer>x<inner>" (zigzag over nodes when causal, what the planner lays out), or with
    ``contiguous`` "hybrid-<outer>x<inner>-contiguous": contiguous node chunks even when causal."""
    return f"{HYBRID}-{outer}x{inner}" + (CONTIGUOUS_SUFFIX if contiguous else "")


def hybrid_split(name: str) -> tuple[int, int] | None:
    """(outer, inner) of a split name "hybrid-<outer>x<inner>[-contiguous]"; None for every other name."""
    if not name.startswith(HYBRID + "-"):
        return None
    try:
        outer, inner = (int(x) for x in name[len(HYBRID) + 1:].removesuffix(CONTIGUOUS_SUFFIX).split("x"))
    except ValueError:
        return None
    return outer, inner


def base_name(name: str) -> str:
    """The model a strategy name uses: "hybrid" for every split ("hybrid-contiguous" for a split on
    contiguous shards), else the name itself."""
    if hybrid_split(name) is None:
        return name
    return HYBRID_CONTIGUOUS if name.endswith(CONTIGUOUS_SUFFIX) else HYBRID


def layout_of(name: str, causal: bool) -> str:
    """The layout a strategy runs on: hybrid splits take zigzag shards when causal (balanced nodes),
    unless named for contiguous shards."""
    base = base_name(name)
    if base == HYBRID:
        return "zigzag" if causal else "contiguous"
    return LAYOUT[base]


def kv_replication(kv_heads: int, inner: int) -> int:
    """Copies of each kv head the inner all-to-all needs (as ``runtime.strategies.hybrid``)."""
    return inner // math.gcd(kv_heads, inner)


def pair_flops(x: sp.Expr, y: sp.Expr, heads: sp.Expr) -> sp.Expr:
    """FLOPs of one forward block pair (x queries, y keys): Q K^T and P V, 2 FLOPs per MAC."""
    return 4 * B * heads * x * y * D


def kv_bytes(tokens: sp.Expr, elem: sp.Expr = e) -> sp.Expr:
    """Bytes of K and V for ``tokens`` tokens (GQA: only the KV heads travel)."""
    return 2 * B * Hkv * tokens * D * elem


def pair_compute(x: sp.Expr, y: sp.Expr, heads: sp.Expr, frac: sp.Expr = 1) -> sp.Expr:
    """Seconds for one forward block pair: matmuls at F, score-tile traffic at M, per-tile overhead.

    Tiles are k x k squares of one (batch, head) score matrix, as kernels launch them (a Triton
    program per query tile and head). ``frac`` is the structural fraction computed (causal
    halves); ``d`` the density of any other block-sparse mask (sliding window...), whose empty
    block pairs the kernels skip."""
    scores = B * heads * x * y
    return frac * d * (pair_flops(x, y, heads) / F + 4 * P * scores / M + o * scores / k**2)


def transfer(nbytes: sp.Expr, messages: sp.Expr, bandwidth: sp.Expr = W) -> sp.Expr:
    """Seconds to move ``nbytes`` in ``messages`` messages over one link."""
    return messages * alpha + nbytes / bandwidth


@dataclasses.dataclass(frozen=True)
class StrategyModel:
    """The expressions for one strategy and one (causal, backward) structure.

    time:       predicted wall time of the call on the slowest rank.
    compute:    seconds that rank spends computing (no waiting).
    comm:       seconds of transfer if nothing overlapped.
    step_compute, step_comm: one ring step (ring/zigzag) or the whole phase (others).
    threshold:  closed form of the smallest block c (tokens, square blocks as in the Ring
                Attention paper) whose compute hides its transfer; None when nothing overlaps.
    work:       compute summed over all ranks (what the ranks' CPU seconds measure).
    shared:     the call's time when the N ranks share P_h cores of one host and the OS shares
                the cores fairly among the ranks still working (``shared_makespan``); equal to
                the busiest rank's compute when every rank has its own device.
    """

    name: str
    layout: str
    time: sp.Expr
    compute: sp.Expr
    comm: sp.Expr
    step_compute: sp.Expr
    step_comm: sp.Expr
    threshold: sp.Expr | None
    notes: str
    work: sp.Expr | None = None
    shared: sp.Expr | None = None

    @property
    def exposed(self) -> sp.Expr:
        return self.time - self.compute


def _staircase() -> sp.Expr:
    """Sum over j = 1..N-1 of Max(1, j / P_h), in closed form (P_h may be fractional)."""
    m = sp.Min(N - 1, sp.floor(Ph))
    return m + (N * (N - 1) / 2 - m * (m + 1) / 2) / Ph


def shared_makespan(base: sp.Expr, increment: sp.Expr | int = 0) -> sp.Expr:
    """Time for N ranks whose loads are ``base + r * increment`` (r = 0..N-1) sharing P_h cores.

    Processor sharing (what the OS scheduler does with one thread per rank): while j ranks
    still work, each takes Max(1, j / P_h) times its solo time; ranks finish in load order,
    so the phase between the (r-1)-th and the r-th finishing costs
    ``increment * Max(1, (N - r) / P_h)``. With P_h >= N it is the largest load; with equal
    loads it is ``base * N / P_h``. This is why the contiguous causal ring (loads grow with r)
    loses to zigzag (equal loads) on a shared host too, though by less than on N devices.
    """
    return base * sp.Max(1, N / Ph) + increment * _staircase()


def overlap_condition(frac: sp.Expr) -> tuple[sp.Expr, sp.Expr]:
    """(compute, transfer) of one ring step in the paper's setting: a c-token Q block meets a c-token
    K/V block while the next c-token K/V block moves (bandwidth terms; latency is reported apart)."""
    return pair_compute(c, c, Hq, frac), kv_bytes(c) / W


def _overlap_polynomial(frac: sp.Expr, latency: bool) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """Coefficients (a, b, d) of compute - transfer = a c^2 + b c + d for one ring step."""
    comp, comm = overlap_condition(frac)
    poly = sp.Poly(sp.expand(comp - comm - (alpha if latency else 0)), c)
    coeffs = dict(zip((m[0] for m in poly.monoms()), poly.coeffs(), strict=True))
    if set(coeffs) - {0, 1, 2}:
        raise AssertionError(f"overlap condition is not quadratic in c: {poly}")  # expressions changed shape
    return coeffs.get(2, sp.Integer(0)), coeffs.get(1, sp.Integer(0)), coeffs.get(0, sp.Integer(0))


@functools.cache
def ring_threshold(frac: sp.Expr) -> sp.Expr:
    """Solve per-step compute >= per-step transfer for c: the ring overlap threshold.

    Compute grows as c^2 and transfer as c, so the condition holds from the positive root of
    a c^2 + b c = 0 on: c* = -b / a.
    """
    a, b, _ = _overlap_polynomial(frac, latency=False)
    return sp.factor(-b / a)


@functools.cache
def ring_threshold_with_latency(frac: sp.Expr) -> sp.Expr:
    """Same condition with one message latency per step: positive root of a c^2 + b c + d = 0."""
    a, b, d = _overlap_polynomial(frac, latency=True)
    return (-b + sp.sqrt(b**2 - 4 * a * d)) / (2 * a)


def diagonal_fraction(x: sp.Expr) -> sp.Expr:
    """Share of a causal diagonal x-by-x block pair that a kernel computes when it skips masked work
    in t_c-token tiles: the lower triangle x^2/2 plus the diagonal band of tiles, x t_c / 2."""
    return sp.Min(1, sp.Rational(1, 2) + tc / (2 * x))


def _ring_steps(first: sp.Expr, step: sp.Expr, comm: sp.Expr) -> sp.Expr:
    """N ring steps: step 0 computes ``first`` while the first transfer runs, steps 1..N-2 compute
    ``step`` while the next one runs, the last step only computes."""
    return sp.Max(first, comm) + (N - 2) * sp.Max(step, comm) + step


@dataclasses.dataclass(frozen=True)
class Loads:
    """Per-rank compute of one pass: rank r (in load order) does ``base + r * increment``."""

    base: sp.Expr
    increment: sp.Expr | int = 0

    def scaled(self, factor: sp.Expr, overhead: sp.Expr) -> Loads:
        return Loads(factor * self.base + overhead, factor * self.increment)

    def plus(self, other: Loads) -> Loads:
        return Loads(self.base + other.base, self.increment + other.increment)

    @property
    def work(self) -> sp.Expr:
        return N * self.base + self.increment * N * (N - 1) / 2


def _ring_like(name: str, causal: bool, backward: bool) -> StrategyModel:
    x = S / N                               # local tokens per rank
    zig = name == "zigzag"
    frac = sp.Rational(1, 2) if (zig and causal) else sp.Integer(1)
    pair = pair_compute(x, x, Hq, f)        # f = 1 here; the zigzag half is applied below
    msgs = 2 * x / c                        # K and V travel as separate messages
    # step 0 is each rank's own (diagonal) block; contiguous causal: the last rank computes every
    # later step in full; zigzag causal: every later step is exactly half a block pair
    first = pair * diagonal_fraction(x) if causal else pair
    later = pair * frac
    fwd_comm = transfer(kv_bytes(x), msgs)
    # every step costs h of host work (Python, buffers, merges), skipped or not
    time = _ring_steps(first + h, later + h, fwd_comm)
    compute = first + (N - 1) * later + N * h
    if causal and not zig:
        kernel = Loads(first, pair)         # rank r: its diagonal plus r full blocks
    else:
        kernel = Loads(first + (N - 1) * later)   # balanced: every rank does the same
    loads = kernel.scaled(1, N * h)
    comm = (N - 1) * fwd_comm
    step_compute, step_comm = later, fwd_comm
    if backward:
        # K,V travel forward while the dK,dV accumulators (fp32) travel with them
        bwd_comm = transfer(kv_bytes(x) + kv_bytes(x, ACC), 2 * msgs)
        last_hop = transfer(kv_bytes(x, ACC), msgs)   # dK,dV return to their owner
        time += _ring_steps(kb * first + h, kb * later + h, bwd_comm) + last_hop
        compute += kb * (first + (N - 1) * later) + N * h
        loads = loads.plus(kernel.scaled(kb, N * h))
        comm += (N - 1) * bwd_comm + last_hop
    subs = {f: 1}
    notes = ("K/V shards circulate; step = Max(compute, transfer)"
             + ("; zigzag layout: every step is half the causal work" if zig and causal else "")
             + ("; contiguous causal: the last rank does all the work" if causal and not zig else ""))
    return StrategyModel(name, LAYOUT[name], time.subs(subs), compute.subs(subs), comm.subs(subs),
                         step_compute.subs(subs), step_comm.subs(subs), ring_threshold(frac), notes,
                         loads.work.subs(subs), shared_makespan(loads.base, loads.increment).subs(subs))


def _allgather(causal: bool, backward: bool) -> StrategyModel:
    """K and V all-gathered once; the own (diagonal) block is computed while the gather is in flight."""
    x = S / N
    pair = pair_compute(x, x, Hq, 1)
    own = pair * diagonal_fraction(x) if causal else pair   # the last rank's own block: the diagonal
    rest = (N - 1) * pair                   # ... and every earlier block is fully kept
    gather = transfer((N - 1) / N * kv_bytes(S), 2 * (N - 1))   # K and V, ring all-gather
    time, compute, comm = sp.Max(own, gather) + rest + N * h, own + rest + N * h, gather
    kernel = Loads(own, pair) if causal else Loads(own + rest)
    loads = kernel.scaled(1, N * h)
    if backward:
        to_owners = transfer((N - 1) / N * kv_bytes(S, ACC), 2 * (N - 1), Wa)   # dK, dV all-to-all (fp32)
        time += sp.Max(kb * own, gather) + kb * rest + to_owners + N * h          # K/V gathered again
        compute += kb * (own + rest) + N * h
        loads = loads.plus(kernel.scaled(kb, N * h))
        comm += gather + to_owners
    return StrategyModel("allgather", "contiguous", time, compute, comm, pair, gather, None,
                         "all of K/V gathered once (overlapping the own block), then local attention",
                         loads.work, shared_makespan(loads.base, loads.increment))


def _ulysses(causal: bool, backward: bool) -> StrategyModel:
    x = S / N
    frac = diagonal_fraction(S) if causal else sp.Integer(1)
    share = (N - 1) / N

    def a2a(nbytes: sp.Expr, calls: int) -> sp.Expr:
        return calls * (N - 1) * alpha + share * nbytes / Wa

    # q, k, v in; the fp32 output accumulator with its lse packed alongside goes back
    fwd_a2a = a2a(B * (Hq + 2 * Hkv) * x * D * e, 3) + a2a(B * Hq * x * (D + 1) * ACC, 1)
    comp = pair_compute(S, S, Hq / N, f)
    time, compute, comm = fwd_a2a + comp + N * h, comp + N * h, fwd_a2a
    if backward:
        bwd_a2a = (a2a(B * (3 * Hq + 2 * Hkv) * x * D * e + B * Hq * x * ACC, 6)   # dout,q,k,v,out,lse
                   + a2a(B * (Hq + 2 * Hkv) * x * D * ACC, 3))                    # fp32 dq,dk,dv back
        time += bwd_a2a + kb * comp + N * h
        compute += kb * comp + N * h
        comm += bwd_a2a
    subs = {f: frac}
    return StrategyModel("ulysses", "contiguous", time.subs(subs), compute.subs(subs), comm.subs(subs),
                         comp.subs(subs), fwd_a2a, None, "all-to-all over heads: full sequence, H/N heads",
                         (N * compute).subs(subs), shared_makespan(compute).subs(subs))


def _hybrid(causal: bool, backward: bool, zigzag: bool = True) -> StrategyModel:
    """Ulysses over the N_i ranks of a node, then the ring (zigzag when causal) over the N / N_i nodes.

    The ring is ``_ring_like`` with N -> N / N_i ranks, each holding the node's S N_i / N tokens for
    H_q / N_i query and r H_kv / N_i kv heads (r: GQA replication); its links are the ring's (W,
    alpha: between nodes). The all-to-alls run inside a node (W_i, alpha_i) and do not overlap.
    ``zigzag=False``: contiguous shards, so a causal ring over nodes is the contiguous ring's
    (the last node computes every later step in full)."""
    zig = causal and zigzag
    ring_model = _ring_like("zigzag" if zig else "ring", causal, backward)
    x = S / N
    kv = r * Hkv
    sub = {N: N / Ni, Hq: Hq / Ni, Hkv: kv / Ni}

    def on_nodes(expr: sp.Expr) -> sp.Expr:
        return expr.subs(sub, simultaneous=True)

    def a2a(nbytes: sp.Expr, calls: int) -> sp.Expr:
        return calls * (Ni - 1) * alpha_i + (Ni - 1) / Ni * nbytes / Wi

    inner = a2a(B * (Hq + 2 * kv) * x * D * e, 3) + a2a(B * Hq * x * (D + 1) * ACC, 1)
    if backward:
        inner += (a2a(B * (3 * Hq + 2 * kv) * x * D * e + B * Hq * x * ACC, 6)
                  + a2a(B * (Hq + 2 * kv) * x * D * ACC, 3))
    frac = sp.Rational(1, 2) if zig else sp.Integer(1)
    notes = ("all-to-all over heads inside a node (H/N_i heads, the node's sequence), then the ring over "
             "N/N_i nodes" + ("; zigzag over nodes: every step is half the causal work" if zig else "")
             + ("; contiguous node chunks, causal: the last node does all the work" if causal and not zig
                else "")
             + "; kv heads replicated r_kv times when H_kv < N_i")
    return StrategyModel(HYBRID if zigzag else HYBRID_CONTIGUOUS, "zigzag" if zig else "contiguous",
                         on_nodes(ring_model.time) + inner,
                         on_nodes(ring_model.compute), on_nodes(ring_model.comm) + inner,
                         on_nodes(ring_model.step_compute), on_nodes(ring_model.step_comm),
                         on_nodes(ring_threshold(frac)), notes, Ni * on_nodes(ring_model.work),
                         on_nodes(ring_model.shared))


def _local(causal: bool, backward: bool) -> StrategyModel:
    frac = diagonal_fraction(S) if causal else sp.Integer(1)
    comp = pair_compute(S, S, Hq, f)
    time = (comp * (1 + kb) + 2 * h) if backward else comp + h
    zero = sp.Integer(0)
    time = time.subs(f, frac)
    return StrategyModel("local", "contiguous", time, time, zero, comp.subs(f, frac), zero, None,
                         "one device computes the whole sequence", time, time)


def _per_device(name: str, causal: bool, backward: bool) -> StrategyModel:
    if name in ("ring", "zigzag"):
        return _ring_like(name, causal, backward)
    if name == "allgather":
        return _allgather(causal, backward)
    if name == "ulysses":
        return _ulysses(causal, backward)
    if name == "local":
        return _local(causal, backward)
    if name == HYBRID:
        return _hybrid(causal, backward)
    if name == HYBRID_CONTIGUOUS:
        return _hybrid(causal, backward, zigzag=False)
    raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")


@functools.cache
def strategy_model(name: str, causal: bool, backward: bool) -> StrategyModel:
    """The (cached) expressions of strategy ``name``.

    The slowest rank's schedule assumes one device per rank. Ranks sharing P_h cores of one
    host (CPU ranks) also cannot finish before the OS has run all their work on P_h cores
    (``shared_makespan``; P_h = N for one device per rank, where it never binds). A rank that
    finishes early gives its core to the others, which is why unbalanced schedules (the
    contiguous causal ring) lose less on a shared host than on dedicated devices.
    """
    model = _per_device(base_name(name), causal, backward)
    return dataclasses.replace(model, time=sp.Max(model.time, model.shared),
                               compute=sp.Max(model.compute, model.shared))


def feasible(name: str, *, world_size: int, heads: int, kv_heads: int) -> str | None:
    """None when ``name`` can run this workload, else the reason it cannot."""
    split = hybrid_split(name)
    if split is not None:
        outer, inner = split
        if outer * inner != world_size or outer < 2 or inner < 2:
            return f"{name} needs outer x inner = the world size ({world_size}), both >= 2"
        if heads % inner:
            return f"{name} splits query heads ({heads}) over {inner} ranks a node: not divisible"
        return None
    if name == "ulysses" and (heads % world_size or kv_heads % world_size):
        return (f"ulysses needs heads ({heads}) and kv_heads ({kv_heads}) divisible by the world size "
                f"({world_size})")
    if name != "local" and world_size < 2:
        return "a single rank has nothing to distribute: use local"
    return None
