"""Numbers from the expressions: lambdified once per structure, then plain function calls.

``strategy_functions(name, causal, backward)`` lambdifies a strategy's time, compute,
transfer, threshold and memory terms over *all* symbols, so a new profile, shape or
sequence length costs a Python call (microseconds), never a sympy operation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import sympy as sp

from . import symbols as sym
from .memory import memory_terms
from .profiles import DTYPE_BYTES, Profile
from .strategies import ring_threshold, ring_threshold_with_latency, strategy_model

ARGS = sym.ALL  # argument order of every lambdified function (but hybrid's)
HYBRID_ARGS = sym.ALL_TWO_LEVEL  # hybrid's: ARGS, then the two-level symbols


def args_of(name: str) -> tuple[sp.Symbol, ...]:
    """The argument order of strategy ``name``'s functions."""
    return HYBRID_ARGS if name == "hybrid" or name.startswith("hybrid-") else ARGS


def _lambdify(expr: sp.Expr, args: tuple[sp.Symbol, ...] = ARGS) -> Callable[..., float]:
    return sp.lambdify(args, expr, modules=["math"])


@dataclasses.dataclass(frozen=True)
class StrategyFunctions:
    time: Callable[..., float]
    compute: Callable[..., float]
    comm: Callable[..., float]
    step_compute: Callable[..., float]
    step_comm: Callable[..., float]
    memory: dict[str, Callable[..., float]]


@functools.cache
def strategy_functions(name: str, causal: bool, backward: bool) -> StrategyFunctions:
    model = strategy_model(name, causal, backward)
    terms = memory_terms(name, causal, backward)
    a = args_of(name)
    return StrategyFunctions(_lambdify(model.time, a), _lambdify(model.compute, a), _lambdify(model.comm, a),
                             _lambdify(model.step_compute, a), _lambdify(model.step_comm, a),
                             {label: _lambdify(t, a) for label, t in terms.items()})


@functools.cache
def threshold_functions(frac: sp.Rational) -> tuple[Callable[..., float], Callable[..., float]]:
    """(bandwidth-only, latency-aware) ring overlap thresholds as functions of ARGS."""
    return _lambdify(ring_threshold(frac)), _lambdify(ring_threshold_with_latency(frac))


def hardware_values(profile: Profile, dtype: str, world_size: int, strategy: str) -> dict[sp.Symbol, float]:
    """The profile's numbers for the hardware symbols, for ``strategy`` on ``world_size`` ranks.

    Rates are one rank's on its own core/device. Ranks sharing a host's cores are bounded
    through P_h (see ``strategies.shared_makespan``), and each runs its kernels
    ``shared_slowdown`` times slower than alone (caches and memory bandwidth are shared too):
    that divides F and M and multiplies the tile overhead, so the formulas stay those of one
    device with slower effective rates."""
    from .strategies import hybrid_split

    host = profile.host_cores()
    shared = host > 0 and strategy != "local" and world_size > 1
    cores = min(world_size, host) if shared else world_size
    cores = max(cores, 1.0)
    slow = max(profile.shared_slowdown, 1e-9) if shared else 1.0
    # two-level machines: a group wider than a node runs its ring and all-to-alls at the speed of
    # the link between nodes; hybrid's inner all-to-all stays inside a node when its width divides it
    across = profile.two_level and world_size > profile.node_size
    bw, lat, eff = profile.link("inter" if across else "intra")
    split = hybrid_split(strategy)
    inner = split[1] if split else 1
    in_node = not profile.two_level or (inner <= profile.node_size and profile.node_size % inner == 0)
    ibw, ilat, ieff = profile.link("intra" if in_node else "inter")
    return {
        sym.F: profile.flops(dtype) * profile.kernel_efficiency / slow,
        sym.M: profile.memory_bandwidth / slow,
        sym.W: bw,
        sym.Wa: bw * eff,
        sym.alpha: lat,
        sym.Wi: ibw * ieff,
        sym.alpha_i: ilat,
        sym.P: profile.score_passes,
        sym.o: profile.tile_overhead * slow,
        sym.k: float(profile.kernel_block),
        sym.kb: profile.backward_factor,
        sym.tc: float(profile.causal_tile),
        sym.Ph: float(cores),
        sym.h: profile.step_overhead,
    }


def argument_values(*, seq_len: float, world_size: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                    dtype: str, block: float, hardware: dict[sp.Symbol, float],
                    density: float = 1.0) -> dict[sp.Symbol, float]:
    values = {sym.S: float(seq_len), sym.N: float(world_size), sym.B: float(batch), sym.Hq: float(heads),
              sym.Hkv: float(kv_heads), sym.D: float(head_dim), sym.e: float(DTYPE_BYTES[dtype]),
              sym.f: 1.0, sym.d: float(density), sym.c: float(block), sym.Ni: 1.0, sym.r: 1.0}
    values.update(hardware)
    return values


def as_args(values: dict[sp.Symbol, float], args: tuple[sp.Symbol, ...] = ARGS) -> tuple[float, ...]:
    return tuple(values[s] for s in args)


def latency_block(values: dict[sp.Symbol, float], fraction: float = 0.05) -> float:
    """Smallest chunk (tokens) whose per-message latency is at most ``fraction`` of its transfer."""
    per_token = 2 * values[sym.B] * values[sym.Hkv] * values[sym.D] * values[sym.e] / values[sym.W]
    return values[sym.alpha] / (fraction * per_token) if per_token > 0 else math.inf
