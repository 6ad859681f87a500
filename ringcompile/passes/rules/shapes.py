"""Values, shapes and permutations of the nodes an attention rule reads; KV-head repeats (GQA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..aten import RESHAPE_OVERLOADS, norm_dim, shape_or_raise, val_of
from .base import Decline

aten = torch.ops.aten


def _shape(node: fx.Node) -> tuple:
    """A tensor node's shape; a rule declines a node that holds no tensor."""
    return shape_or_raise(node, Decline)


def same_size(a: Any, b: Any) -> bool:
    """True when two (Sym)Int sizes are equal (symbolic ones are guarded on their hint)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        if statically_known_true(a == b):
            return True
        return bool(a == b)  # symbolic sizes: decide on the hint and guard on it (recompile if it changes)
    except Exception:  # noqa: BLE001
        return False


def _same_shape(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b, strict=True))


def _compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    """permute(permute(x, inner), outer) == permute(x, result)."""
    return tuple(inner[i] for i in outer)


def fold_permutes(node: fx.Node, perm: tuple[int, ...]) -> tuple[fx.Node, tuple[int, ...]]:
    """Walk back through transpose/permute nodes: value == permute(result_node, result_perm)."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        src = node.args[0]
        if not isinstance(src, fx.Node) or not isinstance(val_of(src), torch.Tensor):
            break
        ndim = len(_shape(src))
        if node.target == aten.transpose.int:
            d0, d1 = (norm_dim(int(d), ndim) for d in node.args[1:3])
            inner = list(range(ndim))
            inner[d0], inner[d1] = inner[d1], inner[d0]
        elif node.target == aten.permute.default:
            inner = [norm_dim(int(d), ndim) for d in node.args[1]]
        elif node.target == aten.t.default and ndim == 2:
            inner = [1, 0]
        else:
            break
        perm = _compose(perm, tuple(inner))
        node = src
    return node, perm


def _identity(n: int) -> tuple[int, ...]:
    return tuple(range(n))


def _or_none(perm: tuple[int, ...]) -> tuple[int, ...] | None:
    return None if perm == _identity(len(perm)) else perm


def permuted_shape(node: fx.Node, perm: tuple[int, ...]) -> tuple:
    shape = _shape(node)
    return tuple(shape[i] for i in perm)


