"""A sliding window recovered exactly from the mask a graph builds, for the ops over a sharded KV cache.

HF builds a sliding-window model's boolean mask (Mistral; ``masking_utils``' index-based
``sdpa_mask``) as an AND of index comparisons over the query positions ``q`` (``arange(n) + past
length``, as rows) and the key slots ``kv`` (``arange(kv_len) + 0``, as columns): causal ``kv <= q``,
the window ``kv > q - w``, the padding. When the graph says exactly that, every entry the mask keeps
satisfies ``q - kv < w``, so ``decode_attention`` / ``chunk_cache_attention`` may apply the window
``w`` themselves and skip a shard wholly outside it before any work (without it, only after
gathering the mask at the shard's slots). The window is taken only when:

* it is a leaf of the mask's AND tree (reached through ``&`` and bool-preserving ``to`` / ``expand``
  only: an OR, a negation or any other op in between and nothing is taken);
* the leaf is ``kv > q - w`` with a constant int ``w >= 1``, and the same ``kv`` and ``q`` nodes form
  a causal leaf ``kv <= q`` in the same tree;
* ``kv`` is ``arange(L)`` (plus 0) over the mask's last dim as columns, so a column is a global slot;
* ``q`` is ``arange(n) + length`` as rows, with ``length`` a sharded cache layer's length (the
  placeholder the cache's own positions add to ``arange``, stripped of ``to``), the same ``n`` as
  the op's positions: so the mask's rows are the op's query slots (every layer holds the same length).

Anything else gives None and the op gets no window (the mask alone still hides those slots: correct).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
_ANDS = {operator.and_, torch.logical_and, torch.bitwise_and, aten.bitwise_and.Tensor,
         aten.logical_and.default}
_ADDS = {operator.add, torch.add, aten.add.Tensor}
_KV_INDEX = (None, None, None, slice(None, None, None))
_Q_INDEX = (None, None, slice(None, None, None), None)


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_bool(node: Any) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def _through(node: fx.Node) -> fx.Node | None:
    """The input of a bool-preserving ``to`` / ``expand`` (None: ``node`` is not one)."""
    if node.op == "call_method" and node.target in ("to", "expand") and node.args:
        src = node.args[0]
        return src if isinstance(src, fx.Node) and _is_bool(src) and _is_bool(node) else None
    if node.op == "call_function" and node.target in (aten.expand.default, aten._to_copy.default):
        src = node.args[0]
        return src if isinstance(src, fx.Node) and _is_bool(src) and _is_bool(node) else None
    return None


def conjuncts(mask: fx.Node) -> list[fx.Node]:
    """The leaves of ``mask``'s AND tree (the mask keeps an entry only where every leaf does)."""
    leaves, todo, seen = [], [mask], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        inner = _through(n)
        if inner is not None:
            todo.append(inner)
        elif n.op == "call_function" and n.target in _ANDS and len(n.args) == 2 and all(
                isinstance(a, fx.Node) and _is_bool(a) for a in n.args):
            todo.extend(n.args)
        else:
            leaves.append(n)
    return leaves


def _strip_to(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to" and node.args:
        node = node.args[0]
    return node


def _indexed(node: Any, index: tuple) -> fx.Node | None:
    """x for ``x[index]`` (Dynamo's getitem with None / full slices), else None."""
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[1] == index and isinstance(node.args[0], fx.Node)):
        return node.args[0]
    return None


def _is_arange(node: Any) -> bool:
    """``arange(end)`` (one argument, no start or step)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in (torch.arange,)
            and len(node.args) == 1 and not {"start", "step", "end"} & set(node.kwargs))


def _arange_plus(node: Any) -> tuple[fx.Node, Any] | None:
    """(the arange, the addend) for ``arange(n) + x`` (either order), (arange, 0) for a bare arange."""
    if _is_arange(node):
        return node, 0
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _ADDS
            and len(node.args) == 2):
        a, b = node.args
        if _is_arange(a):
            return a, b
        if _is_arange(b):
            return b, a
    return None


def _length(node: Any) -> str:
    v = _val(node)
    return str(v.shape[0]) if isinstance(v, torch.Tensor) and v.dim() == 1 else "?"


def cache_lengths(gm: fx.GraphModule, is_gather: Any) -> set[fx.Node]:
    """The placeholders a sharded cache's positions add to ``arange`` (each layer's length)."""
    found = set()
    for n in gm.graph.nodes:
        if is_gather(n):
            parts = _arange_plus(n.args[3])
            if parts is not None and isinstance(_strip_to(parts[1]), fx.Node):
                found.add(_strip_to(parts[1]))
    return {p for p in found if p.op in ("placeholder", "get_attr")}


def _window_leaf(leaf: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """(kv, q, w) for a leaf ``kv > q - w`` (or ``q - w < kv``) with a constant int w >= 1."""
    if leaf.op != "call_function" or len(leaf.args) != 2:
        return None
    if leaf.target in (operator.gt, torch.gt, aten.gt.Tensor):
        kv, rhs = leaf.args
    elif leaf.target in (operator.lt, torch.lt, aten.lt.Tensor):
        rhs, kv = leaf.args
    else:
        return None
    if not (isinstance(rhs, fx.Node) and rhs.op == "call_function" and rhs.target in (operator.sub, torch.sub)
            and len(rhs.args) == 2 and isinstance(rhs.args[0], fx.Node)):
        return None
    w = rhs.args[1]
    if not isinstance(w, int) or isinstance(w, bool) or w < 1 or not isinstance(kv, fx.Node):
        return None
    return kv, rhs.args[0], w


def _is_causal_leaf(leaf: fx.Node, kv: fx.Node, q: fx.Node) -> bool:
    """``kv <= q`` (or ``q >= kv``) on exactly these nodes."""
    if leaf.op != "call_function" or len(leaf.args) != 2:
        return False
    if leaf.target in (operator.le, torch.le, aten.le.Tensor):
        return leaf.args[0] is kv and leaf.args[1] is q
    if leaf.target in (operator.ge, torch.ge, aten.ge.Tensor):
        return leaf.args[0] is q and leaf.args[1] is kv
    return False


def mask_window(mask: Any, kv_len: Any, positions: Any, lengths: set[fx.Node]) -> int | None:
    """The sliding window ``mask`` (a boolean mask node over ``kv_len`` cache slots) applies exactly to
    the op's query slots ``positions`` (``arange(n) + this layer's length``); None when the graph does
    not say so exactly (module docstring)."""
    if not isinstance(mask, fx.Node) or not _is_bool(mask):
        return None
    mine = _arange_plus(positions)
    if mine is None or _strip_to(mine[1]) not in lengths:
        return None
    leaves = conjuncts(mask)
    for leaf in leaves:
        found = _window_leaf(leaf)
        if found is None:
            continue
        kv, q, w = found
        if not any(_is_causal_leaf(other, kv, q) for other in leaves):
            continue
        kv_parts = _arange_plus(_indexed(kv, _KV_INDEX))
        q_parts = _arange_plus(_indexed(q, _Q_INDEX))
        if kv_parts is None or q_parts is None or kv_parts[1] != 0:
            continue
        if _length(kv_parts[0]) != str(kv_len) or _strip_to(q_parts[1]) not in lengths:
            continue
        if _length(q_parts[0]) != _length(mine[0]) or _length(mine[0]) == "?":
            continue
        return w
    return None
