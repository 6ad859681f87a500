"""Softmax-invariant row shifts: ``softmax(x - rowmax(x)) == softmax(x)``.

Models subtract the row max before the softmax for 16-bit stability (MiMo-V2-Flash, gpt-oss): ``x -
x.max(-1, keepdim=True).values``, ``x - x.amax(-1, keepdim=True)``, the max maybe ``.detach()``ed, cast,
or taken without keepdim and unsqueezed back. A per-row constant leaves the softmax (and its gradient:
the softmax Jacobian maps the constant's direction to 0) unchanged, and the ring kernel stabilises on
its own, so the shift is dropped and the rules see the unshifted scores. Only the row max of the very
tensor being shifted, over the softmax dim, kept as a column, is stripped: a max over another dim varies
along the row (the softmax is not invariant to it) and is declined with the reason; a max of another
tensor is left to the score chain (an ordinary per-row score term).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..aten import norm_dim, val_of, value_users
from .base import Decline, Match, Rule, register_rule
from .chain import not_attention_reason
from .ops import CAST_OPS, SOFTMAX_OPS, is_float_cast
from .shapes import _same_shape, _shape, same_size

aten = torch.ops.aten

# between the max and the subtraction: ops that keep the max a per-row constant of the same values
_MAX_WRAPPERS = CAST_OPS | {aten.detach.default, aten.alias.default, aten.unsqueeze.default}


@dataclasses.dataclass
class RowShift:
    """The shifts stripped from a softmax input.

    base:    the unshifted scores (the softmax is of these, up to per-row constants);
    next:    the node that reads ``base`` on the way to the softmax (the innermost subtraction);
    nodes:   the subtractions, the max ops and what wraps them, the casts between: dead after the rewrite;
    readers: the max ops that read ``base`` besides ``next`` (not "uses outside the softmax").
    """

    base: fx.Node
    next: fx.Node
    nodes: set[fx.Node]
    readers: set[fx.Node]


def strip_row_shifts(sm: fx.Node, dim: int) -> RowShift | None:
    """Walk back from the input of softmax ``sm`` (over ``dim``) through float casts and row-max shifts;
    None when there is no shift (casts alone are left to the chain). Raises ``Decline`` for a max shift
    that is not softmax-invariant, or when the shifted values or the max are read elsewhere."""
    cur, downstream = sm.args[0], sm
    nodes: set[fx.Node] = set()
    readers: set[fx.Node] = set()
    while True:
        casts, c = [], cur
        while is_float_cast(c):
            casts.append(c)
            c = c.args[0]
        found = _row_max_shift(c, dim)
        if found is None:
            break
        max_nodes, reducer = found
        toward = [c, *reversed(casts), downstream]  # the shift, then each cast, in value order
        for a, b in zip(toward, toward[1:], strict=False):
            if value_users(a) != [b]:
                raise Decline(f"the shifted scores ({a.name}) are also used outside the softmax")
        nodes |= set(casts) | {c} | max_nodes
        readers.add(reducer)
        cur, downstream = c.args[0], c
    if not nodes:
        return None
    return RowShift(cur, downstream, nodes, readers)


def _row_max_shift(sub: fx.Node, dim: int) -> tuple[set[fx.Node], fx.Node] | None:
    """``sub`` is ``c - rowmax(c)`` over ``dim``: (the max's nodes, the reducing node), else None.
    Declines a max of ``c`` that is not constant along ``dim`` or is read elsewhere."""
    if not (isinstance(sub, fx.Node) and sub.op == "call_function" and sub.target == aten.sub.Tensor
            and len(sub.args) == 2 and sub.kwargs.get("alpha", 1) == 1):
        return None
    c, m = sub.args
    if not (isinstance(c, fx.Node) and isinstance(m, fx.Node)):
        return None
    chain = _max_chain(m)
    if chain is None:
        return None
    reducer, dims, wrappers = chain
    if reducer.args[0] is not c:
        return None  # another tensor's max: an ordinary per-row score term, for the chain to lift
    ndim = len(_shape(c))
    reduced = sorted({norm_dim(int(d), ndim) for d in dims})
    if dim not in reduced:
        raise Decline(f"the scores ({c.name}) are shifted by their max over dim(s) {list(dims)}, not over "
                      f"the softmax dim {dim}: that is not constant along each row, so dropping it would "
                      "change the softmax")
    if reduced != [dim]:  # constant along rows, but may underflow whole rows in eager (0 / 0)
        raise Decline(f"the scores ({c.name}) are shifted by their max over dims {list(dims)}, not by the "
                      f"row max over the softmax dim {dim} alone: eager may underflow rows far below that "
                      "max, so the shift is not dropped")
    ms = _shape(m)
    if len(ms) != ndim or not same_size(ms[dim], 1) or not _same_shape(_shape(sub), _shape(c)):
        raise Decline(f"the scores ({c.name}) are shifted by their row max broadcast as {tuple(ms)}, not as "
                      f"one column per row (keepdim at dim {dim}): not a per-row constant")
    seq = [reducer, *wrappers, sub]  # value order, reducer to the subtraction
    nodes = set(seq[:-1])
    for a, b in zip(seq, seq[1:], strict=False):
        unused_indices = {u for u in a.users if a is reducer and u.target is operator.getitem
                          and u.args[1] == 1 and not u.users}
        if [u for u in value_users(a) if u not in unused_indices] != [b]:
            raise Decline(f"the row max of the scores ({a.name}) is also used outside the shift")
        nodes |= unused_indices
    return nodes, reducer


def _max_chain(m: fx.Node) -> tuple[fx.Node, list, list[fx.Node]] | None:
    """``m`` is a max reduction wrapped in value-keeping ops: (reducer, its dims, the wrappers from the
    reducer's side: max.dim's ``getitem 0`` first), else None."""
    wrappers: list[fx.Node] = []
    while m.op == "call_function" and m.target in _MAX_WRAPPERS and isinstance(m.args[0], fx.Node):
        wrappers.insert(0, m)
        m = m.args[0]
    if m.op != "call_function":
        return None
    if m.target is operator.getitem and m.args[1] == 0 and isinstance(m.args[0], fx.Node):
        mx = m.args[0]
        if mx.op == "call_function" and mx.target == aten.max.dim:
            return mx, [mx.args[1]], [m, *wrappers]
        return None
    if m.target == aten.amax.default:
        dims = m.args[1] if len(m.args) > 1 else m.kwargs.get("dim", [])
        if not dims:  # amax over every dim: not a row max
            dims = list(range(len(_shape(m.args[0]))))
        return m, list(dims), wrappers
    return None


def _check_shift(sm: fx.Node, index: int) -> Match | None:
    """The row-shift rule: a softmax of attention whose input is max-shifted is checked here first, so an
    unsound shift is declined under this rule's name; a sound one is stripped by every softmax rule."""
    softmax_input(sm)
    return None


def softmax_input(sm: fx.Node) -> tuple[fx.Node, RowShift | None]:
    """The softmax's input with its row-max shifts stripped (and the shifts), or the input as it is
    (always for a softmax that is not attention: a router's shift is not this rule's business)."""
    x = sm.args[0]
    if not isinstance(x, fx.Node) or not isinstance(val_of(x), torch.Tensor) or not_attention_reason(sm):
        return x, None
    shift = strip_row_shifts(sm, norm_dim(int(sm.args[1]), len(_shape(x))))
    return (x, None) if shift is None else (shift.base, shift)


SHIFT_RULE = register_rule(Rule("softmax-row-shift", frozenset(SOFTMAX_OPS), _check_shift, pattern="softmax"))
