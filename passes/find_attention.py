"""Find attention in a normalised aten graph.

A site is either an SDPA call or a softmax over the key dim whose input chain (pointwise ops,
each used once) starts at a q.k^T matmul and whose output (through casts/dropout) is the left
operand of a matmul with v. Softmaxes that reach a matmul but fail a check are reported as
"attention-like, not rewritten" with the reason; everything else is left alone silently.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ringcompile import mods as mods_lib
from ringcompile.errors import UnsupportedPatternError
from ringcompile.log import get_logger
from ringcompile.site import AttentionSite

from .aten import INPLACE, functional_packet, packet_of
from .locations import location_of, module_path  # noqa: F401  (module_path re-exported)

log = get_logger(__name__)
aten = torch.ops.aten

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default, aten.baddbmm.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
CAST_OPS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.clone.default,
            aten.contiguous.default, aten.alias.default, aten.to.dtype_layout, aten.to.device}
DROPOUT_OPS = {aten.dropout.default, aten.native_dropout.default}
# ops the score may pass through between q.k^T and the softmax (the mods pass gives them meaning)
CHAIN_OPS = CAST_OPS | {
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.add.Scalar,
    aten.sub.Tensor, aten.sub.Scalar, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
    aten.where.ScalarOther, aten.where.ScalarSelf, aten.tanh.default, aten.neg.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.maximum.default,
    aten.minimum.default, aten.rsub.Scalar, aten.rsub.Tensor, aten.div.Tensor_mode, aten.max.other,
}
_CHAIN_PACKETS = {op.overloadpacket for op in CHAIN_OPS}
_SCALAR_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_SCALAR_DIV = {aten.div.Tensor, aten.div.Scalar}


@dataclasses.dataclass
class Rejected:
    """An attention-like subgraph that was not turned into a site, and why."""

    location: str
    pattern: str
    reason: str
    node: fx.Node | None = None
    attention: bool = True  # False: the candidate is not attention at all (a router, a feature softmax)


class Discovery(NamedTuple):
    sites: list[AttentionSite]
    rejected: list[Rejected]


class _NotASite(Exception):
    """Raised inside matching: the candidate looked like attention but fails a check."""


class _NotAttention(_NotASite):
    """Raised inside matching: the candidate is not attention (reported, never a warning)."""


def is_chain_op(n: fx.Node) -> bool:
    """An op the score may pass through between q.k^T and the softmax; an in-place one counts when
    it is exactly its functional twin (it mutates a fresh value nothing else reads)."""
    if n.op != "call_function":
        return False
    if n.target in CHAIN_OPS:
        return True
    return packet_of(n) in INPLACE and functional_packet(n) in _CHAIN_PACKETS


# ---------------------------------------------------------------------------- small helpers


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _shape(node: fx.Node) -> tuple:
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        raise _NotASite(f"{node.name} is not a tensor")
    return tuple(val.shape)


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


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def fold_permutes(node: fx.Node, perm: tuple[int, ...]) -> tuple[fx.Node, tuple[int, ...]]:
    """Walk back through transpose/permute nodes: value == permute(result_node, result_perm)."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        src = node.args[0]
        if not isinstance(src, fx.Node) or not isinstance(_val(src), torch.Tensor):
            break
        ndim = len(_shape(src))
        if node.target == aten.transpose.int:
            d0, d1 = (_norm_dim(int(d), ndim) for d in node.args[1:3])
            inner = list(range(ndim))
            inner[d0], inner[d1] = inner[d1], inner[d0]
        elif node.target == aten.permute.default:
            inner = [_norm_dim(int(d), ndim) for d in node.args[1]]
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
        val = _val(arg)
        if isinstance(val, (torch.SymFloat, torch.SymInt, int, float)) and not isinstance(val, bool):
            return float(val)
    return None


# ---------------------------------------------------------------------------- GQA


