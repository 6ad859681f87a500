"""Lower a mask/score Mod (an FX graph over index tensors) to lines of Triton code.

Inside a kernel program one (batch, head) pair is fixed, so ``b`` and ``h`` are scalars,
``q_idx`` is a column ``[BLOCK_M, 1]``, ``kv_idx`` a row ``[1, BLOCK_N]`` and the score a
``[BLOCK_M, BLOCK_N]`` tile; every node of the mod graph becomes one named Triton variable
and broadcasting does the rest. Lookups into extras (``key_mask[b, kv]``, ``slopes[h]``)
become bounds-checked pointer loads whose strides are kernel arguments. Tensors a mod closes
over (``lengths[b]``, ``slopes[h]``, ``doc_ids[b, kv_idx]``: FlexAttention's usual form) are
traced as graph constants and passed the same way, as extra kernel arguments after the mod's
own extras (``captured``); they get no gradient, as on the PyTorch block path. For score mods the
derivative with respect to the score (and, for floating extras, with respect to each looked-up
value) is produced by forward-mode differentiation of the same graph, so the backward kernel
needs no hand-written rule per mod. Anything else raises ``LoweringError``: the caller then
declines and the PyTorch block path runs, never a wrong kernel.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import operator
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

from ringcompile.errors import KernelError
from ringcompile.mods import Mod
from ringcompile.passes.pointwise import LIFTED, triton_derivatives

aten = torch.ops.aten


class LoweringError(KernelError):
    """The mod uses something the Triton lowering cannot express."""

    def __init__(self, message: str, ndim_hint: tuple[int, int] | None = None):
        super().__init__(message)
        self.ndim_hint = ndim_hint  # (extra index, number of indices it was indexed with)


TL_DTYPES = {
    torch.float32: "tl.float32", torch.float64: "tl.float64", torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16", torch.int64: "tl.int64", torch.int32: "tl.int32",
    torch.int16: "tl.int16", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1",
}

# Shape classes of kernel values: which of (q rows, kv columns) a value varies along.
SCALAR, ROW, COL, TILE = frozenset(), frozenset({"q"}), frozenset({"kv"}), frozenset({"q", "kv"})


@dataclasses.dataclass
class Value:
    """One lowered node: a Triton expression (a variable name or literal) and its facts."""

    expr: str
    dtype: torch.dtype | None  # None for Python literals
    axes: frozenset  # subset of {"q", "kv"}
    is_const: bool = False
    const: float | int | bool | None = None


@dataclasses.dataclass
class ExtraLoad:
    """A lookup ``extra[i0, i1, ...]`` lowered to a pointer tile (needed again for gradients)."""

    extra: int  # index into the mod's extras
    ptr: str  # name of the pointer variable
    in_bounds: str  # name of the bounds mask variable
    axes: frozenset
    node_name: str
    indices: list[str] = dataclasses.field(default_factory=list)  # index expressions, one per dim


@dataclasses.dataclass
class ExtraArg:
    """How one extra is passed to the kernel: pointer, then per dim a size and a stride."""

    prefix: str
    ndim: int
    dtype: torch.dtype
    captured: bool = False  # a tensor the mod closes over (a graph constant), not one of its extras

    def params(self) -> list[str]:
        dims = range(self.ndim)
        return [f"{self.prefix}_ptr", *[f"{self.prefix}_size{d}" for d in dims],
                *[f"{self.prefix}_stride{d}" for d in dims]]


@dataclasses.dataclass
class LoweredMod:
    """Triton source lines computing a mod inside the kernel loop.

    lines:        statements computing ``result`` from ``b, h, q_idx, kv_idx`` (and ``score``).
    result:       variable holding the keep mask (bool) or the modified score.
    extras:       kernel arguments for the extras, in the mod's order.
    origin:       the mod's description and graph code, for the comment in generated source.
    grad_lines / d_score: (score mods) statements and expression for d(result)/d(score);
                  ``d_score`` is None when the derivative is identically one.
    extra_grads:  (score mods) per floating extra load: (load, lines, expression of
                  d(result)/d(loaded value)).
    """

    lines: list[str]
    result: str
    extras: list[ExtraArg]
    origin: str
    grad_lines: list[str] = dataclasses.field(default_factory=list)
    d_score: str | None = None
    extra_grads: list[tuple[ExtraLoad, list[str], str]] = dataclasses.field(default_factory=list)
    loads: list[ExtraLoad] = dataclasses.field(default_factory=list)
    captured: list[CapturedTensor] = dataclasses.field(default_factory=list)

    def captured_now(self) -> list[torch.Tensor]:
        """The captured tensors' current values, in kernel-argument order (see ``CapturedTensor``)."""
        out = []
        for c in self.captured:
            t = c.current()
            if t.dim() != c.traced.dim() or t.dtype != c.traced.dtype:
                raise LoweringError(f"the tensor `{c.where}` captured by the mod changed from "
                                    f"{c.traced.dim()}-D {c.traced.dtype} to {t.dim()}-D {t.dtype} after the "
                                    "kernels were generated for it")
            out.append(t)
        return out


