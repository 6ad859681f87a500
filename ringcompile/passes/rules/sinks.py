"""Attention sinks (gpt-oss, Inkling2): a logit column (per head, or per query) concatenated to the scores,
sliced off after the softmax."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..aten import norm_dim, val_of, value_users
from .ops import is_float_cast
from .shapes import _shape, same_size

aten = torch.ops.aten


def strip_sink(x: fx.Node) -> tuple[fx.Node, fx.Node, set[fx.Node]] | None:
    """Attention sinks (gpt-oss, Inkling2): ``x`` is ``cat([scores, sink_column], -1)``, maybe cast to a
    float dtype after the cat (Inkling2's ``.float()``: the cast of the cat is a cast of both parts, and the
    site computes in its own dtype). Row-max shifts are stripped before (``shift.softmax_input``).
    Returns (scores, sink column, nodes dead after the rewrite)."""
    casts: set[fx.Node] = set()
    while is_float_cast(x):
        if len(value_users(x.args[0])) != 1:
            return None
        casts.add(x)
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
    return scores, sink, casts | {x}


def _reads(node: fx.Node, target: fx.Node) -> bool:
    """Whether ``node``'s value depends on ``target``: a walk up the inputs that never climbs above
    ``target`` (a graph is in topological order, so a node defined before it cannot read it). Exact at
    any depth: a sink computed from the hidden states of a late layer is hundreds of nodes deep."""
    todo, seen = [node], {node}
    while todo:
        n = todo.pop()
        if n is target:
            return True
        for a in n.all_input_nodes:
            if a not in seen and not a < target:
                seen.add(a)
                todo.append(a)
    return False


def _drops_sink(user: fx.Node, probs: fx.Node) -> bool:
    """``probs[..., :-1]``: the last (sink) column sliced off the probabilities."""
    if user.target != aten.slice.Tensor or user.args[0] is not probs:
        return False
    args = list(user.args) + [None] * (5 - len(user.args))
    dim, start, end, step = args[1], args[2], args[3], args[4]
    size = _shape(probs)[-1]
    return (norm_dim(int(dim if dim is not None else 0), 4) == 3 and start in (None, 0) and step in (None, 1)
            and isinstance(end, int) and (end == -1 or same_size(end, size - 1)))