def strip_repeat(node: fx.Node, perm: tuple[int, ...]) -> tuple[fx.Node, tuple[int, ...], int]:
    """If ``node`` repeats KV heads (repeat_interleave or HF repeat_kv), return the un-repeated source.

    ``perm`` maps node dims to (B, H, S, D); the head dim is ``perm[1]``. Returns (node, perm, groups).
    """
    if len(perm) != 4 or not isinstance(node, fx.Node) or node.op != "call_function":
        return node, perm, 1
    hd = perm[1]
    out_shape = _shape(node)
    if node.target == aten.repeat_interleave.self_int:
        src, reps = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(reps, int) and dim is not None and _norm_dim(int(dim), len(out_shape)) == hd:
            return src, perm, reps
        return node, perm, 1
    if node.target == aten.expand.default:  # MQA: one KV head expanded (a view) to every query head
        src = node.args[0]
        if isinstance(src, fx.Node) and isinstance(_val(src), torch.Tensor):
            src_shape = _shape(src)
            if (len(src_shape) == len(out_shape) and same_size(src_shape[hd], 1)
                    and not same_size(out_shape[hd], 1) and isinstance(out_shape[hd], int)
                    and all(same_size(src_shape[d], out_shape[d]) for d in range(len(out_shape)) if d != hd)):
                return src, perm, out_shape[hd]
        return node, perm, 1
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        exp = node.args[0]
        while isinstance(exp, fx.Node) and exp.target in (aten.clone.default, aten.contiguous.default):
            exp = exp.args[0]
        if not (isinstance(exp, fx.Node) and exp.target == aten.expand.default):
            return node, perm, 1
        exp_shape = _shape(exp)
        j = hd + 1
        if len(exp_shape) != len(out_shape) + 1 or not isinstance(exp_shape[j], int):
            return node, perm, 1
        groups = exp_shape[j]
        # walk back through full slices to one unsqueeze at dim j
        src = exp.args[0]
        found_unsqueeze = False
        while isinstance(src, fx.Node) and src.op == "call_function":
            if src.target == aten.slice.Tensor and _is_full_slice(src):
                src = src.args[0]
            elif src.target == aten.unsqueeze.default and not found_unsqueeze:
                if _norm_dim(int(src.args[1]), len(exp_shape)) != j:
                    return node, perm, 1
                found_unsqueeze = True
                src = src.args[0]
            else:
                break
        if not found_unsqueeze or not isinstance(src, fx.Node):
            return node, perm, 1
        src_shape = _shape(src)
        if len(src_shape) != len(out_shape):
            return node, perm, 1
        for d in range(len(out_shape)):
            expect = src_shape[d] * groups if d == hd else src_shape[d]
            if not same_size(expect, out_shape[d]):
                return node, perm, 1
        return src, perm, groups
    return node, perm, 1


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


# ---------------------------------------------------------------------------- the finder


def find_attention(gm: fx.GraphModule) -> Discovery:
    """All attention sites of ``gm`` (not modified) plus the attention-like subgraphs left alone."""
    sites: list[AttentionSite] = []
    rejected: list[Rejected] = []
    claimed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            if node.target in SDPA_OPS:
                site = _match_sdpa(node, len(sites))
            elif node.target in SOFTMAX_OPS:
                why_not = not_attention_reason(node)
                if why_not is not None:
                    raise _NotAttention(why_not)
                site = _match_softmax(node, len(sites))
                if site is None:
                    raise _NotASite("no q.k^T matmul reaches the softmax through pointwise ops")
            else:
                continue
        except _NotAttention as exc:
            rejected.append(Rejected(location_of(node), "softmax", f"not attention: {exc}", node, False))
            continue
        except _NotASite as exc:
            pattern = "sdpa" if node.target in SDPA_OPS else "softmax"
            rejected.append(Rejected(location_of(node), pattern, str(exc), node))
            log.info("attention-like subgraph at %s not rewritten: %s", location_of(node), exc)
            continue
        except Exception as exc:  # noqa: BLE001 - a matcher bug must cost one site, not the graph
            pattern = "sdpa" if node.target in SDPA_OPS else "softmax"
            reason = f"internal error while matching: {type(exc).__name__}: {exc}"
            rejected.append(Rejected(location_of(node), pattern, reason, node))
            log.warning("attention at %s not rewritten: %s", location_of(node), reason)
            continue
        if site.nodes & claimed:
            rejected.append(Rejected(site.location, site.pattern, "overlaps another attention site", node))
            continue
        claimed |= site.nodes
        sites.append(site)
    return Discovery(sites, rejected)