@dataclasses.dataclass
class CapturedTensor:
    """A tensor the mod closes over: the one seen when tracing, and where the mod reads it from.

    ``where`` names a closure cell or a global of the mod's function (or of a function it
    calls), so rebinding that name (``lengths = new_lengths`` between steps) is seen at the next
    call, as the mod itself would see it; in-place updates are seen because the same tensor is
    passed. A tensor reached some other way (an attribute, or created inside the mod) is the
    traced one.
    """

    traced: torch.Tensor
    where: str = "a constant of the mod's graph"
    getter: Callable[[], object] | None = None

    def current(self) -> torch.Tensor:
        if self.getter is not None:
            value = self.getter()
            if isinstance(value, torch.Tensor):
                return value
        return self.traced


# ---------------------------------------------------------------------------- tracing

_TRACE_LOCK = threading.RLock()


def example_grid(batch: int = 2, heads: int = 4, sq: int = 8, sk: int = 8):
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    q = torch.arange(sq).view(1, 1, -1, 1)
    kv = torch.arange(sk).view(1, 1, 1, -1)
    return b, h, q, kv


def trace_mod(mod: Mod, extras: Sequence[torch.Tensor], score_dtype: torch.dtype = torch.float32
              ) -> fx.GraphModule:
    """The mod as an aten-level FX graph: ``mod.graph`` when set, else ``make_fx`` of ``mod.fn``."""
    if mod.graph is not None:
        return mod.graph
    from torch.fx.experimental.proxy_tensor import make_fx

    grid = example_grid()
    args: list[torch.Tensor] = [] if mod.is_mask else [torch.zeros(2, 4, 8, 8, dtype=score_dtype)]
    args += [*grid, *extras]
    # fake tensors: no bounds checks on example extras, and data-dependent Python control flow
    # raises instead of being baked in; the fake-tensor logger is quiet while probing ranks
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    with _TRACE_LOCK:  # make_fx keeps global tracing state: one trace at a time (ranks run as threads)
        level = fake_log.level
        fake_log.setLevel(logging.CRITICAL)
        try:
            # real tensors the mod closes over become get_attr constants (lowered as captured extras)
            return make_fx(mod.fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
        except Exception as exc:  # the user's function may do anything; say what failed
            raise LoweringError(f"could not trace {mod.describe()} with make_fx: {type(exc).__name__}: {exc}"
                                ) from exc
        finally:
            fake_log.setLevel(level)


# ---------------------------------------------------------------------------- lowering


def _fmt_const(c: float | int | bool) -> str:
    if isinstance(c, bool):
        return "True" if c else "False"
    if isinstance(c, float):
        if math.isinf(c):
            return "float('inf')" if c > 0 else "float('-inf')"
        if math.isnan(c):
            return "float('nan')"
        return repr(c)
    return repr(int(c))


def _const(c: float | int | bool) -> Value:
    return Value(_fmt_const(c), None, SCALAR, True, c)


# the operators and tl functions a traced mod's aten overloads lower to one to one: the shared
# pointwise table's Triton spellings (passes/pointwise.py), read here, not restated
_BINARY = {ov: op.triton for op in LIFTED.values() if op.arity == 2 for ov in op.lowered}
_COMPARE = {"==", "!=", "<", "<=", ">", ">="}
_IDENTITY = {aten.alias.default, aten.detach.default, aten.clone.default, aten.lift_fresh_copy.default,
             aten.expand.default, aten.contiguous.default}
_UNARY_FLOAT = {ov: op.triton for op in LIFTED.values()
                if op.arity == 1 and (op.triton or "").startswith("tl.") for ov in op.lowered}
_NEG = LIFTED[operator.neg].triton  # prefix "-"
_NEG_OPS = LIFTED[operator.neg].lowered
_UNARY_DERIVATIVES = triton_derivatives()  # aten packet -> (out, x, scale) -> derivative
_CASTS = (aten._to_copy.default, aten.to.dtype, aten.type_as.default)
_WHERE = (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
_CLAMPS = (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
_MIN_MAX = (aten.minimum.default, aten.maximum.default)


class _Lowerer:
    """Walks one mod graph and emits Triton statements (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, mod: Mod, prefix: str, extras: Sequence[torch.Tensor]):
        self.gm, self.mod, self.prefix = gm, mod, prefix
        self.lines: list[str] = []
        self.values: dict[fx.Node, Value] = {}
        self.loads: dict[fx.Node, ExtraLoad] = {}
        self.extra_args: list[ExtraArg] = []
        self.extra_of: dict[fx.Node, int] = {}
        self.extras = list(extras)
        self.captured: list[torch.Tensor] = []

    # -- helpers
    def fail(self, node: fx.Node, why: str) -> LoweringError:
        return LoweringError(f"{self.mod.describe()}: cannot lower `{node.format_node()}` to Triton: {why}")

    def name(self, node: fx.Node) -> str:
        return f"{self.prefix}_{node.name}"

    def emit(self, node: fx.Node, expr: str, dtype: torch.dtype | None, axes: frozenset) -> Value:
        var = self.name(node)
        self.lines.append(f"{var} = {expr}")
        value = Value(var, dtype, axes)
        self.values[node] = value
        return value

    def arg(self, node: fx.Node, a) -> Value:
        if isinstance(a, fx.Node):
            if a not in self.values:
                raise self.fail(node, f"operand {a.name} is not a lowered value")
            return self.values[a]
        if isinstance(a, (bool, int, float)):
            return _const(a)
        raise self.fail(node, f"unsupported operand {a!r}")

    @staticmethod
    def out_dtype(node: fx.Node) -> torch.dtype | None:
        val = node.meta.get("val")
        return getattr(val, "dtype", None)

    def cast(self, expr: str, value: Value, dtype: torch.dtype | None) -> str:
        """``expr`` converted to ``dtype`` where Triton's promotion might not match torch's."""
        if dtype is None or dtype == torch.float32 and value.dtype != torch.float64:
            return expr
        if dtype == torch.bool:
            return expr
        if dtype.is_floating_point and value.dtype == dtype:
            return expr
        if not dtype.is_floating_point:
            return expr  # integer arithmetic stays in the index width (int32) inside the kernel
        return f"({expr}).to({TL_DTYPES[dtype]})"

    # -- main walk
    def run(self) -> Value:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        lead = ["b", "h", "q_idx", "kv_idx"] if self.mod.is_mask else ["score", "b", "h", "q_idx", "kv_idx"]
        if len(placeholders) != len(lead) + len(self.extras):
            raise LoweringError(f"{self.mod.describe()}: graph takes {len(placeholders)} inputs, expected "
                                f"{len(lead)} indices/score plus {len(self.extras)} extras")
        axes = {"score": TILE, "b": SCALAR, "h": SCALAR, "q_idx": ROW, "kv_idx": COL}
        dtypes = {"score": None, "b": torch.int64, "h": torch.int64, "q_idx": torch.int64,
                  "kv_idx": torch.int64}
        kernel_names = {"b": "b_idx", "h": "h_idx"}  # [1, 1] blocks (see template)
        for node, var in zip(placeholders, lead, strict=False):
            dtype = dtypes[var] if var != "score" else self.out_dtype(node)
            self.values[node] = Value(kernel_names.get(var, var), dtype, axes[var])
        for i, node in enumerate(placeholders[len(lead):]):
            self.extra_of[node] = i
            e = self.extras[i]
            self.extra_args.append(ExtraArg(f"{self.prefix}_x{i}", e.dim(), e.dtype))
        result = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = node.args[0]
                if isinstance(out, (tuple, list)):
                    if len(out) != 1:
                        raise self.fail(node, "mod returns several values")
                    out = out[0]
                result = self.arg(node, out)
                continue
            if node.op == "get_attr":
                self.lower_constant(node)
                continue
            if node.op != "call_function":
                raise self.fail(node, f"{node.op} nodes are not supported")
            for a in node.args:
                if isinstance(a, fx.Node) and a in self.extra_of and node.target is not aten.index.Tensor:
                    raise self.fail(node, "extras may only be indexed (extra[b, kv] style), not used whole")
            self.lower_call(node)
        if result is None:
            raise LoweringError(f"{self.mod.describe()}: graph has no output")
        return result

    def lower_constant(self, node: fx.Node) -> None:
        attr = getattr(self.gm, str(node.target), None)
        if isinstance(attr, torch.Tensor) and attr.dim() == 0:
            self.values[node] = _const(attr.item())
            return
        if not isinstance(attr, torch.Tensor) or attr.dtype not in TL_DTYPES:
            raise self.fail(node, f"constant {type(attr).__name__} of dtype {getattr(attr, 'dtype', None)}")
        # a tensor the mod closes over: one more kernel argument, indexed like an extra
        j = sum(a.captured for a in self.extra_args)
        self.extra_of[node] = len(self.extra_args)
        self.extra_args.append(ExtraArg(f"{self.prefix}_c{j}", attr.dim(), attr.dtype, captured=True))
        self.captured.append(attr)

    def lower_call(self, node: fx.Node) -> None:
        """One call node through the handler registered for its target (``_HANDLERS``)."""
        t = node.target
        if t is operator.getitem:
            raise self.fail(node, "multi-output ops are not supported")
        handler = _HANDLERS.get(t)
        if handler is None:
            raise self.fail(node, f"op {t} has no Triton lowering")
        handler(self, node, self.out_dtype(node))

    # -- one handler per op family: (node, its output dtype)
    def lower_identity(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        if node.target is aten.expand.default:
            val = node.meta.get("val")
            if val is None or val.dim() != 4:
                raise self.fail(node, "expand to a non-4-D shape")
        self.values[node] = self.arg(node, node.args[0])

    def lower_table_binary(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        self.lower_binary(node, _BINARY[node.target], dtype)

    def lower_rsub(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a, b = self.arg(node, node.args[0]), self.arg(node, node.args[1])
        self.emit(node, self.cast(f"{b.expr} - {a.expr}", a, dtype), dtype, a.axes | b.axes)

    def lower_true_div(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a, b = self.arg(node, node.args[0]), self.arg(node, node.args[1])
        expr = f"{self.as_float(a, dtype)} / {self.as_float(b, dtype)}"
        self.emit(node, self.cast(expr, a, dtype), dtype, a.axes | b.axes)

    def lower_neg(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a = self.arg(node, node.args[0])
        self.emit(node, f"{_NEG}{a.expr}", dtype, a.axes)

    def lower_not(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a = self.arg(node, node.args[0])
        if dtype != torch.bool:
            raise self.fail(node, "bitwise not on integers")
        self.emit(node, f"{a.expr} == 0", dtype, a.axes)

    def lower_unary_float(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a = self.arg(node, node.args[0])
        self.emit(node, self.cast(f"{_UNARY_FLOAT[node.target]}({self.as_float(a, dtype)})", a, dtype),
                  dtype, a.axes)

    def lower_tanh(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a = self.arg(node, node.args[0])
        x = self.as_float(a, dtype)
        # tanh through exp: tl.tanh is not in every Triton version; saturates correctly at +-inf
        self.emit(node, self.cast(f"1.0 - 2.0 / (tl.exp(2.0 * {x}) + 1.0)", a, dtype), dtype, a.axes)

    def lower_sigmoid(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a = self.arg(node, node.args[0])
        x = self.as_float(a, dtype)
        self.emit(node, self.cast(f"1.0 / (1.0 + tl.exp(-{x}))", a, dtype), dtype, a.axes)

    def lower_min_max(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a, b = self.arg(node, node.args[0]), self.arg(node, node.args[1])
        fn = "tl.minimum" if node.target is aten.minimum.default else "tl.maximum"
        self.emit(node, self.cast(f"{fn}({a.expr}, {b.expr})", a, dtype), dtype, a.axes | b.axes)

    def lower_where(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        c, a, b = (self.arg(node, x) for x in node.args[:3])
        self.emit(node, self.cast(f"tl.where({c.expr}, {a.expr}, {b.expr})", a, dtype), dtype,
                  c.axes | a.axes | b.axes)

    def lower_pow(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a, p = self.arg(node, node.args[0]), node.args[1]
        if not (isinstance(p, (int, float)) and float(p).is_integer() and 0 <= p <= 4):
            raise self.fail(node, "only small integer powers are supported")
        expr = " * ".join([a.expr] * int(p)) if int(p) > 0 else "1.0"
        self.emit(node, self.cast(expr, a, dtype), dtype, a.axes)

    def lower_cast(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a = self.arg(node, node.args[0])
        if dtype is None:
            raise self.fail(node, "cast without a known dtype")
        if dtype == torch.bool:
            self.emit(node, f"{a.expr} != 0", dtype, a.axes)
        elif a.is_const:
            self.values[node] = a
        else:
            self.emit(node, f"({a.expr}).to({TL_DTYPES[dtype]})", dtype, a.axes)

    def lower_scalar_const(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        t = node.target
        if t is aten.full.default and tuple(node.args[0]) not in ((), (1,), (1, 1, 1, 1)):
            raise self.fail(node, "full() of a non-scalar shape")
        c = node.args[0] if t is aten.scalar_tensor.default else node.args[1]
        self.values[node] = _const(c)

    def as_float(self, v: Value, dtype: torch.dtype | None) -> str:
        if v.is_const:
            return _fmt_const(float(v.const))
        if v.dtype is not None and not v.dtype.is_floating_point:
            return f"{v.expr}.to({TL_DTYPES.get(dtype, 'tl.float32') if dtype else 'tl.float32'})"
        return v.expr

    def lower_binary(self, node: fx.Node, op: str, dtype: torch.dtype | None) -> None:
        if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
            raise self.fail(node, "alpha != 1")
        a, b = self.arg(node, node.args[0]), self.arg(node, node.args[1])
        if op in ("&", "|", "^") and dtype != torch.bool:
            raise self.fail(node, "bitwise ops on integers")
        if a.is_const and b.is_const:
            raise self.fail(node, "constant-only arithmetic")
        expr = f"{a.expr} {op} {b.expr}"
        if op not in _COMPARE and op not in ("&", "|", "^"):
            expr = self.cast(expr, a if not a.is_const else b, dtype)
        self.emit(node, expr, dtype, a.axes | b.axes)

    def lower_int_division(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a, b = self.arg(node, node.args[0]), self.arg(node, node.args[1])
        if dtype is None or dtype.is_floating_point or (b.is_const and b.const == 0):
            raise self.fail(node, "rounding division is supported for integers only")
        mode = node.kwargs.get("rounding_mode", "floor")
        if node.target in (aten.floor_divide.default,):
            mode = "floor"
        var = self.name(node)
        axes = a.axes | b.axes
        # ``//`` and ``%`` round differently across Triton backends; fix the sign explicitly
        self.lines.append(f"{var}_t = {a.expr} // {b.expr}")
        self.lines.append(f"{var}_r = {a.expr} - {var}_t * {b.expr}")
        if node.target in (aten.remainder.Tensor, aten.remainder.Scalar):
            self.lines.append(f"{var} = tl.where(({var}_r != 0) & (({var}_r < 0) != ({b.expr} < 0)), "
                              f"{var}_r + {b.expr}, {var}_r)")
        elif mode == "floor":
            self.lines.append(f"{var} = tl.where(({var}_r != 0) & (({var}_r < 0) != ({b.expr} < 0)), "
                              f"{var}_t - 1, {var}_t)")
        elif mode == "trunc":
            self.lines.append(f"{var} = tl.where(({var}_r != 0) & (({var}_r < 0) != ({a.expr} < 0)), "
                              f"{var}_t + 1, {var}_t)")
        else:
            raise self.fail(node, f"rounding mode {mode!r}")
        self.values[node] = Value(var, dtype, axes)

    def lower_clamp(self, node: fx.Node, dtype: torch.dtype | None) -> None:
        a = self.arg(node, node.args[0])
        if node.target is aten.clamp.default:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        elif node.target is aten.clamp_min.default:
            lo, hi = node.args[1], None
        else:
            lo, hi = None, node.args[1]
        expr = a.expr
        if lo is not None:
            expr = f"tl.maximum({expr}, {self.arg(node, lo).expr})"
        if hi is not None:
            expr = f"tl.minimum({expr}, {self.arg(node, hi).expr})"
        self.emit(node, self.cast(expr, a, dtype), dtype, a.axes)

    def lower_index(self, node: fx.Node, dtype: torch.dtype | None = None) -> None:
        src, indices = node.args[0], node.args[1]
        if src not in self.extra_of:
            raise self.fail(node, "only extras (mod arguments after kv_idx) may be indexed")
        i = self.extra_of[src]
        arg = self.extra_args[i]
        if any(x is None for x in indices):
            raise self.fail(node, "slices (None) in an index")
        if len(indices) != arg.ndim:
            err = self.fail(node, f"extra {i} has {arg.ndim} dims: index it with one index tensor per dim")
            err.ndim_hint = (i, len(indices))
            raise err
        idx = [self.arg(node, x) for x in indices]
        if any(v.axes & {"score"} for v in idx):
            raise self.fail(node, "indices computed from the score")
        var = self.name(node)
        terms = " + ".join(f"({v.expr}) * {arg.prefix}_stride{d}" for d, v in enumerate(idx))
        bounds = " & ".join(f"({v.expr} >= 0) & ({v.expr} < {arg.prefix}_size{d})" for d, v in enumerate(idx))
        axes = frozenset().union(*(v.axes for v in idx))
        self.lines.append(f"{var}_ptr = {arg.prefix}_ptr + {terms}")
        self.lines.append(f"{var}_ok = {bounds}")
        load = f"tl.load({var}_ptr, mask={var}_ok, other=0)"
        if arg.dtype == torch.bool:
            load = f"{load} != 0"  # bool extras travel as uint8
        self.lines.append(f"{var} = {load}")
        self.values[node] = Value(var, arg.dtype, axes)
        self.loads[node] = ExtraLoad(i, f"{var}_ptr", f"{var}_ok", axes, node.name, [v.expr for v in idx])


def _handlers() -> dict[object, Callable[[_Lowerer, fx.Node, torch.dtype | None], None]]:
    """Call target -> the ``_Lowerer`` handler that lowers it (the op families above)."""
    families: list[tuple[Sequence, Callable]] = [
        (_IDENTITY, _Lowerer.lower_identity), ((aten.index.Tensor,), _Lowerer.lower_index),
        (_BINARY, _Lowerer.lower_table_binary), ((aten.rsub.Scalar,), _Lowerer.lower_rsub),
        ((aten.div.Tensor, aten.div.Scalar), _Lowerer.lower_true_div),
        ((aten.div.Tensor_mode, aten.div.Scalar_mode, aten.floor_divide.default, aten.remainder.Tensor,
          aten.remainder.Scalar), _Lowerer.lower_int_division),
        (_NEG_OPS, _Lowerer.lower_neg),
        ((aten.bitwise_not.default, aten.logical_not.default), _Lowerer.lower_not),
        (_UNARY_FLOAT, _Lowerer.lower_unary_float), ((aten.tanh.default,), _Lowerer.lower_tanh),
        ((aten.sigmoid.default,), _Lowerer.lower_sigmoid), (_MIN_MAX, _Lowerer.lower_min_max),
        (_CLAMPS, _Lowerer.lower_clamp), (_WHERE, _Lowerer.lower_where),
        ((aten.pow.Tensor_Scalar,), _Lowerer.lower_pow), (_CASTS, _Lowerer.lower_cast),
        ((aten.scalar_tensor.default, aten.full.default), _Lowerer.lower_scalar_const),
    ]
    return {t: fn for targets, fn in families for t in targets}


_HANDLERS = _handlers()


# ---------------------------------------------------------------------------- derivatives


class _Deriver:
    """Forward-mode derivative of a lowered score graph with respect to one seed node."""

    def __init__(self, low: _Lowerer, seed: fx.Node, tag: str):
        self.low, self.seed, self.tag = low, seed, tag
        self.lines: list[str] = []
        self.d: dict[fx.Node, str | None] = {}  # None = zero; "1.0" = one

    def fail(self, node: fx.Node, why: str) -> LoweringError:
        return LoweringError(f"{self.low.mod.describe()}: cannot differentiate `{node.format_node()}`: {why}")

    def dof(self, a) -> str | None:
        return self.d.get(a) if isinstance(a, fx.Node) else None

    def val(self, node: fx.Node, a) -> str:
        return self.low.arg(node, a).expr

    def emit(self, node: fx.Node, expr: str) -> None:
        var = f"d{self.tag}_{node.name}"
        self.lines.append(f"{var} = {expr}")
        self.d[node] = var

    @staticmethod
    def mul(a: str, b: str | None) -> str:
        if b is None:
            return "0.0"
        return a if b == "1.0" else f"{a} * {b}"

    def run(self) -> str | None:
        self.d[self.seed] = "1.0"
        out = None
        for node in self.low.gm.graph.nodes:
            if node.op == "output":
                res = node.args[0]
                res = res[0] if isinstance(res, (tuple, list)) else res
                out = self.dof(res)
                continue
            if node.op != "call_function" or node is self.seed:
                continue
            ds = [self.dof(a) for a in node.args if isinstance(a, fx.Node)]
            if all(x is None for x in ds):
                continue  # does not depend on the seed
            self.rule(node)
        return out

    def rule(self, node: fx.Node) -> None:
        """The derivative of one node that depends on the seed, by its op family."""
        t = node.target
        args = node.args
        if t in _IDENTITY or t in _CASTS:
            dtype = _Lowerer.out_dtype(node)
            if dtype is not None and not dtype.is_floating_point:
                return  # integer/bool result: piecewise constant, zero derivative
            self.d[node] = self.dof(args[0])
            return
        op = _BINARY.get(t)
        if op in _COMPARE or op in ("&", "|", "^"):
            return  # boolean results carry no derivative
        if t is aten.index.Tensor:
            raise self.fail(node, "the score feeds an index")
        da, db = self.dof(args[0]), self.dof(args[1]) if len(args) > 1 else None
        a = self.val(node, args[0])
        b = self.val(node, args[1]) if len(args) > 1 and not isinstance(args[1], (list, tuple)) else None
        if op in ("+", "-", "*") or t is aten.rsub.Scalar or t in (aten.div.Tensor, aten.div.Scalar):
            self.rule_arith(node, op, a, b, da, db)
        else:
            self.rule_function(node, a, b, da, db)

    def rule_arith(self, node: fx.Node, op: str | None, a: str, b: str | None, da: str | None,
                   db: str | None) -> None:
        """Sum, difference, product and quotient rules."""
        if op in ("+", "-"):
            if da is not None and db is not None:
                self.emit(node, f"{da} {op} {db}")
            elif da is not None:
                self.d[node] = da
            else:
                self.emit(node, f"-{db}" if op == "-" else db)
        elif node.target is aten.rsub.Scalar:
            self.emit(node, f"-{da}")
        elif op == "*":
            parts = [self.mul(b, da) if da is not None else None, self.mul(a, db) if db is not None else None]
            self.emit(node, " + ".join(p for p in parts if p is not None))
        elif db is None:
            self.emit(node, f"{self.mul('1.0', da)} / {b}")
        else:
            num = f"({self.mul(b, da) if da is not None else '0.0'} - {self.mul(a, db)})"
            self.emit(node, f"{num} / ({b} * {b})")

    def rule_function(self, node: fx.Node, a: str, b: str | None, da: str | None, db: str | None) -> None:
        """Negation, the shared table's unary derivatives, pow, min/max, clamp and where."""
        t, args = node.target, node.args
        out = self.low.values[node].expr
        d_unary = _UNARY_DERIVATIVES.get(getattr(t, "overloadpacket", None))
        if t in _NEG_OPS:
            self.emit(node, f"-{da}")
        elif d_unary is not None:
            self.emit(node, d_unary(out, a, lambda f: self.mul(f, da)))
        elif t is aten.pow.Tensor_Scalar:
            p = int(args[1])
            self.emit(node, "0.0" if p == 0 else self.mul(
                f"{p}.0" + "".join(f" * {a}" for _ in range(p - 1)), da))
        elif t in _MIN_MAX:
            cmp = "<=" if t is aten.minimum.default else ">="
            self.emit(node, f"tl.where({a} {cmp} {b}, {da or '0.0'}, {db or '0.0'})")
        elif t in _CLAMPS:
            self.emit(node, f"tl.where({out} == {a}, {da}, 0.0)")
        elif t in _WHERE:
            c = self.val(node, args[0])
            d1, d2 = self.dof(args[1]), self.dof(args[2])
            self.emit(node, f"tl.where({c}, {d1 or '0.0'}, {d2 or '0.0'})")
        else:
            raise self.fail(node, f"no derivative rule for {t}")


# ---------------------------------------------------------------------------- entry point


def lower_mod(mod: Mod, extras: Sequence[torch.Tensor], prefix: str, score_dtype: torch.dtype = torch.float32,
              with_grad: bool = False) -> LoweredMod:
    """Lower ``mod`` for the given example ``extras`` (their ndim and dtype shape the kernel)."""
    gm = trace_mod(mod, extras, score_dtype)
    low = _Lowerer(gm, mod, prefix, extras)
    result = low.run()
    lines = list(low.lines)
    res_var = result.expr
    if mod.is_mask and (result.dtype != torch.bool):
        lines.append(f"{prefix}_keep = {res_var} != 0")
        res_var = f"{prefix}_keep"
    origin = f"{mod.describe()} (kind {mod.kind!r})\n" + gm.code.strip()
    lowered = LoweredMod(lines, res_var, low.extra_args, origin, loads=list(low.loads.values()),
                         captured=locate_captured(mod, low.captured))
    if result.is_const:
        lowered.lines.append(f"{prefix}_const = {result.expr}")
        lowered.result = f"{prefix}_const"
    if not mod.is_mask and with_grad:
        score_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
        der = _Deriver(low, score_node, "score")
        d = der.run()
        lowered.grad_lines = der.lines
        lowered.d_score = None if d == "1.0" else (d if d is not None else "0.0")
        for node, load in low.loads.items():
            arg = low.extra_args[load.extra]
            if not arg.dtype.is_floating_point or arg.captured:
                continue  # captured tensors are constants to the op (no gradient), as on the block path
            dx = _Deriver(low, node, f"x_{node.name}")
            dexpr = dx.run()
            if dexpr is not None:
                lowered.extra_grads.append((load, dx.lines, dexpr))
        for i, e in enumerate(extras):
            if e.is_floating_point() and not any(ld.extra == i for ld, _, _ in lowered.extra_grads):
                if not any(ld.extra == i for ld in low.loads.values()):
                    raise LoweringError(f"{mod.describe()}: floating extra {i} is never indexed")
    return lowered


def locate_captured(mod: Mod, tensors: Sequence[torch.Tensor]) -> list[CapturedTensor]:
    """Where each traced constant comes from: a closure cell or global the mod's function reads
    (looking through the functions and Mods it closes over or calls, as ``and_masks`` builds)."""
    found: dict[int, tuple[str, Callable[[], object]]] = {}
    seen: set[int] = set()

    def visit(obj: object, depth: int) -> None:
        if isinstance(obj, Mod):
            obj = obj.fn
        if isinstance(obj, (tuple, list)):
            for item in obj[:64]:
                visit(item, depth)
            return
        code = getattr(obj, "__code__", None)
        if code is None or id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        for name, cell in zip(code.co_freevars, getattr(obj, "__closure__", None) or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), (name, lambda c=cell: c.cell_contents))
            else:
                visit(value, depth + 1)
        glb = getattr(obj, "__globals__", {})
        for name in code.co_names:
            value = glb.get(name)
            if isinstance(value, torch.Tensor):
                found.setdefault(id(value), (name, lambda g=glb, n=name: g.get(n)))
            elif callable(value) and getattr(value, "__module__", None) == glb.get("__name__"):
                visit(value, depth + 1)  # a helper defined next to the mod

    visit(mod, 0)
    out = []
    for t in tensors:
        where, getter = found.get(id(t), (None, None))
        out.append(CapturedTensor(t, where or "a constant of the mod's graph", getter))
    return out


def example_extras(mod: Mod | None, score_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Example extras with ranks the mod can be lowered with (raises LoweringError if none).

    The real extras are unknown until the first call, so examples of ranks 1-4 are tried (an
    extra's rank is whatever it is indexed with).
    """
    if mod is None:
        return []
    dtype = torch.bool if mod.is_mask else torch.float32
    reason = None
    for ndims in itertools.islice(itertools.product((2, 1, 4, 3), repeat=mod.n_extras), 64):
        extras = [torch.zeros((8,) * nd, dtype=dtype) for nd in ndims]
        try:
            lower_mod(mod, extras, "probe", score_dtype, with_grad=not mod.is_mask)
            return extras
        except LoweringError as exc:
            reason = reason or str(exc)
            if exc.ndim_hint is None and "could not trace" not in str(exc):
                raise
    raise LoweringError(reason or f"{mod.describe()}: no extras ranks work")


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_lowerable(mod: Mod | None, score_dtype: torch.dtype = torch.float32) -> str | None:
    """None when ``mod`` can be lowered for extras of some ranks, else the reason it cannot."""
    if mod is None:
        return None
    with _TRACE_LOCK:
        return _check_lowerable_locked(mod, score_dtype)


def _check_lowerable_locked(mod: Mod, score_dtype: torch.dtype) -> str | None:
    per_mod = _CHECKED.setdefault(mod, {})
    if score_dtype not in per_mod:
        try:
            example_extras(mod, score_dtype)
            per_mod[score_dtype] = None
        except LoweringError as exc:
            per_mod[score_dtype] = str(exc)
    return per_mod[score_dtype]
