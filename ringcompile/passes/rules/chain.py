"""Walking the score chain: from a softmax input back to the q.k^T matmul, and lifting the chain's
pointwise ops into scale / mask_mod / score_mod (``passes.mods``)."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ringcompile.errors import UnsupportedPatternError
from ringcompile.mods import Mod

from ..aten import RESHAPE_OVERLOADS, VIEW_OPS, norm_dim, val_of
from .base import Decline, NotAttention  # noqa: F401
from .ops import CAST_OPS, DROPOUT_OPS, MATMUL_OPS, is_chain_op
from .shapes import _same_shape, _shape, same_size

aten = torch.ops.aten


def _find_through_chain(x: fx.Node, probe: Callable[[fx.Node, list[fx.Node]], tuple[bool, Any]],
                        through_views: bool = False) -> list:
    """Walk from ``x`` back through chain ops, asking ``probe(node, path)`` at each node.

    ``probe`` returns (stop, item): a non-None item is collected, and ``stop`` ends the walk along
    that branch; ``through_views``: reshapes of the running value are walked through too. The walk
    gives up after two items (callers want exactly one). ``path`` runs from
    the node to ``x``.
    """
    found: list = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node, path: list[fx.Node]) -> None:
        if n in seen or len(found) > 1 or n.op != "call_function":
            return
        seen.add(n)
        stop, item = probe(n, path)
        if item is not None:
            found.append(item)
        if stop or not (is_chain_op(n) or (through_views and n.target in VIEW_OPS)):
            return
        args = n.args[:1] if n.target in VIEW_OPS else n.args
        for a in args:
            if isinstance(a, fx.Node) and isinstance(val_of(a), torch.Tensor):
                visit(a, [a, *path])

    visit(x, [x])
    return found


def _score_spine(x: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The unique matmul-like node feeding ``x`` through chain ops, and the path from it to ``x``."""
    target_shape = _shape(x)

    def probe(n: fx.Node, path: list[fx.Node]) -> tuple[bool, Any]:
        if n.target in MATMUL_OPS:
            return True, (n, path) if _same_shape(_shape(n), target_shape) else None
        return False, None

    found = _find_through_chain(x, probe)
    if not found:  # a view round trip, e.g. (B*H, S, S) -> (B, H, S, S) for the mask -> back
        found = _find_through_chain(x, probe, through_views=True)
    if not found:
        return None
    if len(found) > 1:
        raise Decline("several matmuls feed the softmax input")
    return found[0]


def _reshaped_score(x: fx.Node, depth: int = 12) -> bool:
    """True when a matmul reaches ``x`` through chain ops and at least one reshape (reported, not matched)."""
    stack = [(x, False, 0)]
    seen: set[fx.Node] = set()
    while stack:
        n, reshaped, d = stack.pop()
        if n in seen or d > depth or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in MATMUL_OPS:
            if reshaped:
                return True
            continue
        if not is_chain_op(n) and n.target not in VIEW_OPS:
            continue
        for a in n.args:
            if isinstance(a, fx.Node) and isinstance(val_of(a), torch.Tensor):
                stack.append((a, reshaped or n.target in VIEW_OPS, d + 1))
    return False


def _head_split_spine(x: fx.Node):
    """Bloom's / DeBERTa's spelling: a 3-D (B*H, S, S) matmul, then 3-D chain ops (DeBERTa adds its
    relative-position bias there), viewed to (B, H, S, S), then chain ops to ``x``.

    Returns (matmul, view, path from the matmul to the view's input (empty without 3-D ops), path from
    view to x, (B, H) view sizes) or None. B may be -1 in the sizes (``view(-1, H, S, S)``): the rewrite
    unflattens q/k/v with the same sizes.
    """
    target_shape = _shape(x)
    if len(target_shape) != 4:
        return None

    def probe(n: fx.Node, path: list[fx.Node]) -> tuple[bool, Any]:
        if n.target not in RESHAPE_OVERLOADS:
            return False, None
        src = n.args[0]
        sizes = n.args[1]
        if not (isinstance(src, fx.Node) and isinstance(sizes, (list, tuple)) and len(sizes) == 4
                and _same_shape(_shape(n), target_shape) and len(_shape(src)) == 3
                and isinstance(sizes[1], int) and sizes[1] > 0
                and not (isinstance(sizes[0], int) and sizes[0] < 0 and sizes[0] != -1)):
            return True, None
        ss, vs = _shape(src), _shape(n)
        if not (same_size(ss[0], vs[0] * vs[1]) and _same_shape(ss[1:], vs[2:])):
            return True, None
        if src.op == "call_function" and src.target in MATMUL_OPS:
            return True, (src, n, [], path, (sizes[0], sizes[1]))
        pre = _score_spine(src) if src.op == "call_function" and is_chain_op(src) else None
        if pre is None:
            return True, None
        return True, (pre[0], n, pre[1], path, (sizes[0], sizes[1]))

    found = _find_through_chain(x, probe)
    if len(found) != 1:
        return None
    return found[0]


