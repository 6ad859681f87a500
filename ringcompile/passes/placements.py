"""Placements and the per-op dimension rules that sequence sharding propagates through.

A placement says what each rank holds of a value:

* ``Replicate()``: the full value, identical on every rank.
* ``Shard(dim, inner)``: this rank's part of the sequence. The global size of ``dim`` is
  ``outer * S * inner``; ``inner`` > 1 when the sequence was flattened with faster-varying
  dims (``inner`` = 1 for a plain sequence dim, e.g. (B*S, V) logits have inner 1, outer B).
* ``Partial()``: a summand; the value is the sum over ranks.

Every sharded value holds the padded length in the layout's order; positions at or past its
valid length (the true sequence length, or less after a shift such as ``logits[:, :-1]``) hold
junk that never reaches an output, a reduction or a loss.

The rules are data: for each op, ``links(node)`` lists which input dim becomes which output
dim (``out_dim`` None: the input dim is reduced/contracted) and how a reduced sequence dim
combines (``"sum"``: linear, gives Partial; ``"mean"``: Partial with a length ratio;
``"full"``: needs the whole sequence). Views are handled by ``view_dim`` (shape grouping),
which is symmetric, so the same function maps forward and backward.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

# the sharding pass imports these from here too: its rules read shapes as hints like every rule here
from .aten import VIEW_OPS, VIEW_SIZES, hint_of, norm_dim, norm_dims, size_expr, val_of  # noqa: F401 - re-exported
from .aten import hint_shape as shape_of
from .aten import sym_shape as sym_shape_of
from .convolution import CONV_ARGS, conv_args, local_dims, why_not_local

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Replicate:
    def __repr__(self) -> str:
        return "R"


@dataclasses.dataclass(frozen=True)
class Partial:
    def __repr__(self) -> str:
        return "P"


@dataclasses.dataclass(frozen=True)
class Shard:
    """``valid``: global length of the sequence factor when it is shorter than the attention's
    (``x[:, :-1]`` keeps x's shards and marks the last position invalid); None = the full length."""

    dim: int
    inner: int = 1
    valid: int | None = None

    def __repr__(self) -> str:
        extra = (f",inner={self.inner}" if self.inner != 1 else "") + (
            f",valid={self.valid}" if self.valid is not None else "")
        return f"S({self.dim}{extra})"


Placement = Replicate | Partial | Shard
R = Replicate()
P = Partial()

ArgPath = tuple[int, ...]  # index into node.args, then into a list argument


@dataclasses.dataclass(frozen=True)
class DimLink:
    """Input ``arg``'s dim ``in_dim`` is output dim ``out_dim`` (None: reduced) of output ``out_index``."""

    arg: ArgPath
    in_dim: int
    out_dim: int | None
    out_index: int | None = None


@dataclasses.dataclass
class OpRule:
    links: list[DimLink]
    reduce: str = "full"  # how a reduced sequence dim combines: "sum", "mean" or "full"
    linear_in: tuple[ArgPath, ...] = ()  # args in which the op is linear (Partial may pass through)
    passive: tuple[ArgPath, ...] = ()  # args read only for their dtype/device (any placement will do)
    # why an input dim with no link cannot carry the sequence, where the op knows better than "no link"
    why_unlinked: dict[tuple[ArgPath, int], str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LocalShardRule:
    """An opaque op that can take some inputs as this rank's sequence shard, told the graph's layout.

    ``seq_args``: (argument, sequence dim) pairs the op accepts sharded (inner 1, the full valid length).
    When all of them are, every other tensor input is replicated and ``wants`` (the layout the op can take
    them in; None: any) is the graph's layout, the pass keeps them local (no gather) and writes the layout
    into argument ``layout_arg`` (position, name). Otherwise every input is made replicated, the op's
    plain contract. Its outputs are replicated."""

    seq_args: tuple[tuple[ArgPath, int], ...]
    layout_arg: tuple[int, str]
    wants: str | None = None


# ---------------------------------------------------------------------------- helpers


def get_arg(node: fx.Node, path: ArgPath) -> Any:
    a: Any = node.args
    for i in path:
        if not isinstance(a, (list, tuple)) or i >= len(a):
            return None
        a = a[i]
    return a


def arg_or_kwarg(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def broadcast_links(node: fx.Node, paths: Sequence[ArgPath], out_ndim: int,
                    out_shape: Sequence[int], out_index: int | None = None) -> list[DimLink]:
    """Right-aligned broadcasting: dims of equal size link; size-1 (broadcast) dims do not."""
    links = []
    for path in paths:
        s = shape_of(get_arg(node, path))
        if s is None:
            continue
        exprs, out_exprs = sym_shape_of(get_arg(node, path)), _out_exprs(node, out_index)
        off = out_ndim - len(s)
        for i, n in enumerate(s):
            if n == out_shape[i + off] and not (n == 1 and out_shape[i + off] != 1) and (
                    out_exprs is None or exprs[i] == out_exprs[i + off]):
                links.append(DimLink(path, i, i + off, out_index))
    return links


def _out_exprs(node: fx.Node, out_index: int | None) -> tuple | None:
    v = val_of(node)
    if out_index is not None and isinstance(v, (tuple, list)):
        v = v[out_index]
    return tuple(size_expr(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


# ---------------------------------------------------------------------------- views


def resolve_shape(shape: Sequence[int], numel: int) -> list[int]:
    shape = [int(s) for s in shape]
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = numel // known if known else 0
    return shape


def view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up dims of two shapes of equal numel into groups with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pa, pb = [], [], 1, 1
        if i < len(a):
            pa *= a[i]
            gi.append(i)
            i += 1
        if j < len(b):
            pb *= b[j]
            gj.append(j)
            j += 1
        while pa != pb:
            if (pa < pb and i < len(a)) or j >= len(b):
                if i >= len(a):
                    return []
                pa *= a[i]
                gi.append(i)
                i += 1
            else:
                pb *= b[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    return groups


def view_dim(a: Sequence[int], b: Sequence[int], dim: int, inner: int, seq: int) -> Shard | None:
    """Where the sequence factor (``seq`` long, stride ``inner`` in dim ``dim`` of shape ``a``) lands in
    shape ``b``; None when a view splits it across dims."""
    for gi, gj in view_groups(a, b):
        if dim not in gi:
            continue
        stride = inner * math.prod(a[k] for k in gi if k > dim)
        after = 1
        for o in reversed(gj):
            lo, hi = after, after * b[o]
            # the factor must sit whole inside dim o: o's stride divides it and it divides o's span
            if stride % lo == 0 and hi % (stride * seq) == 0:
                return Shard(o, stride // lo)
            after = hi
        return None
    return None


# Views: ``aten.VIEW_SIZES`` lists every op whose output is a regrouping of its input's dims. They are
# all handled by view_dim on (input shape, output shape), which needs only the two shapes and the sequence
# length. ``flatten``/``unflatten`` come from the pre-dispatch retrace and from the rewrite's own
# head-split / head-merge nodes (``passes/rewrite``).

# ``op(data, template)``: the template contributes only its shape (and dtype/device). The sharding pass
# rewrites them into the explicit-size op before anything else reads the graph (``explicit_template``),
# so the template's placement can never leak into the result.
TEMPLATE_SHAPE_OPS = {aten.view_as.default: aten.reshape.default,
                      aten.reshape_as.default: aten.reshape.default,
                      aten.expand_as.default: aten.expand.default}
# ``op(data, template, ...)``: the template contributes only its dtype/device; the result has the data's
# placement (never the template's: ``type_as(replicated, sharded)`` is replicated).
DTYPE_TEMPLATE_OPS = {aten.type_as.default, aten.to.other}
# ``template.new_*(size)``: a fresh constant of the given size; the template is read for dtype/device only.
NEW_FROM_TEMPLATE_OPS = {aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
                         aten.new_full.default}


def explicit_template(node: fx.Node) -> tuple[Any, tuple] | None:
    """(target, args) of the explicit-size spelling of a ``*_as`` op (static shapes only), else None."""
    target = TEMPLATE_SHAPE_OPS.get(node.target)
    out = shape_of(node)
    if target is None or out is None or any(isinstance(s, torch.SymInt) for s in val_of(node).shape):
        return None
    return target, (node.args[0], list(out))


# ---------------------------------------------------------------------------- op tables

SAME_SHAPE_OPS = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other,
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.dropout.default, aten.lift_fresh_copy.default, aten.masked_fill.Tensor, aten.masked_fill.Scalar,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    aten.type_as.default, aten.silu.default, aten.gelu.default, aten.relu.default,
    aten.fill.Scalar, aten.triu.default, aten.tril.default, aten.polar.default, aten.complex.default,
    aten.real.default, aten.imag.default,
}
# ops linear in their first argument: a Partial there may pass through unreduced
LINEAR_FIRST_OPS = {
    aten._to_copy.default, aten.to.dtype, aten.clone.default, aten.contiguous.default, aten.neg.default,
    aten.alias.default, aten.detach.default, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
    aten.div.Scalar,
}
REDUCE_SUM_OPS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default}
DIM_KEEPING_REDUCTIONS = {  # ops that keep every dim but combine values along one of them
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
    aten.cumsum.default, aten.cumprod.default,
}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}

def is_pointwise(target: Any) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


def inplace_twin(target: Any) -> Any:
    """The functional overload of an in-place aten op (``masked_fill_.Scalar`` -> ``masked_fill.Scalar``),
    else None. A write into a shard keeps the functional op's dim rule: it writes the local shard's rows, in
    place, as one device writes the whole tensor's (``copy_(dst, src)`` broadcasts src into dst)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.name.startswith("aten::") or not schema.name.endswith("_"):
        return None
    packet = getattr(aten, schema.name[len("aten::"):-1], None)
    return getattr(packet, schema.overload_name or "default", None) if packet is not None else None


def tensor_paths(node: fx.Node) -> list[ArgPath]:
    paths = []
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node) and isinstance(val_of(a), torch.Tensor):
            paths.append((i,))
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, fx.Node) and isinstance(val_of(b), torch.Tensor):
                    paths.append((i, j))
    return paths


def links_for(node: fx.Node) -> OpRule | None:
    """The dim rule of ``node``, or None for an op without a rule (computed replicated)."""
    t = node.target
    out = shape_of(node)
    fn = _SPECIAL.get(t)
    if fn is not None:
        return fn(node)
    if out is None:
        return None
    if is_pointwise(t) or t in SAME_SHAPE_OPS or inplace_twin(t) in SAME_SHAPE_OPS or t == aten.copy_.default:
        paths = tensor_paths(node)
        passive: tuple[ArgPath, ...] = ()
        if t in DTYPE_TEMPLATE_OPS:
            paths, passive = paths[:1], tuple(paths[1:])
        linear = ((0,),) if t in LINEAR_FIRST_OPS else ()
        if t in (aten.add.Tensor, aten.sub.Tensor):
            linear = tuple(paths)
        return OpRule(broadcast_links(node, paths, len(out), out), linear_in=linear, passive=passive)
    return None


def _cache_append(node: fx.Node) -> LocalShardRule | None:
    """``ringcompile::cache_append(keys, values, slots, new_k, new_v, positions, rank, world, prefill_len,
    prefill_layout, at_prefill, seq_layout)`` (``runtime/cache_append.py``): the prefill's new K/V
    (B, H, S, D; ``at_prefill``) may arrive as this rank's sequence shard when the cache stores its prefill
    in the graph's layout; the op then keeps exactly its own slots, so nothing is gathered for the cache.
    A later write (a prompt chunk, a decode step) has no rule: it takes full K/V."""
    if not arg_or_kwarg(node, 10, "at_prefill", False):
        return None
    wants = arg_or_kwarg(node, 9, "prefill_layout", "contiguous")
    return LocalShardRule((((3,), 2), ((4,), 2)), (11, "seq_layout"), wants)


# opaque ops (by qualified name: the passes do not import the runtime that registers them) that take
# sequence-sharded inputs as they are
LOCAL_SHARD_OPS: dict[str, Callable[[fx.Node], LocalShardRule]] = {
    "ringcompile::cache_append": _cache_append,
}


def local_shard_rule(node: fx.Node) -> LocalShardRule | None:
    """The LocalShardRule of ``node`` (an op in ``LOCAL_SHARD_OPS``), else None."""
    name = getattr(getattr(node.target, "_schema", None), "name", None)
    fn = LOCAL_SHARD_OPS.get(name) if node.op == "call_function" and name else None
    return fn(node) if fn is not None else None


# ---------------------------------------------------------------------------- special rules


def _new_from_template(node: fx.Node) -> OpRule:
    """``x.new_zeros(size)``: no dim of ``x`` reaches the output; ``x`` is read for dtype/device only."""
    return OpRule([], passive=tuple(tensor_paths(node)))


def _view_as_complex(node: fx.Node) -> OpRule:
    """(..., 2) real -> (...) complex: every dim but the last pair is kept (linear)."""
    n = len(shape_of(node))
    return OpRule([DimLink((0,), i, i) for i in range(n)], linear_in=((0,),))


def _view_as_real(node: fx.Node) -> OpRule:
    """(...) complex -> (..., 2) real: every dim is kept, a trailing pair added (linear)."""
    n = len(shape_of(node)) - 1
    return OpRule([DimLink((0,), i, i) for i in range(n)], linear_in=((0,),))


def _expand(node: fx.Node) -> OpRule:
    out = shape_of(node)
    return OpRule(broadcast_links(node, [(0,)], len(out), out))


def _permute(node: fx.Node) -> OpRule:
    perm = [norm_dim(d, len(shape_of(node))) for d in node.args[1]]
    return OpRule([DimLink((0,), p, o) for o, p in enumerate(perm)], linear_in=((0,),))


def _transpose(node: fx.Node) -> OpRule:
    n = len(shape_of(node))
    if node.target == aten.t.default:
        d0, d1 = (0, 1) if n == 2 else (0, 0)
    else:
        d0, d1 = node.args[1] % n, node.args[2] % n
    perm = list(range(n))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return OpRule([DimLink((0,), p, o) for o, p in enumerate(perm)], linear_in=((0,),))


def _unsqueeze(node: fx.Node) -> OpRule:
    n = len(shape_of(node))
    d = node.args[1] % n
    return OpRule([DimLink((0,), i, i if i < d else i + 1) for i in range(n - 1)], linear_in=((0,),))


def _squeeze(node: fx.Node) -> OpRule:
    s = shape_of(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    drop = [i for i in norm_dims(dims, len(s)) if s[i] == 1]
    links, o = [], 0
    for i in range(len(s)):
        if i in drop:
            continue
        links.append(DimLink((0,), i, o))
        o += 1
    return OpRule(links, linear_in=((0,),))


def _select(node: fx.Node) -> OpRule:
    s = shape_of(node.args[0])
    d = node.args[1] % len(s)
    return OpRule([DimLink((0,), i, i if i < d else i - 1) for i in range(len(s)) if i != d])


def _slice(node: fx.Node) -> OpRule:
    """Slicing keeps every dim; along the sliced dim only a full-range slice keeps the link."""
    s, out = shape_of(node.args[0]), shape_of(node)
    se, oe = sym_shape_of(node.args[0]), sym_shape_of(node)
    d = (node.args[1] if len(node.args) > 1 else 0) % len(s)
    keep = [i for i in range(len(s)) if i != d or (s[i] == out[i] and se[i] == oe[i])]
    return OpRule([DimLink((0,), i, i) for i in keep], linear_in=((0,),))


def _cat(node: fx.Node) -> OpRule:
    """Every dim but the cat dim links; the cat dim links too when all other inputs are empty along it
    (a K/V cache ``cat([past, k], dim=seq)`` with no past: the output is ``k``)."""
    out = shape_of(node)
    d = (node.args[1] if len(node.args) > 1 else 0) % len(out)
    links = []
    parts = []
    for path in tensor_paths(node):
        s = shape_of(get_arg(node, path))
        if s is None or len(s) != len(out):
            continue  # legacy empty tensors
        links += [DimLink(path, i, i) for i in range(len(s)) if i != d]
        parts.append((path, s))
    full = [path for path, s in parts if s[d] != 0]
    if len(full) == 1 and sym_shape_of(get_arg(node, full[0]))[d] == sym_shape_of(node)[d]:
        links.append(DimLink(full[0], d, d))
    return OpRule(links)


def _stack(node: fx.Node) -> OpRule:
    out = shape_of(node)
    d = (node.args[1] if len(node.args) > 1 else 0) % len(out)
    links = []
    for path in tensor_paths(node):
        s = shape_of(get_arg(node, path))
        links += [DimLink(path, i, i if i < d else i + 1) for i in range(len(s))]
    return OpRule(links)


def _split(node: fx.Node) -> OpRule:
    s = shape_of(node.args[0])
    if node.target == aten.unbind.int:
        d = (node.args[1] if len(node.args) > 1 else 0) % len(s)
        n = len(val_of(node))
        return OpRule([DimLink((0,), i, i if i < d else i - 1, k) for k in range(n)
                       for i in range(len(s)) if i != d])
    d = (node.args[2] if len(node.args) > 2 else 0) % len(s)
    n = len(val_of(node))
    return OpRule([DimLink((0,), i, i, k) for k in range(n) for i in range(len(s)) if i != d])


def _matmul_links(a_shape, b_shape, out_ndim, a_path=(0,), b_path=(1,)) -> list[DimLink]:
    links = []
    na, nb = len(a_shape), len(b_shape)
    if na == 1 or nb == 1:
        return []
    # batch dims (broadcast, right-aligned against out[:-2])
    for path, s in ((a_path, a_shape), (b_path, b_shape)):
        off = (out_ndim - 2) - (len(s) - 2)
        for i in range(len(s) - 2):
            if s[i] != 1:
                links.append(DimLink(path, i, i + off))
    links.append(DimLink(a_path, na - 2, out_ndim - 2))
    links.append(DimLink(b_path, nb - 1, out_ndim - 1))
    links.append(DimLink(a_path, na - 1, None))
    links.append(DimLink(b_path, nb - 2, None))
    return links


def _matmul(node: fx.Node) -> OpRule | None:
    out = shape_of(node)
    a, b = shape_of(node.args[0]), shape_of(node.args[1])
    if out is None or a is None or b is None:
        return None
    links = _matmul_links(a, b, len(out))
    return OpRule(links, reduce="sum") if links else None


def _addmm(node: fx.Node) -> OpRule | None:
    out = shape_of(node)
    a, b = shape_of(node.args[1]), shape_of(node.args[2])
    links = _matmul_links(a, b, len(out), (1,), (2,))
    links += broadcast_links(node, [(0,)], len(out), out)
    return OpRule(links, reduce="sum")


def _linear(node: fx.Node) -> OpRule | None:
    out = shape_of(node)
    x = shape_of(node.args[0])
    links = [DimLink((0,), i, i) for i in range(len(x) - 1)]
    links += [DimLink((1,), 0, len(out) - 1), DimLink((0,), len(x) - 1, None), DimLink((1,), 1, None)]
    if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        links.append(DimLink((2,), 0, len(out) - 1))
    return OpRule(links, reduce="sum")


def _convolution(node: fx.Node) -> OpRule | None:
    """Batch dim and the position-local spatial dims (kernel 1, stride 1, padding 0: ``passes.convolution``)
    keep their place. The weight and bias get no link: replicated, their gradients are summed over ranks
    like a linear layer's. Channels mix (by groups), so a sequence there has no rule, nor does a spatial
    dim a kernel, stride or padding changes (``why_unlinked`` says which)."""
    args = conv_args(node)
    if args is None or shape_of(node) is None:
        return None
    local = local_dims(node, args)
    links = [DimLink((0,), d, d) for d in ([0] if args.first_spatial == 2 else []) + local]
    ndim = len(shape_of(node.args[0]))
    why = {((0,), d): why_not_local(args, d) for d in range(args.first_spatial - 1, ndim) if d not in local}
    return OpRule(links, reduce="full", why_unlinked=why)


def _embedding(node: fx.Node) -> OpRule:
    ids = shape_of(node.args[1])
    out = shape_of(node)
    return OpRule([DimLink((1,), i, i) for i in range(len(ids))] + [DimLink((0,), 1, len(out) - 1)])


def _index(node: fx.Node) -> OpRule | None:
    """``x[..., idx, ...]`` with one integer index tensor at position k (``None`` before it): x's dims
    before k keep their place, idx's dims replace dim k, x's later dims follow them."""
    indices = list(node.args[1])
    x = shape_of(node.args[0])
    k = next((i for i, a in enumerate(indices) if a is not None), None)
    if k is None or x is None or any(a is not None for a in indices[k + 1:]):
        return None
    if not isinstance(indices[k], fx.Node) or val_of(indices[k]).dtype == torch.bool:
        return None
    idx = shape_of(indices[k])
    if idx is None:
        return None
    links = [DimLink((0,), i, i) for i in range(k)]
    links += [DimLink((1, k), j, k + j) for j in range(len(idx))]
    links += [DimLink((0,), i, len(idx) + i - 1) for i in range(k + 1, len(x))]
    return OpRule(links)


def _index_select(node: fx.Node) -> OpRule:
    x = shape_of(node.args[0])
    d = node.args[1] % len(x)
    links = [DimLink((0,), i, i) for i in range(len(x)) if i != d]
    return OpRule(links + [DimLink((2,), 0, d)])


def _reduce(node: fx.Node) -> OpRule:
    x = shape_of(node.args[0])
    t = node.target
    if t in (aten.sum.default, aten.mean.default):
        dims, keep = None, False
    else:
        dims = arg_or_kwarg(node, 1, "dim", None)
        keep = bool(arg_or_kwarg(node, 2, "keepdim", False))
    dims = norm_dims(dims if dims != [] else None, len(x))
    links, o = [], 0
    for i in range(len(x)):
        if i in dims:
            links.append(DimLink((0,), i, None))
            o += 1 if keep else 0
        else:
            links.append(DimLink((0,), i, o))
            o += 1
    kind = "mean" if t in (aten.mean.dim, aten.mean.default) else "sum"
    return OpRule(links, reduce=kind, linear_in=((0,),))


def _reduce_other(node: fx.Node) -> OpRule:
    """amax/amin/max.dim/var/std...: a reduced sequence dim needs the full sequence."""
    rule = _reduce(node)
    rule.reduce, rule.linear_in = "full", ()
    return rule


def _dim_keeping(node: fx.Node) -> OpRule:
    x = shape_of(node.args[0])
    d = node.args[1] % len(x)
    return OpRule([DimLink((0,), i, i if i != d else None) for i in range(len(x))], reduce="full")


def _norm(node: fx.Node) -> OpRule:
    x = shape_of(node.args[0])
    nshape = list(node.args[1])
    k = len(x) - len(nshape)
    multi = node.target == aten.native_layer_norm.default
    links = []
    outs = (0, 1, 2) if multi else (None,)
    for oi in outs:
        links += [DimLink((0,), i, i if i < k else None, oi) for i in range(len(x))]
    for path in tensor_paths(node)[1:]:
        s = shape_of(get_arg(node, path))
        for oi in outs[:1]:
            links += [DimLink(path, i, len(x) - len(s) + i, oi) for i in range(len(s))]
    return OpRule(links, reduce="full")


def _native_dropout(node: fx.Node) -> OpRule:
    x = shape_of(node.args[0])
    return OpRule([DimLink((0,), i, i, k) for k in (0, 1) for i in range(len(x))])


def _where(node: fx.Node) -> OpRule:
    out = shape_of(node)
    return OpRule(broadcast_links(node, tensor_paths(node), len(out), out))


_SPECIAL: dict[Any, Callable[[fx.Node], OpRule | None]] = {
    aten.expand.default: _expand,
    aten.broadcast_to.default: _expand,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.t.default: _transpose,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.select.int: _select,
    aten.slice.Tensor: _slice,
    aten.cat.default: _cat,
    aten.concatenate.default: _cat,  # torch.concatenate (Zamba2), kept by the pre-dispatch retrace
    aten.stack.default: _stack,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.chunk.default: _split,
    aten.unbind.int: _split,
    aten.matmul.default: _matmul,
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    aten.addmm.default: _addmm,
    aten.linear.default: _linear,
    aten.embedding.default: _embedding,
    **{op: _convolution for op in CONV_ARGS},
    aten.index.Tensor: _index,
    aten.index_select.default: _index_select,
    aten.native_dropout.default: _native_dropout,
    aten.where.self: _where,
    aten.view_as_complex.default: _view_as_complex,
    aten.view_as_real.default: _view_as_real,
    **{op: _new_from_template for op in NEW_FROM_TEMPLATE_OPS},
    **{op: _reduce for op in REDUCE_SUM_OPS},
    **{op: _reduce_other for op in (aten.amax.default, aten.amin.default, aten.var.correction,
                                    aten.std.correction, aten.var.dim, aten.std.dim)},
    **{op: _dim_keeping for op in DIM_KEEPING_REDUCTIONS},
    **{op: _norm for op in NORM_OPS},
}

GETITEM = operator.getitem
