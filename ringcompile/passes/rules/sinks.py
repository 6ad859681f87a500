"""Attention sinks (gpt-oss): a per-head logit column concatenated to the scores, sliced off after."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..aten import norm_dim, val_of
from .shapes import _shape, same_size

aten = torch.ops.aten


def strip_sink(x: fx.Node) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
    """gpt-oss attention sinks: ``x`` is ``cat([scores, sink_column], -1)``, maybe minus its row max
    (softmax is shift invariant). Returns (scores, sink column, nodes dead after the rewrite)."""
    nodes: set[fx.Node] = set()
    if (x.target == aten.sub.Tensor and isinstance(x.args[0], fx.Node)
            and _is_row_max_of(x.args[1], x.args[0])):
        nodes |= {x, x.args[1], x.args[1].args[0]} if x.args[1].target is operator.getitem else {x, x.args[1]}
        x = x.args[0]
    if x.target != aten.cat.default or len(x.args[0]) != 2:
        return None
    cat_val = val_of(x)
    if not isinstance(cat_val, torch.Tensor) or cat_val.dim() != 4:
        return None
    if norm_dim(int(x.args[1] if len(x.args) > 1 else 0), 4) != 3:
        return None
    scores, sink = x.args[0]
    if not (isinstance(scores, fx.Node) and isinstance(sink, fx.Node)) or not same_size(_shape(sink)[-1], 1):
        return None
    if _reads(sink, scores):
        return None
    return scores, sink, nodes | {x}


def _is_row_max_of(m: Any, c: fx.Node) -> bool:
    """``m`` is ``c.max(-1, keepdim=True).values`` or ``c.amax(-1, keepdim=True)``."""
    if not isinstance(m, fx.Node):
        return False
    if m.target is operator.getitem and m.args[1] == 0 and isinstance(m.args[0], fx.Node):
        mx = m.args[0]
        return (mx.target == aten.max.dim and mx.args[0] is c and norm_dim(int(mx.args[1]), 4) == 3
                and bool(mx.args[2] if len(mx.args) > 2 else mx.kwargs.get("keepdim", False)))
    if m.target == aten.amax.default and m.args[0] is c:
        dims = m.args[1] if len(m.args) > 1 else []
        keep = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
        return list(dims) in ([-1], [3]) and bool(keep)
    return False


def _reads(node: fx.Node, target: fx.Node, depth: int = 32) -> bool:
    """Whether ``node``'s value depends on ``target`` (bounded walk up the inputs)."""
    frontier, seen = [node], {node}
    for _ in range(depth):
        if target in frontier:
            return True
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if not frontier:
            return False
    return True  # too deep to tell: assume it does


def _drops_sink(user: fx.Node, probs: fx.Node) -> bool:
    """``probs[..., :-1]``: the last (sink) column sliced off the probabilities."""
    if user.target != aten.slice.Tensor or user.args[0] is not probs:
        return False
    args = list(user.args) + [None] * (5 - len(user.args))
    dim, start, end, step = args[1], args[2], args[3], args[4]
    size = _shape(probs)[-1]
    return (norm_dim(int(dim if dim is not None else 0), 4) == 3 and start in (None, 0) and step in (None, 1)
            and isinstance(end, int) and (end == -1 or same_size(end, size - 1)))

