"""Sizes that depend on a symbolic sequence length, computed by nodes of the graph at run time.

Under ``torch.compile(dynamic=True)`` (or Dynamo's automatic dynamic shapes) the sequence
length is a SymInt: one compiled graph serves every length. The sharding pass must then never
bake the example's length into the graph; every length it writes (the padded and local
lengths, a shifted valid length, a view's local size) is a small chain of ``operator`` nodes
on the SymInt inputs of the graph, so it is recomputed for each call.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from ringcompile.errors import UnsupportedPatternError

from .aten import hint_of, size_expr, val_of

aten = torch.ops.aten


class SymSizes:
    """Emit nodes for sizes that are sympy expressions in the graph's size symbols."""

    def __init__(self, gm: fx.GraphModule, seq_size: torch.SymInt, world: int, layout: str):
        self.graph = gm.graph
        self.seq_expr = size_expr(seq_size)
        self.seq_hint = hint_of(seq_size)
        if not isinstance(self.seq_expr, sympy.Symbol) or self.seq_hint is None:
            raise UnsupportedPatternError(
                f"the sequence length is the symbolic expression {self.seq_expr}, not one size symbol with "
                "an example value; the graph runs unsharded")
        self.anchor = next(n for n in self.graph.nodes if n.op != "placeholder")
        self.symbols: dict[sympy.Symbol, Any] = {}
        self._tensor_dims: dict[sympy.Symbol, tuple[fx.Node, int]] = {}
        for node in self.graph.find_nodes(op="placeholder"):
            v = val_of(node)
            if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
                self.symbols.setdefault(v.node.expr, node)
            elif isinstance(v, torch.Tensor):
                for i, s in enumerate(v.shape):
                    e = size_expr(s)
                    if isinstance(e, sympy.Symbol):
                        self._tensor_dims.setdefault(e, (node, i))
        self.cache: dict[Any, Any] = {}
        unit = world * (2 if layout == "zigzag" else 1)
        seq = self.emit(self.seq_expr)
        self.seq = seq
        chunks = self.call(operator.floordiv, self.call(operator.add, seq, unit - 1), unit)
        self.padded = self.call(operator.mul, chunks, unit)
        self.local = self.call(operator.floordiv, self.padded, world)

    def call(self, target: Any, *args: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args)
        node.meta["ringcompile"] = "size"
        return node

    def length(self, hint: int) -> Any:
        """A length given by its example value ``hint``, as the sequence length minus a constant."""
        return self.emit(self.seq_expr - (self.seq_hint - hint))

    def length_expr(self, hint: int) -> Any:
        return self.seq_expr - (self.seq_hint - hint)

    def offset(self, size: Any) -> int | None:
        """``c`` when ``size`` is (sequence length - c) for every length, else None."""
        d = sympy.simplify(self.seq_expr - size_expr(size))
        return int(d) if d.is_Integer else None

    def local_size(self, size: Any, hint: int) -> Any:
        """The local size of a dim whose global size is ``size`` = factor * (length of example ``hint``)."""
        ratio = sympy.cancel(size_expr(size) / self.length_expr(hint))
        num, den = sympy.fraction(ratio)
        if den != 1 or self.seq_expr in ratio.free_symbols:
            raise UnsupportedPatternError(f"cannot express a local size for {size} (sequence {self.seq_expr})"
                                          )
        factor = self.emit(num)
        if isinstance(factor, int) and factor == 1:
            return self.local
        return self.call(operator.mul, factor, self.local)

    def emit(self, expr: Any) -> Any:
        """An int, or a node computing ``expr`` from the graph's size inputs."""
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return int(expr)
        if expr in self.cache:
            return self.cache[expr]
        if isinstance(expr, sympy.Symbol):
            node = self.symbols.get(expr)
            if node is None:
                if expr not in self._tensor_dims:
                    raise UnsupportedPatternError(f"no graph input carries the size symbol {expr}")
                ph, dim = self._tensor_dims[expr]
                node = self.call(aten.sym_size.int, ph, dim)
        elif isinstance(expr, (sympy.Add, sympy.Mul)):
            op = operator.add if isinstance(expr, sympy.Add) else operator.mul
            parts = [self.emit(a) for a in expr.args]
            node = functools.reduce(lambda a, b: self.call(op, a, b), parts)
        elif type(expr).__name__ == "FloorDiv":
            node = self.call(operator.floordiv, self.emit(expr.args[0]), self.emit(expr.args[1]))
        else:
            raise UnsupportedPatternError(f"cannot compute the size {expr} in the graph")
        self.cache[expr] = node
        return node
