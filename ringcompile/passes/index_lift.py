"""Lift mask/bias subgraphs into functions of global indices.

A tensor value in the mask-building subgraph of a normalised (aten) graph is treated as a
function of the index of each of its dims. ``IndexLifter.lift(node, idx)`` emits, into a
small FX graph over ``(b, h, q_idx, kv_idx, *extras)`` (or ``(score, b, h, ...)``), the
expression for ``node[idx]``: arange becomes the index itself, triu/tril become index
comparisons, slices/views/permutes remap indices, pointwise ops apply to lifted operands,
and any value that is not a function of indices (a padding mask input, ALiBi slopes, a dense
bias) becomes an *extra* looked up at the lifted indices. The S x S mask is never built.

The emitted graph uses Python operators, ``torch.where``/``torch.tanh``-style functions,
``x.to(dtype)`` and ``extra[i0, i1, ...]`` lookups only, so kernels can lower it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from ringcompile.errors import UnsupportedPatternError

from .aten import (
    CASTS,
    CREATION,
    EXAMPLE_KEY,
    IDENTITY,
    RESHAPES,
    SHAPE_ONLY,
    SOURCE_KEY,
    dtype_of,
    functional_packet,
    is_one,
    mutated_in_place,
    norm_dim,
    shape_or_raise,
    static_int,
    tensor_val,
    value_users,
)
from .aten import functional_packet as packet_of
from .pointwise import LIFTED, aten_one_to_one

aten = torch.ops.aten
__all__ = ["SHAPE_ONLY", "dtype_of", "is_one", "packet_of", "static_int", "tensor_val"]  # re-exported
Expr = Any  # fx.Node of the lifted graph, or a Python bool/int/float constant
Idx = tuple[Expr, ...]

ROLE_NAMES = {"b": "b", "h": "h", "q": "q_idx", "kv": "kv_idx"}


class NotLiftable(Exception):
    """Internal: this value is not a function of indices (it becomes an extra)."""


# ---------------------------------------------------------------------------- small helpers


def shape_of(n: fx.Node) -> tuple:
    """The shape of a tensor node as the graph holds it; NotLiftable when it holds no tensor."""
    return shape_or_raise(n, NotLiftable)


def real_constant(n: fx.Node) -> torch.Tensor | None:
    """The real value of a constant tensor node: a get_attr, or a buffer placeholder's example."""
    val: Any = None
    if n.op == "get_attr":
        mod = n.graph.owning_module
        val = _getattr_path(mod, str(n.target)) if mod is not None else None
    elif n.op == "placeholder":
        val = n.meta.get(EXAMPLE_KEY)
        if isinstance(val, torch.Tensor) and (val.requires_grad or isinstance(val, torch.nn.Parameter)):
            return None  # a parameter is trained: never bake its current value into a mod
    if isinstance(val, torch.Tensor) and not isinstance(val, torch._subclasses.FakeTensor):
        return val.detach()
    return None


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_CONST_FOLLOW = (aten.lift_fresh_copy, aten.clone, aten.detach, aten.alias)