def not_attention_reason(sm: fx.Node) -> str | None:
    """Why a softmax is not attention at all, or None when it may be: no matmul of two batched
    activations feeds it and no matmul with a batched operand reads it (a router over experts,
    a softmax over features)."""
    x = sm.args[0]
    if not isinstance(x, fx.Node) or _val(x) is None:
        return "its input is not a tensor"
    if _qk_feeds(x) or _pv_reads(sm):
        return None
    xs = _shape(x)
    dim = _norm_dim(int(sm.args[1]), len(xs))
    return (f"a {len(xs)}-D softmax over dim {dim} (size {xs[dim]}) that no q.k^T matmul of two "
            "activations feeds and no matmul with v reads (e.g. a router over experts or a softmax over "
            "features)")


def _batched_operands(mm: fx.Node) -> list[Any]:
    if mm.target == aten.einsum.default:
        return list(mm.args[1])
    return list(mm.args[1:3] if mm.target == aten.baddbmm.default else mm.args[:2])


def _is_batched(a: Any) -> bool:
    val = _val(a)
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
        if is_chain_op(n) or n.target in _RESHAPES:
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
                elif (u.target in CAST_OPS or u.target in DROPOUT_OPS or u.target in _RESHAPES
                      or u.target is operator.getitem or u.target == aten.slice.Tensor):
                    nxt.append(u)
        frontier = nxt
    return False


def _extract_module():
    try:
        from ringcompile.passes import mods as extract
    except ImportError:
        return None
    return extract


def _match_sdpa(node: fx.Node, index: int) -> AttentionSite:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    defaults: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                "enable_gqa": False}
    args = dict(defaults)
    args.update(dict(zip(names, node.args, strict=False)))
    args.update(node.kwargs)
    q, k, v = args["query"], args["key"], args["value"]
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if len(qs) not in (3, 4) or len(ks) != len(qs) or len(vs) != len(qs):
        raise _NotASite(f"SDPA on {len(qs)}-D inputs (only 3-D and 4-D are rewritten)")
    ndim = len(qs)
    is_3d = ndim == 3
    q_node, q_perm = fold_permutes(q, _identity(ndim))
    k_node, k_perm = fold_permutes(k, _identity(ndim))
    v_node, v_perm = fold_permutes(v, _identity(ndim))
    groups = 1
    if not is_3d:
        k_node, k_perm, v_node, v_perm, groups = strip_kv_repeats(k_node, k_perm, v_node, v_perm)
    kb = permuted_shape(k_node, k_perm)
    vb = permuted_shape(v_node, v_perm)
    _check_qkv(qs, kb, vb, is_3d)
    if not is_3d:
        hq, hkv = qs[1], kb[1]
        if same_size(hkv, 1) and not same_size(hq, 1) and groups == 1:
            groups = int(hq)  # MQA: one KV head broadcast over the query heads
        if not same_size(hq, hkv * groups) and args["enable_gqa"]:
            ratio = hq // (hkv * groups)
            if same_size(ratio * hkv * groups, hq):
                groups *= int(ratio)
        if not same_size(hq, hkv * groups):
            raise _NotASite(f"query heads {hq} are not a multiple of key heads {hkv}")
    dropout_p = _scalar_value(args["dropout_p"]) or 0.0
    mask = score = None
    mask_extras: list[fx.Node] = []
    score_extras: list[fx.Node] = []
    consumed: set[fx.Node] = set()
    notes: list[str] = []
    if args["attn_mask"] is not None:
        extract = _extract_module()
        if extract is None:
            raise _NotASite("mods extraction unavailable (ringcompile.passes.mods not importable)")
        dims = ("b", "q", "kv") if is_3d else ("b", "h", "q", "kv")
        try:
            ex = extract.extract_attn_mask(args["attn_mask"], dims=dims)
        except UnsupportedPatternError as exc:
            raise _NotASite(f"attention mask not expressible: {exc}") from exc
        mask, score = ex.mask, ex.score
        mask_extras, score_extras = list(ex.mask_extras), list(ex.score_extras)
        consumed = set(ex.consumed)
        notes += list(ex.notes)
        if ex.scale is not None:
            raise _NotASite("attention mask extraction reported a scale; SDPA masks carry none")
    if args["is_causal"]:
        mask = mods_lib.and_masks(mods_lib.causal(), mask) if mask is not None else mods_lib.causal()
    scale = _scalar_value(args["scale"]) if args["scale"] is not None else None
    out_val = _val(node)
    layout = _layout_name(is_3d, q_perm, k_perm)
    return AttentionSite(
        name=f"attn{index}", pattern="sdpa", q=q_node, k=k_node, v=v_node, output=node, layout=layout,
        output_layout="3d" if is_3d else "bhsd", scale=scale, gqa_groups=groups, dropout_p=dropout_p,
        softmax_dtype=None, mask=mask, score=score, mask_extras=mask_extras, score_extras=score_extras,
        nodes={node} | consumed, location=location_of(node), q_perm=_or_none(q_perm), k_perm=_or_none(k_perm),
        v_perm=_or_none(v_perm), out_perm=None, is_3d=is_3d, output_dtype=out_val.dtype, notes=notes,
    )


