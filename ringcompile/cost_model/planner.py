"""The planner: per workload, rank the strategies by predicted time and say why.

``plan``/``plans`` serve people (every strategy, explanations, the local baseline);
``choose_for_call`` serves the runtime at every call of a strategy-"auto" attention: it
caches the lambdified model per static shape, so a new sequence length is a few function
calls, and it only offers strategies that run on sequence shards.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from typing import Any

import sympy as sp

from ringcompile.errors import OptionError
from ringcompile.log import get_logger

from . import symbols as sym
from .evaluate import (
    args_of,
    argument_values,
    as_args,
    hardware_values,
    latency_block,
    strategy_functions,
    threshold_functions,
)
from .profiles import Profile, dtype_name, load_profile
from .strategies import (
    HYBRID,
    OVERLAPPED,
    STRATEGIES,
    base_name,
    feasible,
    hybrid_name,
    hybrid_split,
    kv_replication,
    layout_of,
    ring_threshold,
    strategy_model,
)
from .tiles import choose_tiles

log = get_logger(__name__)

DISTRIBUTED = ("ring", "zigzag", "allgather", "ulysses")


@dataclasses.dataclass(frozen=True)
class Workload:
    """The static facts a plan depends on (``seq_len`` is the only one that varies per call)."""

    seq_len: int
    world_size: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    dtype: str = "bfloat16"
    causal: bool = False
    backward: bool = False
    mask_density: float = 1.0

    def __post_init__(self) -> None:
        for name in ("seq_len", "world_size", "heads", "kv_heads", "head_dim", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"{name} must be a positive int, got {value!r}")
        if not 0 < self.mask_density <= 1:
            raise OptionError(f"mask_density must be in (0, 1], got {self.mask_density!r}")
        if self.heads % self.kv_heads:
            raise OptionError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-rank peak memory in bytes and the terms it is the sum of."""

    peak: float
    terms: dict[str, float]

    def __float__(self) -> float:
        return float(self.peak)

    def __int__(self) -> int:
        return int(self.peak)

    def describe(self) -> str:
        rows = [f"  {label:<42} {format_bytes(v):>10}" for label, v in self.terms.items()]
        return "\n".join([*rows, f"  {'peak per rank':<42} {format_bytes(self.peak):>10}"])