def static_number(x: Any) -> float | int | bool | None:
    """The value of a scalar argument when it is static: Python numbers, sym nodes, 0-dim constants."""
    if isinstance(x, (bool, int, float)):
        return x
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(x)](x)
    if not isinstance(x, fx.Node):
        return None
    val = x.meta.get("val")
    if isinstance(val, (bool, int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return static_number(val)
    if not isinstance(val, torch.Tensor) or val.dim() != 0:
        return None
    const = real_constant(x)
    if const is not None:
        return const.item()
    packet = getattr(x.target, "overloadpacket", None)
    if packet in _CONST_FOLLOW:
        return static_number(x.args[0])
    if packet is aten.scalar_tensor:
        return static_number(x.args[0])
    if packet is aten.full and not x.args[0]:
        return static_number(x.args[1])
    return None


def is_huge_negative(v: Any) -> bool:
    """Constants that mask a score when added or filled in (-inf, finfo.min, -1e9, -10000)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v <= -1e4


def bcast_idx(operand_shape: Sequence, idx: Idx) -> Idx:
    """Index of a broadcast operand: right-aligned, size-1 dims read index 0."""
    m, r = len(operand_shape), len(idx)
    if m > r:
        raise NotLiftable("operand has more dims than the result")
    return tuple(0 if is_one(operand_shape[j]) else idx[r - m + j] for j in range(m))


# ---------------------------------------------------------------------------- graph builder


def _where(c: Any, x: Any, y: Any) -> Any:
    return x if c else y


# constant folding: the shared pointwise table's folds, and where; other operator functions fold as is
_FOLD: dict[Callable, Callable] = {fn: op.fold for fn, op in LIFTED.items() if op.fold is not None}
_FOLD[torch.where] = _where


class ModGraphBuilder:
    """Emits the lifted expression graph: placeholders (score?), b, h, q_idx, kv_idx, extras."""

    def __init__(self, with_score: bool):
        self.graph = fx.Graph()
        self.with_score = with_score
        self.score = self.graph.placeholder("score") if with_score else None
        self.roles = {role: self.graph.placeholder(name) for role, name in ROLE_NAMES.items()}
        self._last_placeholder = self.roles["kv"]
        self.extras: list[fx.Node] = []            # original-graph nodes
        self._extra_ph: dict[fx.Node, fx.Node] = {}  # original node -> placeholder
        self.extra_dtypes: dict[fx.Node, torch.dtype] = {}  # placeholder -> dtype

    def extra(self, orig: fx.Node) -> fx.Node:
        ph = self._extra_ph.get(orig)
        if ph is None:
            with self.graph.inserting_after(self._last_placeholder):
                ph = self.graph.placeholder(f"extra{len(self.extras)}")
            self._last_placeholder = ph
            self._extra_ph[orig] = ph
            self.extras.append(orig)
            dt = dtype_of(orig)
            if dt is not None:
                self.extra_dtypes[ph] = dt
        return ph

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Expr:
        flat = list(args) + list(kwargs.values())
        flat += [a for t in flat if isinstance(t, (tuple, list)) for a in t]
        if not any(isinstance(a, fx.Node) for a in flat):
            folder = _FOLD.get(fn, fn if fn.__module__ in ("_operator", "operator") else None)
            if folder is not None and not kwargs:
                return folder(*args)
        return self.graph.call_function(fn, tuple(args), kwargs)

    # arithmetic with constant simplification --------------------------------------------
    def add(self, x: Expr, y: Expr) -> Expr:
        return self._unless_identity(operator.add, x, y, identity=0)

    def sub(self, x: Expr, y: Expr) -> Expr:
        return x if _is_const(y, 0) else self.call(operator.sub, x, y)

    def mul(self, x: Expr, y: Expr) -> Expr:
        return self._unless_identity(operator.mul, x, y, identity=1)

    def _unless_identity(self, fn: Callable, x: Expr, y: Expr, identity: int) -> Expr:
        """``fn(x, y)``, or the other operand when one is the op's identity constant."""
        if _is_const(y, identity):
            return x
        if _is_const(x, identity):
            return y
        return self.call(fn, x, y)

    def and_(self, x: Expr, y: Expr) -> Expr:
        return self._logical(operator.and_, x, y, absorbing=False)

    def or_(self, x: Expr, y: Expr) -> Expr:
        return self._logical(operator.or_, x, y, absorbing=True)

    def _logical(self, fn: Callable, x: Expr, y: Expr, absorbing: bool) -> Expr:
        """``fn(x, y)`` folded when an operand is a constant: the absorbing one wins, the other drops out."""
        for a, b in ((x, y), (y, x)):
            if a is absorbing:
                return absorbing
            if a is (not absorbing):
                return b
        return self.call(fn, x, y)

    def not_(self, x: Expr) -> Expr:
        if isinstance(x, bool):
            return not x
        if isinstance(x, fx.Node) and x.target is operator.invert and x.op == "call_function":
            return x.args[0]
        return self.call(operator.invert, x)

    def where(self, c: Expr, x: Expr, y: Expr, logical: bool = False,
              dtype: torch.dtype | None = None) -> Expr:
        """``where(c, x, y)``; ``logical`` says x and y are both bool-valued (then a constant
        branch folds into and/or; with a numeric branch it must stay a where). ``dtype``: the dtype of a
        branch that was a 0-dim tensor in the original graph (``torch.full((), 0.0, dtype=float64)``)."""
        if isinstance(c, bool):
            return x if c else y
        if x is True and y is False:
            return c
        if x is False and y is True:
            return self.not_(c)
        if logical and isinstance(x, bool) and isinstance(y, fx.Node):
            return self.or_(self.and_(c, x), self.and_(self.not_(c), y))
        if logical and isinstance(y, bool) and isinstance(x, fx.Node):
            return self.or_(self.and_(c, x), self.and_(self.not_(c), y))
        if isinstance(x, fx.Node) and x is y:
            return x
        if not isinstance(c, fx.Node) or not _beyond_float32(x, y, dtype):
            return self.call(torch.where, c, x, y)
        # two Python numbers make a float32 where: float64's finfo.min (Falcon's alibi mask) would overflow
        x = self.call(torch.scalar_tensor, x, dtype=dtype) if _is_number(x) else x
        return self.call(torch.where, c, x, y)

    def cast(self, x: Expr, dtype: torch.dtype) -> Expr:
        if isinstance(x, (bool, int, float)):
            if dtype == torch.bool:
                return bool(x)
            if dtype.is_floating_point:
                return float(x)
            return int(x)
        return self.graph.call_method("to", (x, dtype))

    def to_bool(self, x: Expr, dtype: torch.dtype | None) -> Expr:
        if dtype == torch.bool or isinstance(x, bool):
            return bool(x) if isinstance(x, (int, float)) else x
        if isinstance(x, (int, float)):
            return x != 0
        return self.call(operator.ne, x, 0)

    def role(self, name: str) -> fx.Node:
        return self.roles[name]

    def finish(self, out: Expr) -> fx.GraphModule:
        """Close the graph, drop dead nodes and unused extras, and return it as a GraphModule."""
        if not isinstance(out, fx.Node):
            # a constant result: keep it a tensor of the right broadcast shape
            if self.with_score:
                out = self.call(operator.add, self.call(operator.mul, self.score, 0), out)
            else:
                kv = self.roles["kv"]
                out = self.call(operator.ge, kv, 0) if out else self.call(operator.lt, kv, 0)
        self.graph.output(out)
        self.graph.eliminate_dead_code()
        for orig, ph in list(self._extra_ph.items()):
            if not ph.users:
                self.graph.erase_node(ph)
                self.extras.remove(orig)
                del self._extra_ph[orig]
                self.extra_dtypes.pop(ph, None)
        self.graph.lint()
        return fx.GraphModule(torch.nn.Module(), self.graph)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _beyond_float32(x: Any, y: Any, dtype: torch.dtype | None) -> bool:
    """Both branches are Python numbers, one outside float32's range, and the where is wider."""
    big = torch.finfo(torch.float32).max
    if dtype is None or not dtype.is_floating_point or torch.finfo(dtype).max <= big:
        return False
    return _is_number(x) and _is_number(y) and max(abs(x), abs(y)) > big


def _is_const(x: Any, value: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == value


# ---------------------------------------------------------------------------- the lifter


def _written_elsewhere(n: fx.Node) -> bool:
    """Some op writes into ``n``'s value, and that op is not ``n``'s only value reader read as its
    functional twin (``zeros().masked_fill_(..)``: the lift reads ``n`` as the twin's input, before the
    write). Then ``n``'s op (a creation fill, a view) does not say what its readers see."""
    if not mutated_in_place(n):
        return False
    readers = value_users(n)
    if len(readers) != 1:
        return True
    w = readers[0]
    as_twin = functional_packet(w) is not getattr(w.target, "overloadpacket", None)
    return not (w.args and w.args[0] is n and as_twin)


def creation_value(n: fx.Node) -> Any:
    """The constant a creation op fills its tensor with (cast to its dtype), or None."""
    p = packet_of(n)
    if p not in CREATION or _written_elsewhere(n):  # a fill written over later is not the fill
        return None
    if p in (aten.ones, aten.ones_like, aten.new_ones):
        v: Any = 1
    elif p in (aten.zeros, aten.zeros_like, aten.new_zeros):
        v = 0
    elif p is aten.scalar_tensor:
        v = static_number(n.args[0])
    elif p is aten.new_full:
        v = static_number(n.args[2])
    else:
        v = static_number(n.args[1])
    if v is None:
        return None
    dt = dtype_of(n)
    if dt == torch.bool:
        return bool(v)
    if dt is not None and not dt.is_floating_point:
        return int(v)
    return float(v)


class IndexLifter:
    """Lifts original-graph nodes into a ModGraphBuilder at given index expressions."""

    def __init__(self, builder: ModGraphBuilder, consumed: set[fx.Node], notes: list[str]):
        self.b = builder
        self.consumed = consumed
        self.notes = notes
        self._memo: dict[tuple, Expr] = {}
        # flat offsets a reshape merged: node -> (the merged indices, their sizes), so splitting it back
        # with the same sizes gives the indices themselves (see _reshape_idx)
        self._merged: dict[fx.Node, tuple[Idx, tuple[int | None, ...]]] = {}

    # public -------------------------------------------------------------------------------
    def lift(self, n: Any, idx: Idx) -> Expr:
        """Expression for ``n[idx]``; values that are not index functions become extras."""
        if not isinstance(n, fx.Node):
            return n
        key = (n, idx)
        if key in self._memo:
            return self._memo[key]
        try:
            out = self._lift(n, idx)
        except NotLiftable as e:
            out = self.extra_lookup(n, idx, str(e))
        self._memo[key] = out
        return out

    def lift_broadcast(self, n: Any, idx: Idx) -> Expr:
        """``n`` broadcast against a result indexed by ``idx``."""
        if not isinstance(n, fx.Node):
            return n
        if tensor_val(n) is None:
            v = static_number(n)
            if v is None:
                raise NotLiftable(f"{n} is a non-static scalar")
            return v
        return self.lift(n, bcast_idx(shape_of(n), idx))

    def extra_lookup(self, n: fx.Node, idx: Idx, reason: str = "") -> Expr:
        ph = self.b.extra(n)
        if reason:
            msg = f"{n.name} kept as a tensor input: {reason}"
            if msg not in self.notes:
                self.notes.append(msg)
        if not idx:
            return ph
        return self.b.call(operator.getitem, ph, tuple(idx))

    def remap(self, n: fx.Node, idx: Idx) -> tuple[fx.Node, Idx] | None:
        """For pure index-remapping ops (views, slices, permutes...): the source and its index."""
        p = packet_of(n)
        if p is None:
            return None
        a = n.args
        if p in IDENTITY:
            return a[0], idx
        if p is aten.slice:
            x = a[0]
            rank = len(shape_of(x))
            dim = norm_dim(a[1] if len(a) > 1 else 0, rank)
            start = a[2] if len(a) > 2 else None
            step = a[4] if len(a) > 4 else 1
            start = 0 if start is None else static_int(start)
            step = static_int(step)
            if start is None or step is None:
                raise NotLiftable("slice with a dynamic start or step")
            if start < 0:
                size = static_int(shape_of(x)[dim])
                if size is None:
                    raise NotLiftable("negative slice start on a dynamic dim")
                start = max(start + size, 0)
            new = list(idx)
            new[dim] = self.b.add(start, self.b.mul(idx[dim], step))
            return x, tuple(new)
        if p is aten.select:
            x = a[0]
            rank = len(shape_of(x))
            dim = norm_dim(a[1], rank)
            index = static_int(a[2])
            if index is None:
                raise NotLiftable("select with a dynamic index")
            if index < 0:
                size = static_int(shape_of(x)[dim])
                if size is None:
                    raise NotLiftable("negative select index on a dynamic dim")
                index += size
            return x, idx[:dim] + (index,) + idx[dim:]
        if p is aten.unsqueeze:
            dim = norm_dim(a[1], len(idx))
            return a[0], idx[:dim] + idx[dim + 1:]
        if p is aten.squeeze:
            x = a[0]
            xs = shape_of(x)
            if len(a) > 1:
                dims = a[1] if isinstance(a[1], (list, tuple)) else [a[1]]
                dims = {norm_dim(d, len(xs)) for d in dims}
            else:
                dims = set(range(len(xs)))
            it = iter(idx)
            return x, tuple(0 if (j in dims and is_one(xs[j])) else next(it) for j in range(len(xs)))
        if p is aten.expand or p is aten.expand_as:  # expand_as reads its template's shape only
            x = a[0]
            return x, bcast_idx(shape_of(x), idx)
        if p is aten.permute:
            perm = [norm_dim(d, len(idx)) for d in a[1]]
            new: list[Expr] = [0] * len(idx)
            for i, d in enumerate(perm):
                new[d] = idx[i]
            return a[0], tuple(new)
        if p is aten.transpose:
            d0, d1 = norm_dim(a[1], len(idx)), norm_dim(a[2], len(idx))
            new = list(idx)
            new[d0], new[d1] = idx[d1], idx[d0]
            return a[0], tuple(new)
        if p is aten.t:
            return a[0], tuple(reversed(idx))
        if p in RESHAPES or p is aten.view_as or p is aten.reshape_as:
            x = a[0]
            return x, self._reshape_idx(shape_of(x), shape_of(n), idx)
        return None

    def _reshape_idx(self, xs: tuple, ns: tuple, idx: Idx) -> Idx:
        """Source index of a row-major reshape ``xs -> ns``.

        Unit dims and equal dims map one to one. A group of dims that splits or merges (e.g.
        B*H <-> (B, H)) maps through flat offsets, but only with static sizes and never
        touching the last two dims (the sequence dims of a mask): a reshape that merges the
        sequence dim is not a function of (q, kv) we want to lift, so it stays dense.
        """
        B = self.b
        new: list[Expr] = [0] * len(xs)
        i = j = 0
        protected_x = set(range(max(len(xs) - 2, 0), len(xs)))
        protected_n = set(range(max(len(ns) - 2, 0), len(ns)))
        while i < len(xs) or j < len(ns):
            if i < len(xs) and is_one(xs[i]):
                i += 1
                continue
            if j < len(ns) and is_one(ns[j]):
                j += 1
                continue
            if i >= len(xs) or j >= len(ns):
                raise NotLiftable("reshape with mismatched sizes")
            if bool(xs[i] == ns[j]):
                new[i] = idx[j]
                i, j = i + 1, j + 1
                continue
            gi, gj = [i], [j]
            px, pn = static_int(xs[i]), static_int(ns[j])
            i, j = i + 1, j + 1
            while px is not None and pn is not None and px != pn:
                if px < pn and i < len(xs):
                    size = static_int(xs[i])
                    px = px * size if size is not None else None
                    gi.append(i)
                    i += 1
                elif pn < px and j < len(ns):
                    size = static_int(ns[j])
                    pn = pn * size if size is not None else None
                    gj.append(j)
                    j += 1
                else:
                    break
            if px is None or pn is None or px != pn or protected_x & set(gi) or protected_n & set(gj):
                raise NotLiftable("mask kept dense: reshape merges or splits a non-unit dim "
                                  "(e.g. the sequence dim)")
            flat: Expr = 0
            for d in gj:  # row-major offset within the group
                flat = B.add(B.mul(flat, static_int(ns[d])), idx[d])
            sizes_x = tuple(static_int(xs[d]) for d in gi)
            if len(gj) > 1 and isinstance(flat, fx.Node):
                self._merged[flat] = (tuple(idx[d] for d in gj), tuple(static_int(ns[d]) for d in gj))
            known = self._merged.get(flat) if isinstance(flat, fx.Node) else None
            if known is not None and known[1] == sizes_x:
                # a round trip (B, H) -> B*H -> (B, H): (b*H + h) // H is b and (b*H + h) % H is h
                for d, part in zip(gi, known[0], strict=True):
                    new[d] = part
                continue
            stride = 1
            for d in reversed(gi):
                size = static_int(xs[d])
                part = B.call(operator.floordiv, flat, stride) if stride != 1 else flat
                new[d] = B.call(operator.mod, part, size) if d != gi[0] else part
                stride *= size
        return tuple(new)

    # the interpreter ------------------------------------------------------------------------
    def _lift(self, n: fx.Node, idx: Idx) -> Expr:
        val = tensor_val(n)
        if val is None:
            v = static_number(n)
            if v is None:
                raise NotLiftable(f"{n.name} is not a tensor or static number")
            return v
        if n.op in ("placeholder", "get_attr"):
            return self._lift_input(n, idx)
        if n.op != "call_function":
            raise NotLiftable(f"{n.op} node")
        if _written_elsewhere(n):
            raise UnsupportedPatternError(
                f"{n.name} is written in place (directly or through a view) by an op other than its one "
                "reader, so its value where the attention reads it is not the one its op computed")
        remapped = self.remap(n, idx)
        if remapped is not None:
            self.consumed.add(n)
            return self.lift(*remapped)
        p = packet_of(n)
        out = self._lift_op(n, p, idx)
        self.consumed.add(n)
        return out

    def _lift_input(self, n: fx.Node, idx: Idx) -> Expr:
        const = real_constant(n)
        if const is None:
            return self.extra_lookup(n, idx)
        if const.dim() == 0:
            return const.item()
        band = toeplitz_band(const)
        if band is None:
            return self.extra_lookup(n, idx, "constant tensor that is not an index pattern")
        lo, hi, n_rows, n_cols = band
        source = n.meta.get(SOURCE_KEY, n.name)
        note = f"{source}: constant buffer assumed constant (band pattern kv-q in [{lo}, {hi}])"
        if note not in self.notes:
            self.notes.append(note)
        d = self.b.sub(idx[-1], idx[-2])
        cond: Expr = True
        if lo > -(n_rows - 1):
            cond = self.b.and_(cond, self.b.call(operator.ge, d, lo))
        if hi < n_cols - 1:
            cond = self.b.and_(cond, self.b.call(operator.le, d, hi))
        if lo > hi:
            cond = False
        return self.b.cast(cond, const.dtype) if const.dtype != torch.bool else cond

    def _lift_op(self, n: fx.Node, p: Any, idx: Idx) -> Expr:
        B = self.b
        a = n.args
        cv = creation_value(n)
        if cv is not None:
            return cv
        if p is aten.arange:
            nums = [static_int(x) if not isinstance(x, float) else x for x in a]
            if len(a) == 1:
                start, step = 0, 1
            else:
                start = nums[0]
                step = nums[2] if len(a) > 2 else 1
            step = n.kwargs.get("step", step)
            if start is None or step is None or isinstance(start, float) or isinstance(step, float):
                raise NotLiftable("arange with a dynamic or float start/step")
            out = B.add(start, B.mul(idx[0], step))
            dt = dtype_of(n)
            return B.cast(out, dt) if dt is not None and dt.is_floating_point else out
        if p is aten.eye:
            cond = B.call(operator.eq, idx[0], idx[1])
            dt = dtype_of(n)
            return cond if dt == torch.bool else B.cast(cond, dt)
        if p in (aten.triu, aten.tril):
            x = self.lift(a[0], idx)
            diag = static_int(a[1]) if len(a) > 1 else 0
            if diag is None:
                raise NotLiftable("triu/tril with a dynamic diagonal")
            d = B.sub(idx[-1], idx[-2])
            cond = B.call(operator.ge if p is aten.triu else operator.le, d, diag)
            zero = _zero_of(dtype_of(n))
            return B.where(cond, x, zero, logical=dtype_of(n) == torch.bool, dtype=dtype_of(n))
        if p in CASTS:
            src = a[0]
            x = self.lift(src, idx)
            dt_out, dt_in = dtype_of(n), dtype_of(src)
            return x if dt_out == dt_in or dt_out is None else B.cast(x, dt_out)
        if p is aten.index:
            return self._lift_index(n, idx)
        if p is aten.gather:  # out[i] = x[i with i[dim] replaced by index[i]] (DeBERTa's relative positions)
            x, dim, index = a[0], norm_dim(a[1], len(idx)), a[2]
            at = self.lift(index, idx)
            return self.lift(x, idx[:dim] + (at,) + idx[dim + 1:])
        if p is aten.embedding:
            weight, indices = a[0], a[1]
            i = self.lift(indices, idx[:-1])
            return self.lift(weight, (i, idx[-1]))
        handler = POINTWISE.get(p)
        if handler is None:
            raise NotLiftable(f"op {n.target} is not index-liftable")
        args = [self._operand(x, idx) for x in a]
        kwargs = {k: self._operand(x, idx) for k, x in n.kwargs.items()}
        dtypes = [dtype_of(x) for x in a]
        return handler(B, args, kwargs, dtypes)

    def _operand(self, x: Any, idx: Idx) -> Any:
        if isinstance(x, fx.Node):
            return self.lift_broadcast(x, idx)
        if isinstance(x, (list, tuple)):
            return type(x)(self._operand(e, idx) for e in x)
        return x

    def _lift_index(self, n: fx.Node, idx: Idx) -> Expr:
        x, indices = n.args[0], list(n.args[1])
        xs = shape_of(x)
        indices += [None] * (len(xs) - len(indices))
        pos = [i for i, t in enumerate(indices) if t is not None]
        if not pos:
            return self.lift(x, idx)
        for i in pos:
            if dtype_of(indices[i]) in (torch.bool, torch.uint8):
                raise NotLiftable("boolean-mask indexing")
        shapes = [shape_of(indices[i]) for i in pos]
        br = max(len(s) for s in shapes)
        adjacent = pos == list(range(pos[0], pos[-1] + 1))
        if adjacent:
            bidx = idx[pos[0]:pos[0] + br]
            rest = list(idx[:pos[0]]) + list(idx[pos[0] + br:])
        else:
            bidx = idx[:br]
            rest = list(idx[br:])
        rest_it = iter(rest)
        x_idx = []
        for j in range(len(xs)):
            if indices[j] is not None:
                x_idx.append(self.lift_broadcast(indices[j], bidx))
            else:
                x_idx.append(next(rest_it))
        return self.lift(x, tuple(x_idx))


def _zero_of(dtype: torch.dtype | None) -> Any:
    if dtype == torch.bool:
        return False
    if dtype is not None and dtype.is_floating_point:
        return 0.0
    return 0


def toeplitz_band(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """If ``t``'s last two dims are a 0/1 band matrix (value depends only on col - row and is
    nonzero exactly for col - row in [lo, hi]), return (lo, hi, rows, cols); leading dims must
    be size 1. tril(ones) gives (-(rows-1), 0)."""
    if t.dim() < 2 or any(s != 1 for s in t.shape[:-2]) or t.numel() > 64 * 1024 * 1024:
        return None
    m = t.reshape(t.shape[-2], t.shape[-1])
    if m.is_floating_point() or m.is_complex():
        if not bool(((m == 0) | (m == 1)).all()):
            return None
    elif m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            return None
    m = m != 0
    rows, cols = m.shape
    if rows > 1 and cols > 1 and not torch.equal(m[1:, 1:], m[:-1, :-1]):
        return None
    # value at offset d = col - row: first column gives d <= 0, first row d >= 0
    offsets = list(range(-(rows - 1), cols))
    values = [bool(m[-d, 0]) if d < 0 else bool(m[0, d]) for d in offsets]
    kept = [d for d, v in zip(offsets, values, strict=True) if v]
    if not kept:
        return (1, 0, rows, cols)  # empty band
    lo, hi = kept[0], kept[-1]
    if len(kept) != hi - lo + 1:
        return None
    return lo, hi, rows, cols


# ---------------------------------------------------------------------------- pointwise table


def _all_bool(values: Sequence, dtypes: Sequence) -> bool:
    """Every operand is bool-valued (bool tensors or Python bools)."""
    return all(isinstance(v, bool) or (dt == torch.bool and not isinstance(v, (int, float)))
               for v, dt in zip(values, dtypes, strict=True))


def _float_dtype(dtypes: Sequence) -> torch.dtype | None:
    return next((d for d in dtypes if d is not None and d.is_floating_point), None)


def _alpha(args: list, kwargs: dict, pos: int = 2) -> Any:
    return kwargs.get("alpha", args[pos] if len(args) > pos else 1)


def _logical(fn: Callable) -> Callable:
    def h(B: ModGraphBuilder, args: list, kwargs: dict, dtypes: list) -> Expr:
        x, y = B.to_bool(args[0], dtypes[0]), B.to_bool(args[1], dtypes[1])
        return fn(B, x, y)
    return h


def _bitwise(fn: Callable, logical: Callable) -> Callable:
    def h(B: ModGraphBuilder, args: list, kwargs: dict, dtypes: list) -> Expr:
        if all(d in (torch.bool, None) for d in dtypes[:2]):
            return logical(B, args[0], args[1])
        return B.call(fn, args[0], args[1])
    return h


def _same_operands(fn: Callable, arity: int) -> Callable:
    """Handler for an aten op that lifts to ``fn`` on the same operands (``passes.pointwise``)."""
    return lambda B, args, kwargs, dtypes: B.call(fn, *args[:arity])


def _div(B: ModGraphBuilder, args: list, kwargs: dict, dtypes: list) -> Expr:
    mode = kwargs.get("rounding_mode", args[2] if len(args) > 2 else None)
    if mode is None:
        return B.call(operator.truediv, args[0], args[1])
    if mode == "floor":
        return B.call(operator.floordiv, args[0], args[1])
    return B.call(torch.div, args[0], args[1], rounding_mode=mode)


def _not(B: ModGraphBuilder, args: list, kwargs: dict, dtypes: list) -> Expr:
    if dtypes[0] in (torch.bool, None) or isinstance(args[0], bool):
        return B.not_(args[0])
    return B.call(operator.invert, args[0])


def _clamp(B: ModGraphBuilder, args: list, kwargs: dict, dtypes: list) -> Expr:
    lo = kwargs.get("min", args[1] if len(args) > 1 else None)
    hi = kwargs.get("max", args[2] if len(args) > 2 else None)
    if isinstance(args[0], (int, float)) and not isinstance(lo, fx.Node) and not isinstance(hi, fx.Node):
        v = args[0]
        v = max(v, lo) if lo is not None else v
        return min(v, hi) if hi is not None else v
    return B.call(torch.clamp, args[0], min=lo, max=hi)


def _minmax(fn: Callable, keyword: str) -> Callable:
    def h(B: ModGraphBuilder, args: list, kwargs: dict, dtypes: list) -> Expr:
        x, y = args[0], args[1]
        if not isinstance(x, fx.Node) and not isinstance(y, fx.Node):
            return (max if keyword == "min" else min)(x, y)
        if not isinstance(y, fx.Node):
            return B.call(torch.clamp, x, **{keyword: y})
        if not isinstance(x, fx.Node):
            return B.call(torch.clamp, y, **{keyword: x})
        return B.call(fn, x, y)
    return h


POINTWISE: dict[Any, Callable[..., Expr]] = {
    aten.add: lambda B, a, k, d: B.add(a[0], B.mul(a[1], _alpha(a, k))),
    aten.sub: lambda B, a, k, d: B.sub(a[0], B.mul(a[1], _alpha(a, k))),
    aten.rsub: lambda B, a, k, d: B.sub(a[1], B.mul(a[0], _alpha(a, k))),
    aten.mul: lambda B, a, k, d: B.mul(a[0], a[1]),
    aten.div: _div,
    aten.floor_divide: lambda B, a, k, d: B.call(operator.floordiv, a[0], a[1]),
    aten.remainder: lambda B, a, k, d: B.call(operator.mod, a[0], a[1]),
    aten.reciprocal: lambda B, a, k, d: B.call(operator.truediv, 1.0, a[0]),
    aten.pow: lambda B, a, k, d: B.call(operator.pow, a[0], a[1]),
    aten.clamp: _clamp,
    aten.clamp_min: lambda B, a, k, d: _clamp(B, [a[0], a[1], None], {}, d),
    aten.clamp_max: lambda B, a, k, d: _clamp(B, [a[0], None, a[1]], {}, d),
    aten.maximum: _minmax(torch.maximum, "min"),
    aten.minimum: _minmax(torch.minimum, "max"),
    aten.logical_and: _logical(lambda B, x, y: B.and_(x, y)),
    aten.logical_or: _logical(lambda B, x, y: B.or_(x, y)),
    aten.logical_xor: _logical(lambda B, x, y: B.call(operator.xor, x, y)),
    aten.logical_not: lambda B, a, k, d: B.not_(B.to_bool(a[0], d[0])),
    aten.bitwise_and: _bitwise(operator.and_, lambda B, x, y: B.and_(x, y)),
    aten.__and__: _bitwise(operator.and_, lambda B, x, y: B.and_(x, y)),
    aten.bitwise_or: _bitwise(operator.or_, lambda B, x, y: B.or_(x, y)),
    aten.__or__: _bitwise(operator.or_, lambda B, x, y: B.or_(x, y)),
    aten.bitwise_xor: _bitwise(operator.xor, lambda B, x, y: B.call(operator.xor, x, y)),
    aten.__xor__: _bitwise(operator.xor, lambda B, x, y: B.call(operator.xor, x, y)),
    aten.bitwise_not: _not,
    aten.where: lambda B, a, k, d: B.where(a[0], a[1], a[2], logical=_all_bool(a[1:3], d[1:3]),
                                           dtype=_float_dtype(d[1:3])),
    aten.masked_fill: lambda B, a, k, d: B.where(a[1], a[2], a[0], logical=_all_bool([a[2], a[0]],
                                                                                      [d[2], d[0]]),
                                                 dtype=_float_dtype([d[0]])),
}
# ops that lift one to one (unary functions, comparisons) come from the shared pointwise table
POINTWISE.update({p: _same_operands(op.fn, op.arity) for p, op in aten_one_to_one().items()})