def _layout_name(is_3d: bool, q_perm: tuple[int, ...], k_perm: tuple[int, ...]) -> str:
    """How the user laid the tensors out: q or k read from (B, S, H, D) through a transpose -> "bshd"."""
    if is_3d:
        return "3d"
    return "bshd" if (0, 2, 1, 3) in (q_perm, k_perm) else "bhsd"


def _check_qkv(qs: Sequence, ks: Sequence, vs: Sequence, is_3d: bool) -> None:
    """q (B,H,S,D), k/v (B,Hkv,S,D) in canonical order: batch and lengths must agree."""
    if not same_size(qs[0], ks[0]) or not same_size(qs[0], vs[0]):
        raise _NotASite("query and key/value batch sizes differ (broadcast over batch is not rewritten)")
    if not is_3d and not same_size(ks[1], vs[1]):
        raise _NotASite("key and value have different head counts")
    if not same_size(qs[-2], ks[-2]):
        raise _NotASite("query and key lengths differ (cross-attention is not sequence-sharded)")
    if not same_size(ks[-2], vs[-2]):
        raise _NotASite("key and value lengths differ")
    if not same_size(qs[-1], ks[-1]):
        raise _NotASite("query and key head dims differ")


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
        if stop or not (is_chain_op(n) or (through_views and n.target in _RESHAPES)):
            return
        args = n.args[:1] if n.target in _RESHAPES else n.args
        for a in args:
            if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor):
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
        raise _NotASite("several matmuls feed the softmax input")
    return found[0]


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
             aten.flatten.using_ints}


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
        if not is_chain_op(n) and n.target not in _RESHAPES:
            continue
        for a in n.args:
            if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor):
                stack.append((a, reshaped or n.target in _RESHAPES, d + 1))
    return False


def _head_split_spine(x: fx.Node):
    """Bloom's spelling: a 3-D (B*H, S, S) matmul viewed to (B, H, S, S) and then chain ops to ``x``.

    Returns (matmul, view, path from view to x, (B, H) view sizes) or None.
    """
    target_shape = _shape(x)
    if len(target_shape) != 4:
        return None

    def probe(n: fx.Node, path: list[fx.Node]) -> tuple[bool, Any]:
        if n.target not in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return False, None
        mm = n.args[0]
        sizes = n.args[1]
        if (isinstance(mm, fx.Node) and mm.op == "call_function" and mm.target in MATMUL_OPS
                and len(_shape(mm)) == 3 and _same_shape(_shape(n), target_shape)
                and isinstance(sizes, (list, tuple)) and len(sizes) == 4
                and not any(isinstance(z, int) and z < 0 for z in sizes[:2])):
            ms, vs = _shape(mm), _shape(n)
            if same_size(ms[0], vs[0] * vs[1]) and _same_shape(ms[1:], vs[2:]):
                return True, (mm, n, path, (sizes[0], sizes[1]))
        return True, None

    found = _find_through_chain(x, probe)
    if len(found) != 1:
        return None
    return found[0]