def not_attention_reason(sm: fx.Node) -> str | None:
    """Why a softmax is not attention at all, or None when it may be: no matmul of two batched
    activations feeds it and no matmul with a batched operand reads it (a router over experts,
    a softmax over features)."""
    x = sm.args[0]
    if not isinstance(x, fx.Node) or val_of(x) is None:
        return "its input is not a tensor"
    if _qk_feeds(x) or _pv_reads(sm):
        return None
    xs = _shape(x)
    dim = norm_dim(int(sm.args[1]), len(xs))
    return (f"a {len(xs)}-D softmax over dim {dim} (size {xs[dim]}) that no q.k^T matmul of two "
            "activations feeds and no matmul with v reads (e.g. a router over experts or a softmax over "
            "features)")


def _batched_operands(mm: fx.Node) -> list[Any]:
    if mm.target == aten.einsum.default:
        return list(mm.args[1])
    return list(mm.args[1:3] if mm.target == aten.baddbmm.default else mm.args[:2])


def _is_batched(a: Any) -> bool:
    val = val_of(a)
    return isinstance(val, torch.Tensor) and val.dim() >= 3


def _qk_feeds(x: fx.Node, depth: int = 16) -> bool:
    """A matmul of two batched (>= 3-D) values reaches ``x`` through chain ops and reshapes."""
    stack, seen = [(x, 0)], set()
    while stack:
        n, d = stack.pop()
        if n in seen or d > depth or not isinstance(n, fx.Node) or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in MATMUL_OPS:
            if all(_is_batched(a) for a in _batched_operands(n)):
                return True
            continue
        if is_chain_op(n) or n.target in VIEW_OPS:
            stack += [(a, d + 1) for a in n.args if isinstance(a, fx.Node)]
        elif n.target == aten.cat.default:  # scores with a sink column
            stack += [(a, d + 1) for a in n.args[0] if isinstance(a, fx.Node)]
    return False


def _pv_reads(sm: fx.Node, depth: int = 8) -> bool:
    """The probabilities reach a matmul (through casts, dropout, reshapes) whose other operand is batched."""
    frontier, seen = [sm], {sm}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen or u.op != "call_function":
                    continue
                seen.add(u)
                if u.target in MATMUL_OPS:
                    if any(_is_batched(a) for a in _batched_operands(u) if a is not n):
                        return True
                elif (u.target in CAST_OPS or u.target in DROPOUT_OPS or u.target in VIEW_OPS
                      or u.target is operator.getitem or u.target == aten.slice.Tensor):
                    nxt.append(u)
        frontier = nxt
    return False


@dataclasses.dataclass
class Chain:
    """What the score chain (q.k^T -> softmax input) means."""

    scale: float
    mask: Mod | None
    score: Mod | None
    mask_extras: list[fx.Node]
    score_extras: list[fx.Node]
    consumed: set[fx.Node]
    notes: list[str]
    dead_rows: Any = None  # spec.DeadRowForm of finite mask claims


def extract_chain(score: fx.Node, x: fx.Node, ndim: int, additive: list[fx.Node], alpha: float,
                  merged_heads: tuple | None = None) -> Chain:
    """Lift the chain ``score -> x`` (plus baddbmm's additive terms and alpha) with ``passes.mods``.

    ``merged_heads``: the score is the 3-D (B*H, S, S) matmul of a 4-D site (the chain splits it into
    (B, H) on the way): its index is (b*H + h, q, kv)."""
    from .. import mods as extract

    dims = ("b", "q", "kv") if ndim == 3 else ("b", "h", "q", "kv")
    try:
        ex = extract.extract_score_chain(score, x, dims=dims, additive=list(additive),
                                         merged_heads=merged_heads is not None)
    except UnsupportedPatternError as exc:
        raise Decline(f"mask/score chain not expressible: {exc}") from exc
    if alpha != 1.0:
        if ex.scale is not None and ex.scale != 1.0:
            raise Decline("baddbmm alpha combined with a further scale in the chain")
        scale = alpha
    else:
        scale = ex.scale if ex.scale is not None else 1.0
    return Chain(scale, ex.mask, ex.score, list(ex.mask_extras), list(ex.score_extras), set(ex.consumed),
                 list(ex.notes), ex.dead_rows)