@dataclasses.dataclass(frozen=True)
class Plan:
    """One strategy's predicted cost for a workload on a profile.

    time:     predicted seconds of the call (forward, or forward+backward) on the slowest rank.
    bubble:   fraction of ``time`` spent waiting on communication (exposed transfer).
    block_size: K/V tokens per ring transfer chunk (whole local shard for non-ring strategies).
    overlap_threshold: smallest ring block (tokens, square blocks as in the Ring Attention
              paper) whose compute hides its transfer, solved from the expressions; for zigzag
              it includes the causal work fraction. ``overlap_threshold_latency`` adds one
              message latency per step for this workload's shape.
    tiles:    Triton tile sizes (BLOCK_M, BLOCK_N, num_warps, num_stages).
    alternatives: (strategy, time or None, reason) for every strategy considered, best first.
    """

    strategy: str
    layout: str
    block_size: int
    tiles: dict[str, int]
    time: float
    bubble: float
    compute: float
    comm: float
    memory: Memory
    overlap_threshold: float
    overlap_threshold_latency: float
    workload: Workload
    profile: str
    values: dict[str, float]
    alternatives: tuple[tuple[str, float | None, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON reports (formulas are left to ``explain``)."""
        return {"strategy": self.strategy, "layout": self.layout, "block_size": self.block_size,
                "tiles": dict(self.tiles), "time_s": self.time, "bubble": self.bubble,
                "compute_s": self.compute, "comm_s": self.comm, "memory_peak_bytes": self.memory.peak,
                "memory_terms": dict(self.memory.terms), "overlap_threshold": self.overlap_threshold,
                "overlap_threshold_latency": self.overlap_threshold_latency, "profile": self.profile,
                "workload": dataclasses.asdict(self.workload),
                "alternatives": [{"strategy": n, "time_s": t, "reason": r} for n, t, r in self.alternatives]}

    @property
    def exposed(self) -> float:
        return self.bubble * self.time

    @property
    def runner_up(self) -> tuple[str, float] | None:
        for name, t, _ in self.alternatives:
            if name != self.strategy and t is not None:
                return name, t
        return None

    def explain(self) -> str:
        """The formulas, the numbers substituted, the choice, and the runner-up with its margin."""
        w = self.workload
        model = strategy_model(self.strategy, w.causal, w.backward)
        frac = _threshold_fraction(self.strategy, w.causal)
        lines = [
            f"plan for S={w.seq_len}, N={w.world_size}, B={w.batch}, H_q={w.heads}, H_kv={w.kv_heads}, "
            f"D={w.head_dim}, {w.dtype}, {'causal' if w.causal else 'full'} mask"
            f"{f' (density {w.mask_density:g})' if w.mask_density < 1 else ''}, "
            f"{'forward+backward' if w.backward else 'forward'}, profile {self.profile}",
            f"chosen: {self.strategy} (layout {self.layout}, K/V chunk {self.block_size} tokens): "
            f"{format_seconds(self.time)}, bubble {self.bubble:.1%}, peak {format_bytes(self.memory.peak)}"
            " per rank",
        ]
        up = self.runner_up
        if up is not None:
            name, t = up
            lines.append(f"runner-up: {name}: {format_seconds(t)} ({_margin(t, self.time)})")
        lines.append(f"model ({model.notes}):")
        lines.append(f"  step compute = {sp.sstr(model.step_compute)}")
        lines.append(f"  step transfer = {sp.sstr(model.step_comm)}")
        lines.append(f"  time = {sp.sstr(model.time)}")
        lines.append(f"ring overlap condition (compute >= transfer per step, c-token blocks, f={frac}):")
        lines.append(f"  c >= {sp.sstr(ring_threshold(frac))} = {self.overlap_threshold:,.0f} tokens "
                     f"(with one message latency: {self.overlap_threshold_latency:,.0f})")
        local_block = w.seq_len / w.world_size
        split = hybrid_split(self.strategy)
        if split is not None:
            outer, inner = split
            local_block = w.seq_len / outer
            rep = kv_replication(w.kv_heads, inner)
            lines.append(f"  hybrid split: {inner} ranks a node (all-to-all over heads), ring over {outer} "
                         f"nodes; node block S/{outer} = {local_block:,.0f} tokens")
            if rep > 1:
                lines.append(f"  GQA: {w.kv_heads} kv heads < {inner} ranks a node: each kv head is "
                             f"replicated {rep}x for the all-to-all")
        if self.strategy in ("ring", "zigzag"):
            hidden = "hides" if local_block >= self.overlap_threshold else "does NOT hide"
            lines.append(f"  local block S/N = {local_block:,.0f} tokens: compute {hidden} the transfer")
        cores, ranks = self.values.get("P_h", w.world_size), w.world_size
        if self.strategy != "local" and cores < ranks:
            lines.append(f"shared host: {ranks} ranks on {cores:g} cores; the OS shares the cores among the "
                         f"ranks still working, so time >= shared makespan = "
                         f"{sp.sstr(model.shared)}")
        lines.append("numbers substituted: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.values.items()
                                                       if k != "f"))   # f is structural, already in
        lines.append("memory per rank:")
        lines.append(self.memory.describe())
        lines.append("all strategies:")
        for name, t, reason in self.alternatives:
            lines.append(f"  {name:<10} " + (format_seconds(t) if t is not None else f"infeasible: {reason}"))
        if self.strategy == "local" and w.world_size > 1:
            lines.append("note: no distributed strategy beats one device here (the links are too slow for "
                         "this size); ring attention cannot win")
        return "\n".join(lines)


def _margin(other: float, best: float) -> str:
    return f"+{(other / best - 1):.1%} slower" if best > 0 else "n/a"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def format_seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.1f} us"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _threshold_fraction(strategy: str, causal: bool) -> sp.Rational:
    return sp.Rational(1, 2) if (base_name(strategy) in ("zigzag", HYBRID) and causal) else sp.Integer(1)


def order_key(name: str) -> tuple:
    """Ties between equal times break by this: the named strategies, then hybrid splits by inner size."""
    split = hybrid_split(name)
    return (len(STRATEGIES), split[1]) if split else (STRATEGIES.index(name), 0)


def hybrid_names(world_size: int) -> tuple[str, ...]:
    """Every two-level split outer x inner of the world, both at least 2, by growing inner size."""
    return tuple(hybrid_name(world_size // i, i) for i in range(2, world_size // 2 + 1)
                 if world_size % i == 0)


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def padded_length(seq_len: int, world_size: int, strategy: str) -> int:
    """The sequence the ranks really process: padded to N chunks (2N for zigzag); local: unpadded."""
    if strategy == "local":
        return seq_len
    chunks = 2 * world_size if strategy == "zigzag" else world_size
    return math.ceil(seq_len / chunks) * chunks


def _local_block(w: Workload, strategy: str) -> int:
    return max(1, padded_length(w.seq_len, w.world_size, strategy) // w.world_size)


class _Evaluator:
    """Everything about one (workload without S, profile, strategy) that does not depend on S."""

    def __init__(self, w: Workload, profile: Profile, strategy: str, block_size: int | None):
        self.strategy = strategy
        self.world_size = w.world_size
        self.split = hybrid_split(strategy)
        self.layout = layout_of(strategy, w.causal)
        self.pad_as = "zigzag" if self.layout == "zigzag" else strategy   # hybrid causal: zigzag shards
        self.fns = strategy_functions(base_name(strategy), w.causal, w.backward)
        self.hw = hardware_values(profile, w.dtype, w.world_size, strategy)
        self.base = argument_values(seq_len=w.seq_len, world_size=w.world_size, batch=w.batch, heads=w.heads,
                                    kv_heads=w.kv_heads, head_dim=w.head_dim, dtype=w.dtype, block=1.0,
                                    hardware=self.hw, density=w.mask_density)
        if self.split is not None:
            self.base[sym.Ni] = float(self.split[1])
            self.base[sym.r] = float(kv_replication(w.kv_heads, self.split[1]))
        self.fixed_block = block_size
        self.kernel_block = profile.kernel_block
        self.chunk = _round_up(latency_block(self.base), profile.kernel_block)
        bw_fn, lat_fn = threshold_functions(_threshold_fraction(strategy, w.causal))
        order = args_of(strategy)
        self.base_args = list(as_args(self.base, order))
        self.i_seq, self.i_block = order.index(sym.S), order.index(sym.c)
        self.arg_names = tuple(str(s) for s in order)
        flat = as_args(self.base)
        self.threshold, self.threshold_latency = float(bw_fn(*flat)), float(lat_fn(*flat))
        self.tiles = choose_tiles(w.head_dim, w.dtype, profile)

    def block(self, w: Workload) -> int:
        local = _local_block(w, self.pad_as)
        if self.split is not None:  # the ring of a hybrid split moves node chunks
            local *= self.split[1]
        if not OVERLAPPED[base_name(self.strategy)]:
            return local
        if self.fixed_block is not None:
            return max(1, min(self.fixed_block, local))
        return max(1, min(local, max(self.chunk, self.kernel_block)))

    def time(self, seq_len: int, block: int, pad: bool = True) -> float:
        """Predicted seconds; ``pad=False`` uses S itself (smooth in S, for crossovers)."""
        args = self.base_args.copy()
        args[self.i_seq] = float(padded_length(seq_len, self.world_size, self.pad_as) if pad else seq_len)
        args[self.i_block] = float(block)
        return float(self.fns.time(*args))

    def plan(self, w: Workload, profile_name: str,
             alternatives: tuple[tuple[str, float | None, str], ...] = ()) -> Plan:
        block = self.block(w)
        args = self.base_args.copy()
        args[self.i_seq] = float(padded_length(w.seq_len, w.world_size, self.pad_as))
        args[self.i_block] = float(block)
        time = float(self.fns.time(*args))
        compute = float(self.fns.compute(*args))
        terms = {label: float(fn(*args)) for label, fn in self.fns.memory.items()}
        return Plan(
            strategy=self.strategy, layout=self.layout, block_size=block, tiles=dict(self.tiles),
            time=time, bubble=max(0.0, (time - compute) / time) if time > 0 else 0.0, compute=compute,
            comm=float(self.fns.comm(*args)), memory=Memory(sum(terms.values()), terms),
            overlap_threshold=self.threshold, overlap_threshold_latency=self.threshold_latency, workload=w,
            profile=profile_name, values=dict(zip(self.arg_names, args, strict=True)),
            alternatives=alternatives,
        )


def _candidates(w: Workload, strategies: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    ok, bad = [], []
    for name in strategies:
        reason = feasible(name, world_size=w.world_size, heads=w.heads, kv_heads=w.kv_heads)
        (bad.append((name, reason)) if reason else ok.append(name))
    return ok, bad


def _rank(w: Workload, prof: Profile, strategies: tuple[str, ...], block_size: int | None) -> list[Plan]:
    ok, bad = _candidates(w, strategies)
    if not ok:
        raise OptionError(f"no strategy among {list(strategies)} can run this workload: "
                          + "; ".join(f"{n}: {r}" for n, r in bad))
    ranked = sorted((_Evaluator(w, prof, name, block_size).plan(w, prof.name) for name in ok),
                    key=lambda p: (p.time, order_key(p.strategy)))
    alternatives = tuple((p.strategy, p.time, "") for p in ranked) + tuple((n, None, r) for n, r in bad)
    return [dataclasses.replace(p, alternatives=alternatives) for p in ranked]


def _workload(seq_len, world_size, heads, kv_heads, head_dim, batch, dtype, causal, backward,
              mask_density: float = 1.0) -> Workload:
    return Workload(seq_len=int(seq_len), world_size=int(world_size), heads=int(heads),
                    kv_heads=int(kv_heads if kv_heads is not None else heads), head_dim=int(head_dim),
                    batch=int(batch), dtype=dtype_name(dtype), causal=bool(causal), backward=bool(backward),
                    mask_density=float(mask_density))


def plans(*, seq_len: int, world_size: int, heads: int, head_dim: int, kv_heads: int | None = None,
          batch: int = 1, dtype: Any = "bfloat16", causal: bool = False, backward: bool = False,
          profile: str | Profile | None = "h100-nvlink", strategy: str | None = None,
          block_size: int | None = None, mask_density: float = 1.0,
          node_size: int | None = None) -> list[Plan]:
    """Every feasible strategy's Plan, best (fastest) first; ``local`` is the one-device baseline.

    ``strategy`` limits the list to that strategy; ``block_size`` fixes the ring chunk (tokens)
    instead of letting the planner choose it; ``mask_density`` is the kept fraction of block
    pairs under a block-sparse mask beyond causality (e.g. a sliding window), 1 for none.
    On a two-level machine (a profile with a node size, or ``node_size``) every hybrid split
    "hybrid-<outer>x<inner>" of the world is ranked too; ``strategy="hybrid"`` ranks only them.
    """
    w = _workload(seq_len, world_size, heads, kv_heads, head_dim, batch, dtype, causal, backward,
                  mask_density)
    prof = two_level_profile(load_profile(profile), node_size)
    return _rank(w, prof, _names(strategy, w, prof), block_size)


def two_level_profile(prof: Profile, node_size: int | None) -> Profile:
    """``prof`` with ``node_size`` ranks a node (a one-level profile's link then serves both levels)."""
    if node_size is None:
        return prof
    if not isinstance(node_size, int) or node_size < 1:
        raise OptionError(f"node_size must be a positive int, got {node_size!r}")
    if prof.two_level:
        return dataclasses.replace(prof, node_size=node_size)
    bw, lat, eff = prof.link("intra")
    return dataclasses.replace(prof, node_size=node_size, intra_bandwidth=bw, intra_latency=lat,
                               intra_alltoall_efficiency=eff, inter_bandwidth=bw, inter_latency=lat,
                               inter_alltoall_efficiency=eff)


def _names(strategy: str | None, w: Workload, prof: Profile) -> tuple[str, ...]:
    hybrids = hybrid_names(w.world_size) if prof.two_level else ()
    if strategy is None:
        return STRATEGIES + hybrids
    if strategy == HYBRID:
        if not hybrids:
            raise OptionError("strategy 'hybrid' needs a two-level machine: a profile with a node size "
                              f"(e.g. h100-nvlink-ib) or node_size=, and a world of >= 4 ranks (got "
                              f"{w.world_size})")
        return hybrids
    if strategy in STRATEGIES or hybrid_split(strategy) is not None:
        return (strategy,)
    raise OptionError(f"strategy must be one of {list(STRATEGIES)}, 'hybrid', 'hybrid-<outer>x<inner>' or "
                      f"None, got {strategy!r}")


def plan(*, seq_len: int, world_size: int, heads: int, head_dim: int, kv_heads: int | None = None,
         batch: int = 1, dtype: Any = "bfloat16", causal: bool = False, backward: bool = False,
         profile: str | Profile | None = "h100-nvlink", strategy: str | None = None,
         block_size: int | None = None, mask_density: float = 1.0, node_size: int | None = None) -> Plan:
    """The best Plan (or the named strategy's), with the alternatives attached for ``explain()``.

    ``strategy="hybrid"`` gives the best hybrid split."""
    w = _workload(seq_len, world_size, heads, kv_heads, head_dim, batch, dtype, causal, backward,
                  mask_density)
    prof = two_level_profile(load_profile(profile), node_size)
    names = _names(strategy, w, prof)
    ranked = _rank(w, prof, _names(None, w, prof) if strategy in (None, HYBRID) else
                   tuple(dict.fromkeys(_names(None, w, prof) + names)), block_size)
    if strategy is None:
        return ranked[0]
    for p in ranked:
        if p.strategy == strategy or (strategy == HYBRID and hybrid_split(p.strategy) is not None):
            return p
    reason = feasible(strategy, world_size=w.world_size, heads=w.heads, kv_heads=w.kv_heads)
    raise OptionError(f"strategy {strategy!r} cannot run this workload: {reason}")


# ---------------------------------------------------------------- the runtime's per-call entry point

_LAYOUT_STRATEGIES = {None: DISTRIBUTED, "contiguous": ("ring", "allgather", "ulysses"),
                      "zigzag": ("zigzag",)}
_CALL_CACHE: OrderedDict[tuple, _CallPlanner] = OrderedDict()
_CALL_CACHE_SIZE = 128
_CALL_LOCK = threading.RLock()


class _CallPlanner:
    """Lambdified evaluators of one static shape; memoises Plans per sequence length."""

    def __init__(self, w: Workload, prof: Profile, names: tuple[str, ...]):
        ok, bad = _candidates(w, names)
        if not ok:
            raise OptionError(f"no strategy among {list(names)} can run this call: "
                              + "; ".join(f"{n}: {r}" for n, r in bad))
        self.template = w
        self.profile = prof.name
        self.bad = tuple((n, None, r) for n, r in bad)
        self.evaluators = [_Evaluator(w, prof, name, None) for name in ok]
        self.plans: OrderedDict[int, Plan] = OrderedDict()

    def choose(self, seq_len: int) -> Plan:
        cached = self.plans.get(seq_len)
        if cached is not None:
            return cached
        w = dataclasses.replace(self.template, seq_len=seq_len)
        timed = sorted(((ev.time(seq_len, ev.block(w)), i) for i, ev in enumerate(self.evaluators)))
        others = tuple((self.evaluators[i].strategy, t, "") for t, i in timed)
        chosen = self.evaluators[timed[0][1]].plan(w, self.profile, others + self.bad)
        self.plans[seq_len] = chosen
        if len(self.plans) > 256:
            self.plans.popitem(last=False)
        return chosen


def choose_for_call(*, seq_len: int, world_size: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                    dtype: Any, causal: bool, backward: bool, profile: str | Profile | None = None,
                    layout: str | None = None, strategies: tuple[str, ...] | None = None,
                    device: str | None = None, mask_density: float = 1.0) -> Plan:
    """The Plan the runtime runs for strategy "auto": microseconds per call after the first.

    Only strategies that run on sequence shards are offered (``local`` only when
    ``world_size`` is 1). ``layout`` restricts them to the ones that accept shards in that
    layout ("zigzag" -> zigzag; "contiguous" -> ring/allgather/ulysses); ``strategies``
    restricts them explicitly. ``profile=None`` picks cpu-gloo-loopback on CPU and a CUDA
    profile on GPU (``device`` says which; default: CUDA when available).
    """
    key = (world_size, batch, heads, kv_heads, head_dim, str(dtype), bool(causal), bool(backward),
           profile if not isinstance(profile, Profile) else id(profile), layout, strategies, device,
           mask_density)
    planner = _CALL_CACHE.get(key)
    if planner is not None:
        with _CALL_LOCK:
            return planner.choose(int(seq_len))
    with _CALL_LOCK:   # simulated ranks are threads: build and memoise under one lock
        w = _workload(seq_len, world_size, heads, kv_heads, head_dim, batch, dtype, causal, backward,
                      mask_density)
        prof = load_profile(profile, device=device)
        if w.world_size == 1:
            names: tuple[str, ...] = ("local",)
        else:
            if layout not in _LAYOUT_STRATEGIES:
                raise OptionError(f"layout must be 'contiguous', 'zigzag' or None, got {layout!r}")
            names = tuple(n for n in (strategies or DISTRIBUTED)
                          if n in _LAYOUT_STRATEGIES[layout] or hybrid_split(n) is not None)
            if not names:
                raise OptionError(f"no strategy in {strategies} accepts the {layout!r} layout")
        planner = _CallPlanner(w, prof, names)
        _CALL_CACHE[key] = planner
        if len(_CALL_CACHE) > _CALL_CACHE_SIZE:
            _CALL_CACHE.popitem(last=False)
        log.debug("built call planner for %s on %s: %s", w, prof.name, names)
        return planner.choose(int(seq_len))