def _unflatten_heads(anchor: fx.Node, node: fx.Node, heads: tuple[Any, Any]) -> fx.Node:
    """Insert ``unflatten(node, 0, [B, H])`` before ``anchor`` (dead code if the site is not rewritten)."""
    from .rewrite import _Builder

    builder = _Builder(anchor.graph.owning_module, anchor)
    return builder.call(aten.unflatten.int, (node, 0, list(heads)))


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
    cat_val = _val(x)
    if not isinstance(cat_val, torch.Tensor) or cat_val.dim() != 4:
        return None
    if _norm_dim(int(x.args[1] if len(x.args) > 1 else 0), 4) != 3:
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
        return (mx.target == aten.max.dim and mx.args[0] is c and _norm_dim(int(mx.args[1]), 4) == 3
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
    return (_norm_dim(int(dim if dim is not None else 0), 4) == 3 and start in (None, 0) and step in (None, 1)
            and isinstance(end, int) and (end == -1 or same_size(end, size - 1)))


def _match_softmax(sm: fx.Node, index: int) -> AttentionSite | None:
    x = sm.args[0]
    if not isinstance(x, fx.Node):
        return None
    sink = strip_sink(x)
    sink_col, sink_nodes = None, set()
    if sink is not None:
        x, sink_col, sink_nodes = sink
    spine = _score_spine(x)
    head_split = None
    if spine is None:
        split = _head_split_spine(x)
        if split is None:
            if _reshaped_score(x):
                raise _NotASite("the score matrix is reshaped between q.k^T and the softmax in a way other "
                                "than splitting (B*H) into (B, H); only pointwise ops may sit in between")
            return None
        mm, score, path, head_split = split
        if len(mm.users) != 1:
            raise _NotASite(f"the score matrix ({mm.name}) is also used outside the softmax")
    else:
        score, path = spine
    xs = _shape(x)
    ndim = len(xs)
    dim = _norm_dim(int(sm.args[1]), ndim)
    if dim != ndim - 1:
        raise _NotASite(f"softmax over dim {dim}, not the key dim {ndim - 1}")
    if ndim not in (3, 4):
        raise _NotASite(f"{ndim}-D score matrix (only 3-D and 4-D attention is rewritten)")
    for n in path:  # path = [score, ..., x]
        if len(n.users) != 1:
            raise _NotASite(f"the score matrix ({n.name}) is also used outside the softmax")
    # q . k^T
    if head_split is None:
        q_node, q_perm, k_node, k_perm, pattern, additive, alpha = _match_qk(score, ndim)
    else:
        q_node, q_perm, k_node, k_perm, pattern, additive, alpha = _match_qk(mm, 3)
        pattern += "+view"
    # softmax -> casts/dropout -> matmul with v
    dropout_p = 0.0
    cur = sm
    forward: list[fx.Node] = [sm]
    while True:
        if len(cur.users) != 1:
            raise _NotASite("attention probabilities are also used outside the matmul with v")
        user = next(iter(cur.users))
        if user.op == "call_function" and (user.target in CAST_OPS and user.args[0] is cur):
            cur = user
        elif user.op == "call_function" and user.target in DROPOUT_OPS and user.args[0] is cur:
            p = _scalar_value(user.args[1]) or 0.0
            train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
            if user.target == aten.native_dropout.default:
                getters = list(user.users)
                if len(getters) != 1 or getters[0].target is not operator.getitem or getters[0].args[1] != 0:
                    raise _NotASite("dropout mask is used outside the attention")
                forward.append(user)
                user = getters[0]
            if train is True or train is None:
                dropout_p = p
            elif not isinstance(train, bool):
                raise _NotASite("dropout with a data-dependent training flag")
            cur = user
        elif user.op == "call_function" and user.target in MATMUL_OPS:
            break
        elif sink_col is not None and cur is sm and _drops_sink(user, sm):
            cur = user  # the sink column's probability is dropped
            sink_col = (sink_col,)  # marks the slice as seen
        elif (head_split is not None and user.op == "call_function" and user.target in _RESHAPES
              and user.args[0] is cur and len(_shape(user)) == 3 and same_size(_shape(user)[0], xs[0] * xs[1])
              and _same_shape(_shape(user)[1:], xs[2:])):
            cur = user  # (B, H, S, S) probabilities merged back to (B*H, S, S) for a bmm with v
        else:
            raise _NotASite(f"softmax output feeds {user.target}, not a matmul with v")
        forward.append(cur)
    pv = next(iter(cur.users))
    if sink is not None:
        if not isinstance(sink_col, tuple):
            raise _NotASite("attention sinks: the sink column's probability is not sliced off before p @ v")
        sink_col = sink_col[0]
        if head_split is not None or ndim != 4:
            raise _NotASite("attention sinks on merged-head (3-D) scores are not rewritten")
        if dropout_p > 0:
            raise _NotASite("attention sinks with dropout are not rewritten (the lse correction is exact "
                            "without dropout only)")
    if head_split is not None:
        if len(_shape(cur)) != 3:
            raise _NotASite("probabilities are not merged back to (B*H, S, S) before the matmul with v")
        return _head_split_site(index, sm, x, mm, score, path, forward, pv, cur, head_split, q_node, q_perm,
                                k_node, k_perm, pattern, additive, alpha, dropout_p)
    v_node, v_perm, out_perm = _match_pv(pv, cur, ndim)
    if pattern == "einsum" and pv.target != aten.einsum.default:
        pattern = "einsum+matmul"
    is_3d = ndim == 3
    qb = permuted_shape(q_node, q_perm)
    kb = permuted_shape(k_node, k_perm)
    vb = permuted_shape(v_node, v_perm)
    groups = 1
    if not is_3d:
        k_node, k_perm, v_node, v_perm, groups = strip_kv_repeats(k_node, k_perm, v_node, v_perm)
        kb = permuted_shape(k_node, k_perm)
        vb = permuted_shape(v_node, v_perm)
        if same_size(kb[1], 1) and not same_size(qb[1], 1) and groups == 1:
            groups = int(qb[1])  # MQA by broadcasting a single KV head
        if not same_size(qb[1], kb[1] * groups):
            raise _NotASite(f"query heads {qb[1]} do not match key heads {kb[1]} x {groups}")
    _check_qkv(qb, kb, vb, is_3d)
    scale, mask, score_mod, mask_extras, score_extras, consumed, notes = _extract_chain(
        score, x, ndim, additive, alpha)
    layout = _layout_name(is_3d, q_perm, k_perm)
    out_val = _val(pv)
    if sink_col is not None:
        pattern += "+sink"
    return AttentionSite(
        name=f"attn{index}", pattern=pattern, q=q_node, k=k_node, v=v_node, output=pv, layout=layout,
        output_layout="3d" if is_3d else ("bshd" if out_perm == (0, 2, 1, 3) else "bhsd"),
        scale=scale, gqa_groups=groups, dropout_p=dropout_p, softmax_dtype=_val(sm).dtype, mask=mask,
        score=score_mod, mask_extras=mask_extras, score_extras=score_extras,
        nodes=set(path) | set(forward) | {pv} | consumed | sink_nodes, location=location_of(sm),
        sink=sink_col, q_perm=None if q_perm == _identity(ndim) else q_perm,
        k_perm=None if k_perm == _identity(ndim) else k_perm,
        v_perm=None if v_perm == _identity(ndim) else v_perm,
        out_perm=None if out_perm == _identity(ndim) else out_perm, is_3d=is_3d,
        output_dtype=out_val.dtype, notes=notes,
    )


def _head_split_site(index, sm, x, mm, view, path, forward, pv, probs, heads, q_node, q_perm, k_node, k_perm,
                     pattern, additive, alpha, dropout_p) -> AttentionSite:
    """A site whose q/k/v are (B*H, S, D) but whose mask/score chain runs on (B, H, S, S) scores."""
    v_node, v_perm, _ = _match_pv(pv, probs, 3)
    qb, kb, vb = (permuted_shape(n, p) for n, p in ((q_node, q_perm), (k_node, k_perm), (v_node, v_perm)))
    _check_qkv(qb, kb, vb, True)
    split_additive = []
    for bias in additive:  # baddbmm's (B*H, ., .) bias, re-viewed to (B, H, ., .) for the 4-D chain
        bs = _shape(bias)
        if len(bs) == 3 and same_size(bs[0], qb[0]) and not same_size(bs[0], 1):
            split_additive.append(_unflatten_heads(view, bias, heads))
        elif len(bs) < 3 or (len(bs) == 3 and same_size(bs[0], 1)):
            split_additive.append(bias)  # broadcasts the same way against 3-D and 4-D scores
        else:
            raise _NotASite("baddbmm bias does not split into (B, H) like the scores")
    scale, mask, score_mod, mask_extras, score_extras, consumed, notes = _extract_chain(
        view, x, 4, split_additive, alpha)
    ident = _identity(3)
    return AttentionSite(
        name=f"attn{index}", pattern=pattern, q=q_node, k=k_node, v=v_node, output=pv, layout="3d",
        output_layout="3d", scale=scale, gqa_groups=1, dropout_p=dropout_p, softmax_dtype=_val(sm).dtype,
        mask=mask, score=score_mod, mask_extras=mask_extras, score_extras=score_extras,
        nodes=set(path) | set(forward) | {pv, mm} | consumed, location=location_of(sm),
        q_perm=None if q_perm == ident else q_perm, k_perm=None if k_perm == ident else k_perm,
        v_perm=None if v_perm == ident else v_perm, out_perm=None, is_3d=False, head_split=heads,
        output_dtype=_val(pv).dtype, notes=notes,
    )


def _match_qk(score: fx.Node, ndim: int):
    """(q_node, q_perm, k_node, k_perm, pattern, additive nodes, alpha) of a q.k^T matmul."""
    ident = _identity(ndim)
    swap = ident[:-2] + (ndim - 1, ndim - 2)
    additive: list[fx.Node] = []
    alpha = 1.0
    if score.target == aten.einsum.default:
        eq, operands = score.args[0], score.args[1]
        if len(operands) != 2:
            raise _NotASite("einsum with other than two operands")
        lhs, out = _parse_einsum(eq)
        if len(lhs) != 2 or len(out) != ndim:
            raise _NotASite(f"einsum {eq!r} is not a q.k^T product")
        batch, ql, kl = out[:-2], out[-2], out[-1]
        contracted = (set(lhs[0]) & set(lhs[1])) - set(out)
        if len(contracted) != 1:
            raise _NotASite(f"einsum {eq!r} does not contract exactly one head dim")
        d = contracted.pop()
        qi = 0 if ql in lhs[0] else 1
        qs_, ks_ = lhs[qi], lhs[1 - qi]
        want_q, want_k = batch + ql + d, batch + kl + d
        if sorted(qs_) != sorted(want_q) or sorted(ks_) != sorted(want_k):
            raise _NotASite(f"einsum {eq!r} is not a q.k^T product")
        q_perm = tuple(qs_.index(c) for c in want_q)
        k_perm = tuple(ks_.index(c) for c in want_k)
        q_node, q_perm = fold_permutes(operands[qi], q_perm)
        k_node, k_perm = fold_permutes(operands[1 - qi], k_perm)
        return q_node, q_perm, k_node, k_perm, "einsum", additive, alpha
    if score.target == aten.baddbmm.default:
        bias, a, b = score.args[:3]
        beta = _scalar_value(score.kwargs.get("beta", 1.0))
        alpha_v = _scalar_value(score.kwargs.get("alpha", 1.0))
        if beta != 1.0 or alpha_v is None:
            raise _NotASite("baddbmm with beta != 1")
        alpha = alpha_v
        additive = [bias]
        pattern = "baddbmm"
    elif score.target in (aten.matmul.default, aten.bmm.default):
        a, b = score.args[:2]
        pattern = "bmm" if score.target == aten.bmm.default else "matmul"
    else:  # pragma: no cover - MATMUL_OPS is exhaustive
        raise _NotASite(f"unknown matmul {score.target}")
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        raise _NotASite("matmul operands are not tensors")
    if len(_shape(a)) != ndim or len(_shape(b)) != ndim:
        raise _NotASite("matmul operands are not batched like q and k (e.g. a weight matrix)")
    q_node, q_perm = fold_permutes(a, ident)
    k_node, k_perm = fold_permutes(b, swap)
    return q_node, q_perm, k_node, k_perm, pattern, additive, alpha


def _match_pv(pv: fx.Node, probs: fx.Node, ndim: int) -> tuple[fx.Node, tuple[int, ...], tuple[int, ...]]:
    ident = _identity(ndim)
    if pv.target in (aten.matmul.default, aten.bmm.default):
        if pv.args[0] is not probs or pv.args[1] is probs:
            raise _NotASite("attention probabilities are not the left operand of the matmul with v")
        v = pv.args[1]
        if not isinstance(v, fx.Node) or len(_shape(v)) != ndim:
            raise _NotASite("v is not batched like the scores")
        v_node, v_perm = fold_permutes(v, ident)
        return v_node, v_perm, ident
    if pv.target == aten.einsum.default:
        eq, operands = pv.args[0], pv.args[1]
        lhs, out = _parse_einsum(eq)
        if len(operands) != 2 or len(lhs) != 2 or operands[0] is operands[1]:
            raise _NotASite(f"einsum {eq!r} is not a p.v product")
        pi = 0 if operands[0] is probs else 1
        sp, sv = lhs[pi], lhs[1 - pi]
        if len(sp) != ndim or len(sv) != ndim or len(out) != ndim:
            raise _NotASite(f"einsum {eq!r} is not a p.v product")
        batch, ql, kl = sp[:-2], sp[-2], sp[-1]
        contracted = (set(sp) & set(sv)) - set(out)
        if contracted != {kl}:
            raise _NotASite(f"einsum {eq!r} does not contract the key dim")
        rest = [c for c in sv if c not in batch and c != kl]
        if len(rest) != 1:
            raise _NotASite(f"einsum {eq!r} is not a p.v product")
        e = rest[0]
        want_v, canon = batch + kl + e, batch + ql + e
        if sorted(sv) != sorted(want_v) or sorted(out) != sorted(canon):
            raise _NotASite(f"einsum {eq!r} is not a p.v product")
        v_perm = tuple(sv.index(c) for c in want_v)
        out_perm = tuple(canon.index(c) for c in out)
        v_node, v_perm = fold_permutes(operands[1 - pi], v_perm)
        return v_node, v_perm, out_perm
    if pv.target == aten.baddbmm.default:
        raise _NotASite("probabilities feed a baddbmm, not a plain matmul with v")
    raise _NotASite(f"softmax output feeds {pv.target}, not a matmul with v")


def _parse_einsum(eq: str) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise _NotASite(f"einsum {eq!r} uses ellipsis or implicit output")
    lhs, out = eq.split("->")
    return lhs.split(","), out


# ---------------------------------------------------------------------------- score chain


def _extract_chain(score: fx.Node, x: fx.Node, ndim: int, additive: list[fx.Node], alpha: float):
    """(scale, mask, score_mod, mask_extras, score_extras, consumed, notes) of the chain score -> x."""
    dims = ("b", "q", "kv") if ndim == 3 else ("b", "h", "q", "kv")
    extract = _extract_module()
    if extract is None:
        if additive:
            raise _NotASite("mods extraction unavailable (ringcompile.passes.mods not importable)")
        scale = _trivial_scale(score, x)
        return scale * alpha, None, None, [], [], set(), ["mods extraction unavailable: scale-only chain"]
    try:
        if additive:
            ex = extract.extract_score_chain(score, x, dims=dims, additive=list(additive))
        else:
            ex = extract.extract_score_chain(score, x, dims=dims)
    except UnsupportedPatternError as exc:
        raise _NotASite(f"mask/score chain not expressible: {exc}") from exc
    if alpha != 1.0:
        if ex.scale is not None and ex.scale != 1.0:
            raise _NotASite("baddbmm alpha combined with a further scale in the chain")
        scale = alpha
    else:
        scale = ex.scale if ex.scale is not None else 1.0
    return (scale, ex.mask, ex.score, list(ex.mask_extras), list(ex.score_extras), set(ex.consumed),
            list(ex.notes))


def _trivial_scale(score: fx.Node, x: fx.Node) -> float:
    """Scale of a chain made only of scalar multiplies/divides and casts (used without passes.mods)."""
    scale = 1.0
    node = x
    while node is not score:
        if node.target in CAST_OPS:
            node = node.args[0]
            continue
        if node.target in _SCALAR_MUL | _SCALAR_DIV and isinstance(node.args[0], fx.Node):
            c = _scalar_value(node.args[1])
            if c is None:
                break
            scale = scale * c if node.target in _SCALAR_MUL else scale / c
            node = node.args[0]
            continue
        if node.target in _SCALAR_MUL and isinstance(node.args[1], fx.Node):
            c = _scalar_value(node.args[0])
            if c is None:
                break
            scale *= c
            node = node.args[1]
            continue
        break
    if node is not score:
        raise _NotASite("mods extraction unavailable (ringcompile.passes.mods not importable) and the "
                        "score chain is more than a scale")
    return scale
