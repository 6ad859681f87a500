"""Where strategies trade places as the sequence grows: pairwise crossovers and the best-strategy pieces.

The plan is piecewise in S: between consecutive crossover lengths one strategy is best.
Times are the lambdified model (``planner._Evaluator``), scanned on a log grid and refined
by integer bisection, so the answer is exact to one token for the model.
"""

from __future__ import annotations

import dataclasses
import dataclasses as _dc
import math
from typing import Any

from ringcompile.errors import OptionError

from .planner import (
    DISTRIBUTED,
    Workload,
    _candidates,
    _Evaluator,
    _workload,
    hybrid_names,
    order_key,
    two_level_profile,
)
from .profiles import Profile, load_profile
from .strategies import STRATEGIES


@dataclasses.dataclass(frozen=True)
class Crossover:
    """At ``seq_len`` tokens, ``faster_above`` overtakes ``faster_below``."""

    seq_len: int
    faster_below: str
    faster_above: str


@dataclasses.dataclass(frozen=True)
class Piece:
    """``strategy`` is the best for ``start <= S < end``."""

    start: int
    end: int
    strategy: str


def _evaluators(w: Workload, prof: Profile, strategies: tuple[str, ...]) -> dict[str, _Evaluator]:
    ok, _ = _candidates(w, strategies)
    if len(ok) == 0:
        raise OptionError(f"no strategy among {list(strategies)} can run this workload")
    return {name: _Evaluator(w, prof, name, None) for name in ok}


def _time(ev: _Evaluator, w: Workload, seq_len: int) -> float:
    block = min(ev.block(_dc.replace(w, seq_len=seq_len)), seq_len / w.world_size)
    return ev.time(seq_len, block, pad=False)


TIE = 1e-3   # relative difference below which two predicted times are the same


def _order(t_a: float, t_b: float) -> int:
    """-1 when a is faster, +1 when b is, 0 when they tie within TIE."""
    if t_a < t_b * (1 - TIE):
        return -1
    if t_b < t_a * (1 - TIE):
        return 1
    return 0


def _grid(lo: int, hi: int, points: int) -> list[int]:
    step = (math.log(hi) - math.log(lo)) / (points - 1)
    return sorted({int(round(math.exp(math.log(lo) + i * step))) for i in range(points)})


def _bisect(pred, lo: int, hi: int) -> int:
    """Smallest S in (lo, hi] with pred(S) != pred(lo)."""
    first = pred(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid) == first:
            lo = mid
        else:
            hi = mid
    return hi


def _setup(world_size, heads, head_dim, kv_heads, batch, dtype, causal, backward, profile, strategies, lo,
           node_size=None):
    w = _workload(lo, world_size, heads, kv_heads, head_dim, batch, dtype, causal, backward)
    prof = two_level_profile(load_profile(profile), node_size)
    hybrids = hybrid_names(world_size) if prof.two_level else ()
    if strategies is not None:
        names = tuple(strategies)
    else:
        names = STRATEGIES + hybrids if world_size > 1 else ("local",)
    return w, _evaluators(w, prof, names)


def crossovers(*, world_size: int, heads: int, head_dim: int, kv_heads: int | None = None, batch: int = 1,
               dtype: Any = "bfloat16", causal: bool = False, backward: bool = False,
               profile: str | Profile | None = "h100-nvlink", strategies: tuple[str, ...] | None = None,
               lo: int = 256, hi: int = 1 << 24, points: int = 121,
               node_size: int | None = None) -> list[Crossover]:
    """Every sequence length in [lo, hi] where one strategy's predicted time crosses another's
    (hybrid splits included on a two-level machine: a profile with a node size, or ``node_size``)."""
    w, evs = _setup(world_size, heads, head_dim, kv_heads, batch, dtype, causal, backward, profile,
                    strategies, lo, node_size)
    grid = _grid(lo, hi, points)
    times = {n: [_time(ev, w, s) for s in grid] for n, ev in evs.items()}
    names = list(evs)
    found = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            def order(s: int, a=a, b=b) -> int:
                return _order(_time(evs[a], w, s), _time(evs[b], w, s))

            last, last_s = 0, grid[0]
            for j, s in enumerate(grid):
                now = _order(times[a][j], times[b][j])
                if now == 0:
                    continue                      # a tie (within TIE) is no crossover
                if last and now != last:
                    s_cross = _bisect(lambda x, last=last, order=order: order(x) == last, last_s, s)
                    below, above = (a, b) if last < 0 else (b, a)
                    found.append(Crossover(s_cross, below, above))
                last, last_s = now, s
    return sorted(found, key=lambda x: (x.seq_len, x.faster_below))


def best_pieces(*, world_size: int, heads: int, head_dim: int, kv_heads: int | None = None, batch: int = 1,
                dtype: Any = "bfloat16", causal: bool = False, backward: bool = False,
                profile: str | Profile | None = "h100-nvlink", strategies: tuple[str, ...] | None = None,
                lo: int = 256, hi: int = 1 << 24, points: int = 121,
                node_size: int | None = None) -> list[Piece]:
    """The piecewise plan: which strategy is best on each range of S (the runtime's choice when
    ``strategies`` is the distributed set; hybrid splits join it on a two-level machine)."""
    if strategies is None and world_size > 1:
        prof = two_level_profile(load_profile(profile), node_size)
        strategies = DISTRIBUTED + (hybrid_names(world_size) if prof.two_level else ())
    w, evs = _setup(world_size, heads, head_dim, kv_heads, batch, dtype, causal, backward, profile,
                    strategies, lo, node_size)

    def best(s: int) -> str:
        """The fastest strategy; near-ties (within TIE) go to the earlier name in STRATEGIES."""
        times = {n: _time(ev, w, s) for n, ev in evs.items()}
        fastest = min(times.values())
        return min((n for n, t in times.items() if t <= fastest * (1 + TIE)), key=order_key)

    grid = _grid(lo, hi, points)
    pieces: list[Piece] = []
    start, current = grid[0], best(grid[0])
    for a, b in zip(grid, grid[1:], strict=False):
        if best(b) != best(a):
            first = best(a)
            s = _bisect(lambda x, first=first: best(x) == first, a, b)
            pieces.append(Piece(start, s, current))
            start, current = s, best(s)
    pieces.append(Piece(start, grid[-1] + 1, current))
    merged: list[Piece] = []
    for piece in pieces:   # a bisection that lands on a third strategy's tie can split one range in two
        if merged and merged[-1].strategy == piece.strategy:
            merged[-1] = dataclasses.replace(merged[-1], end=piece.end)
        elif piece.end > piece.start:
            merged.append(piece)
    return merged