def _scalar_value(arg: Any) -> float | None:
    """A Python scalar or a SymFloat/SymInt node's value (guarded), else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, fx.Node):
        val = val_of(arg)
        if isinstance(val, (torch.SymFloat, torch.SymInt, int, float)) and not isinstance(val, bool):
            return float(val)
    return None


def strip_repeat(node: fx.Node, perm: tuple[int, ...]) -> tuple[fx.Node, tuple[int, ...], int]:
    """If ``node`` repeats KV heads (repeat_interleave, HF repeat_kv, or an expand of one head), return
    the un-repeated source.

    ``perm`` maps node dims to (B, H, S, D); the head dim is ``perm[1]``. Returns (node, perm, groups).
    """
    if len(perm) != 4 or not isinstance(node, fx.Node) or node.op != "call_function":
        return node, perm, 1
    hd = perm[1]
    if node.target == aten.repeat_interleave.self_int:
        src, reps = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(reps, int) and dim is not None and norm_dim(int(dim), len(_shape(node))) == hd:
            return src, perm, reps
    elif node.target == aten.expand.default:
        found = _expanded_head(node, hd)
        if found is not None:
            return found[0], perm, found[1]
    elif node.target in RESHAPE_OVERLOADS:
        found = _repeat_kv_source(node, hd)
        if found is not None:
            return found[0], perm, found[1]
    return node, perm, 1


def _expanded_head(node: fx.Node, hd: int) -> tuple[fx.Node, int] | None:
    """MQA: one KV head expanded (a view) to every query head: (source, heads)."""
    src, out_shape = node.args[0], _shape(node)
    if not (isinstance(src, fx.Node) and isinstance(val_of(src), torch.Tensor)):
        return None
    src_shape = _shape(src)
    if (len(src_shape) == len(out_shape) and same_size(src_shape[hd], 1) and not same_size(out_shape[hd], 1)
            and isinstance(out_shape[hd], int)
            and all(same_size(src_shape[d], out_shape[d]) for d in range(len(out_shape)) if d != hd)):
        return src, out_shape[hd]
    return None


def _repeat_kv_source(node: fx.Node, hd: int) -> tuple[fx.Node, int] | None:
    """HF repeat_kv: x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D): (x, n)."""
    out_shape = _shape(node)
    exp = node.args[0]
    while isinstance(exp, fx.Node) and exp.target in (aten.clone.default, aten.contiguous.default):
        exp = exp.args[0]
    if not (isinstance(exp, fx.Node) and exp.target == aten.expand.default):
        return None
    exp_shape = _shape(exp)
    j = hd + 1
    if len(exp_shape) != len(out_shape) + 1 or not isinstance(exp_shape[j], int):
        return None
    groups = exp_shape[j]
    src = _through_one_unsqueeze(exp.args[0], j, len(exp_shape))
    if src is None or len(_shape(src)) != len(out_shape):
        return None
    src_shape = _shape(src)
    for d in range(len(out_shape)):
        if not same_size(src_shape[d] * groups if d == hd else src_shape[d], out_shape[d]):
            return None
    return src, groups


def _through_one_unsqueeze(src: Any, j: int, ndim: int) -> fx.Node | None:
    """Walk back through full slices to exactly one unsqueeze at dim ``j``; its source, else None."""
    found = False
    while isinstance(src, fx.Node) and src.op == "call_function":
        if src.target == aten.slice.Tensor and _is_full_slice(src):
            src = src.args[0]
        elif src.target == aten.unsqueeze.default and not found:
            if norm_dim(int(src.args[1]), ndim) != j:
                return None
            found = True
            src = src.args[0]
        else:
            break
    return src if found and isinstance(src, fx.Node) else None


def strip_kv_repeats(k_node: fx.Node, k_perm: tuple[int, ...], v_node: fx.Node, v_perm: tuple[int, ...]
                     ) -> tuple[fx.Node, tuple[int, ...], fx.Node, tuple[int, ...], int]:
    """K and V without their KV-head repeat (GQA) and the group count: (k, k_perm, v, v_perm, groups).

    When K and V are repeated differently they are returned as given with groups 1: whatever
    repeat there was stays in the graph (correct, just not GQA-aware)."""
    k1, kp1, gk = strip_repeat(k_node, k_perm)
    v1, vp1, gv = strip_repeat(v_node, v_perm)
    if gk != gv:
        return k_node, k_perm, v_node, v_perm, 1
    k1, kp1 = fold_permutes(k1, kp1)
    v1, vp1 = fold_permutes(v1, vp1)
    return k1, kp1, v1, vp1, gk


def _is_full_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2], args[3], args[4]
    start = node.kwargs.get("start", start)
    end = node.kwargs.get("end", end)
    step = node.kwargs.get("step", step)
    big = end is None or (isinstance(end, int) and end >= 2**62)
    return (start in (None, 0)) and big and (step in (None, 1))


def _check_qkv(qs: Sequence, ks: Sequence, vs: Sequence, is_3d: bool) -> None:
    """q (B,H,S,D), k/v (B,Hkv,S,D) in canonical order: batch and lengths must agree."""
    if not same_size(qs[0], ks[0]) or not same_size(qs[0], vs[0]):
        raise Decline("query and key/value batch sizes differ (broadcast over batch is not rewritten)")
    if not is_3d and not same_size(ks[1], vs[1]):
        raise Decline("key and value have different head counts")
    if not same_size(qs[-2], ks[-2]):
        raise Decline("query and key lengths differ (cross-attention is not sequence-sharded)")
    if not same_size(ks[-2], vs[-2]):
        raise Decline("key and value lengths differ")
    if not same_size(qs[-1], ks[-1]):
        raise Decline("query and key head dims differ")


def _layout_name(is_3d: bool, q_perm: tuple[int, ...], k_perm: tuple[int, ...]) -> str:
    """How the user laid the tensors out: q or k read from (B, S, H, D) through a transpose -> "bshd"."""
    if is_3d:
        return "3d"
    return "bshd" if (0, 2, 1, 3) in (q_perm, k_perm) else "bhsd"

