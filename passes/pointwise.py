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

How ``kernels/triton/lower_mods`` should adopt it (that file is owned elsewhere; nothing here
imports it): ``_Lowerer`` lowers aten overloads of a make_fx-traced mod, so its ``_BINARY`` and
``_UNARY_FLOAT`` tables are ``{overload: op.triton for op in LIFTED.values() for packet in op.aten
for overload of packet}`` restricted to the entries whose ``triton`` is set (the ``+ - * == != < <=
> >= & | ^`` operators and ``tl.exp/log/sqrt/rsqrt/abs``). Its own rules stay where Triton needs more
than the table says: true division (``as_float`` first), integer division and remainder, ``tanh`` and
``sigmoid`` through ``tl.exp``, casts, ``pow`` by small integers, constants. ``_Deriver`` would take a
``derivative`` field added here (d/dx of ``exp`` is its output, of ``log`` 1/x, ...) instead of its
if/elif chain; until then its rules stay in lower_mods.
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

    @property
    def arity(self) -> int:
        return 1 if self.kind == "unary" else 2


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


_OPS = (
    # arithmetic: the lifter writes add/sub/mul/div itself (alpha, rounding modes), so no aten one to one
    LiftedOp(operator.add, "arith", fold=operator.add, sympy=operator.add, triton="+"),
    LiftedOp(operator.sub, "arith", fold=operator.sub, sympy=operator.sub, triton="-"),
    LiftedOp(operator.mul, "arith", fold=operator.mul, sympy=operator.mul, triton="*"),
    LiftedOp(operator.truediv, "arith", fold=operator.truediv, sympy=operator.truediv),
    LiftedOp(operator.floordiv, "arith", fold=operator.floordiv, sympy=lambda a, b: sympy.floor(a / b)),
    LiftedOp(operator.mod, "arith", fold=operator.mod, sympy=sympy.Mod),
    LiftedOp(operator.pow, "arith", fold=operator.pow, sympy=operator.pow),
    LiftedOp(operator.neg, "unary", aten=(aten.neg,), fold=operator.neg, sympy=operator.neg, triton="-"),
    # comparisons
    LiftedOp(operator.lt, "compare", aten=(aten.lt,), fold=operator.lt, sympy=sympy.Lt, triton="<"),
    LiftedOp(operator.le, "compare", aten=(aten.le,), fold=operator.le, sympy=sympy.Le, triton="<="),
    LiftedOp(operator.gt, "compare", aten=(aten.gt,), fold=operator.gt, sympy=sympy.Gt, triton=">"),
    LiftedOp(operator.ge, "compare", aten=(aten.ge,), fold=operator.ge, sympy=sympy.Ge, triton=">="),
    LiftedOp(operator.eq, "compare", aten=(aten.eq,), fold=operator.eq, sympy=sympy.Eq, triton="=="),
    LiftedOp(operator.ne, "compare", aten=(aten.ne,), fold=operator.ne, sympy=sympy.Ne, triton="!="),
    # logical (on bools; the lifter turns operands to bool first)
    LiftedOp(operator.and_, "logical", fold=operator.and_, sympy=sympy.And, triton="&"),
    LiftedOp(operator.or_, "logical", fold=operator.or_, sympy=sympy.Or, triton="|"),
    LiftedOp(operator.xor, "logical", fold=operator.xor, sympy=sympy.Xor, triton="^"),
    # unary functions
    LiftedOp(torch.abs, "unary", aten=(aten.abs,), fold=abs, sympy=sympy.Abs, triton="tl.abs"),
    LiftedOp(torch.tanh, "unary", aten=(aten.tanh,), fold=math.tanh, sympy=sympy.tanh),
    LiftedOp(torch.exp, "unary", aten=(aten.exp,), fold=math.exp, sympy=sympy.exp, triton="tl.exp"),
    LiftedOp(torch.log, "unary", aten=(aten.log,), fold=math.log, sympy=sympy.log, triton="tl.log"),
    LiftedOp(torch.sqrt, "unary", aten=(aten.sqrt,), fold=math.sqrt, sympy=sympy.sqrt, triton="tl.sqrt"),
    LiftedOp(torch.sigmoid, "unary", aten=(aten.sigmoid,), fold=_sigmoid),
    LiftedOp(torch.rsqrt, "unary", aten=(aten.rsqrt,), triton="tl.rsqrt"),
    LiftedOp(torch.log1p, "unary", aten=(aten.log1p,)),
    LiftedOp(torch.sign, "unary", aten=(aten.sign,)),
    LiftedOp(torch.floor, "unary", aten=(aten.floor,)),
    LiftedOp(torch.ceil, "unary", aten=(aten.ceil,)),
)

LIFTED: dict[Callable, LiftedOp] = {op.fn: op for op in _OPS}


def by_kind(kind: str) -> dict[Callable, LiftedOp]:
    """The table's entries of one kind, keyed by the lifted function."""
    return {fn: op for fn, op in LIFTED.items() if op.kind == kind}


def aten_one_to_one() -> dict[Any, LiftedOp]:
    """aten packet -> the lifted function it becomes unchanged (same operands)."""
    return {packet: op for op in _OPS for packet in op.aten}
