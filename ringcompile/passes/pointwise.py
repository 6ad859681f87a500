"""One table of pointwise semantics: what each function of a lifted mod graph means, to each reader.

``index_lift`` writes mask/bias subgraphs as small FX graphs over indices whose calls are Python
operators and a few torch functions (``operator.add``, ``operator.lt``, ``torch.tanh``, ...). Every
reader of such a graph needs the same facts about each of those functions, and they used to keep
their own copies. ``LIFTED`` holds them once:

* ``aten``: the aten packets that lift to the function one to one (``aten.tanh`` -> ``torch.tanh``).
  ``index_lift.POINTWISE`` builds those entries from here; ops whose lifting needs more than one
  function (``add`` with ``alpha``, ``div`` with a rounding mode, ``clamp``, the logical ops that
  first turn operands to bool, ``where``/``masked_fill``) keep their hand-written handlers there.
* ``fold``: the Python value on constant operands (the lifter folds instead of emitting a node);
  None where the lifter emits the call even on constants.
* ``sympy``: the meaning over sympy expressions (``classify_mods`` proves masks with it).
* ``triton``: the Triton spelling where it is one infix operator or one ``tl`` function on the
  same operands.
* ``lowered``: the aten overloads of a make_fx-traced mod that the Triton lowering spells as
  ``triton`` on the same operands. ``kernels/triton/lower_mods`` builds its operator tables
  (``_BINARY``, ``_UNARY_FLOAT``, the negation) from these; its own rules stay where Triton needs
  more than the table says: true division (``as_float`` first), integer division and remainder,
  ``tanh`` and ``sigmoid`` through ``tl.exp``, casts, ``pow`` by small integers, constants, and
  ``_Deriver``'s rules for the operators (sum, product and quotient rules), ``pow``, min/max,
  clamp and ``where``.
* ``d_triton``: a unary function's derivative as Triton source (``_Deriver`` reads it; it
  differentiates the ops ``_Lowerer`` lowered, so it looks them up by aten packet).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import sympy
import torch

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class LiftedOp:
    """One function a lifted mod graph may call, and what it means to each reader."""

    fn: Callable
    kind: str                       # "arith", "unary", "compare", "logical"
    aten: tuple[Any, ...] = ()      # aten packets that lift to ``fn`` one to one
    fold: Callable | None = None    # value on Python constants (None: emitted even then)
    sympy: Callable | None = None   # meaning over sympy expressions (None: opaque to classification)
    triton: str | None = None       # operator ("+"; prefix for unary "-") or tl function ("tl.exp")
    # aten overloads of a make_fx-traced mod that Triton lowering spells as ``triton`` on the same
    # operands (kernels/triton/lower_mods builds its operator tables from these)
    lowered: tuple[Any, ...] = ()
    # Triton derivative of a unary function: (out, x, scale) -> d(out), where out and x are the
    # result's and operand's expressions and scale(f) is "f times the operand's derivative"
    d_triton: Callable[[str, str, Callable[[str], str]], str] | None = None

    @property
    def arity(self) -> int:
        return 1 if self.kind == "unary" else 2


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _compare(fn: Callable, packet: Any, meaning: Callable, triton: str) -> LiftedOp:
    """A comparison: lifted from its aten packet, lowered from its Tensor and Scalar overloads."""
    return LiftedOp(fn, "compare", aten=(packet,), fold=fn, sympy=meaning, triton=triton,
                    lowered=(packet.Tensor, packet.Scalar))


_OPS = (
    # arithmetic: the lifter writes add/sub/mul/div itself (alpha, rounding modes), so no aten one to one
    LiftedOp(operator.add, "arith", fold=operator.add, sympy=operator.add, triton="+",
             lowered=(aten.add.Tensor, aten.add.Scalar)),
    LiftedOp(operator.sub, "arith", fold=operator.sub, sympy=operator.sub, triton="-",
             lowered=(aten.sub.Tensor, aten.sub.Scalar)),
    LiftedOp(operator.mul, "arith", fold=operator.mul, sympy=operator.mul, triton="*",
             lowered=(aten.mul.Tensor, aten.mul.Scalar)),
    LiftedOp(operator.truediv, "arith", fold=operator.truediv, sympy=operator.truediv),
    LiftedOp(operator.floordiv, "arith", fold=operator.floordiv, sympy=lambda a, b: sympy.floor(a / b)),
    LiftedOp(operator.mod, "arith", fold=operator.mod, sympy=sympy.Mod),
    LiftedOp(operator.pow, "arith", fold=operator.pow, sympy=operator.pow),
    LiftedOp(operator.neg, "unary", aten=(aten.neg,), fold=operator.neg, sympy=operator.neg, triton="-",
             lowered=(aten.neg.default,)),
    # comparisons
    _compare(operator.lt, aten.lt, sympy.Lt, "<"),
    _compare(operator.le, aten.le, sympy.Le, "<="),
    _compare(operator.gt, aten.gt, sympy.Gt, ">"),
    _compare(operator.ge, aten.ge, sympy.Ge, ">="),
    _compare(operator.eq, aten.eq, sympy.Eq, "=="),
    _compare(operator.ne, aten.ne, sympy.Ne, "!="),
    # logical (on bools; the lifter turns operands to bool first)
    LiftedOp(operator.and_, "logical", fold=operator.and_, sympy=sympy.And, triton="&",
             lowered=(aten.bitwise_and.Tensor, aten.bitwise_and.Scalar, aten.logical_and.default)),
    LiftedOp(operator.or_, "logical", fold=operator.or_, sympy=sympy.Or, triton="|",
             lowered=(aten.bitwise_or.Tensor, aten.bitwise_or.Scalar, aten.logical_or.default)),
    LiftedOp(operator.xor, "logical", fold=operator.xor, sympy=sympy.Xor, triton="^",
             lowered=(aten.bitwise_xor.Tensor, aten.logical_xor.default)),
    # unary functions
    LiftedOp(torch.abs, "unary", aten=(aten.abs,), fold=abs, sympy=sympy.Abs, triton="tl.abs",
             lowered=(aten.abs.default,),
             d_triton=lambda out, x, scale: scale(f"tl.where({x} < 0, -1.0, 1.0)")),
    LiftedOp(torch.tanh, "unary", aten=(aten.tanh,), fold=math.tanh, sympy=sympy.tanh,
             d_triton=lambda out, x, scale: scale(f"(1.0 - {out} * {out})")),
    LiftedOp(torch.exp, "unary", aten=(aten.exp,), fold=math.exp, sympy=sympy.exp, triton="tl.exp",
             lowered=(aten.exp.default,), d_triton=lambda out, x, scale: scale(out)),
    LiftedOp(torch.log, "unary", aten=(aten.log,), fold=math.log, sympy=sympy.log, triton="tl.log",
             lowered=(aten.log.default,), d_triton=lambda out, x, scale: f"{scale('1.0')} / {x}"),
    LiftedOp(torch.sqrt, "unary", aten=(aten.sqrt,), fold=math.sqrt, sympy=sympy.sqrt, triton="tl.sqrt",
             lowered=(aten.sqrt.default,), d_triton=lambda out, x, scale: f"{scale('0.5')} / {out}"),
    LiftedOp(torch.sigmoid, "unary", aten=(aten.sigmoid,), fold=_sigmoid,
             d_triton=lambda out, x, scale: scale(f"{out} * (1.0 - {out})")),
    LiftedOp(torch.rsqrt, "unary", aten=(aten.rsqrt,), triton="tl.rsqrt", lowered=(aten.rsqrt.default,),
             d_triton=lambda out, x, scale: scale(f"-0.5 * {out} * {out} * {out}")),
    LiftedOp(torch.log1p, "unary", aten=(aten.log1p,)),
    LiftedOp(torch.sign, "unary", aten=(aten.sign,)),
    LiftedOp(torch.floor, "unary", aten=(aten.floor,)),
    LiftedOp(torch.ceil, "unary", aten=(aten.ceil,)),
)

LIFTED: dict[Callable, LiftedOp] = {op.fn: op for op in _OPS}


def by_kind(kind: str) -> dict[Callable, LiftedOp]:
    """The table's entries of one kind, keyed by the lifted function."""
    return {fn: op for fn, op in LIFTED.items() if op.kind == kind}


def triton_derivatives() -> dict[Any, Callable[[str, str, Callable[[str], str]], str]]:
    """aten packet -> its unary function's Triton derivative (``LiftedOp.d_triton``)."""
    return {packet: op.d_triton for op in _OPS if op.d_triton is not None for packet in op.aten}


def aten_one_to_one() -> dict[Any, LiftedOp]:
    """aten packet -> the lifted function it becomes unchanged (same operands)."""
    return {packet: op for op in _OPS for packet in op.aten}
