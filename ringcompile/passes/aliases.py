"""Which values of a graph share storage, read before sequence sharding rewires it.

An in-place write reaches every value that aliases its target on one device. Sharding keeps most of that
locally (a view of a shard is a view of the local shard), but not all: a graph input's shard is a copy of
the caller's tensor, some sequence slices of a shard are fresh tensors (a halo, gathered rows) or the
whole shard, and a conversion (a gather, a slice of a replicated value) is a copy taken once and reused.
``passes/shard.py`` asks this table, at each write, which values the write must reach.

Aliasing is read from the op (``aten.ALIASING``: the ops whose result may alias their first argument,
plus in-place ops, whose result is their target); ``to`` / ``type_as`` / ``contiguous`` alias only when
the example values keep dtype, device and strides (else they copy). Otherwise "may" is taken as "does":
a write then reaches more values than it may, so the checks built on it are only stricter than needed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .aten import ALIASING, _writes, packet_of, val_of

aten = torch.ops.aten


# ops that return their input itself when it already has the asked dtype / layout, else a copy
_SELF_OR_COPY = (aten.to, aten.type_as, aten.contiguous)
_COPIES = (aten.lift_fresh_copy,)


def _returns_self(node: fx.Node, src: fx.Node) -> bool:
    """``to`` / ``type_as`` / ``contiguous``: the input itself when dtype, device and strides stay (read from
    the example values; unknown counts as the input itself)."""
    a, b = val_of(node), val_of(src)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return True
    try:
        return a.dtype == b.dtype and a.device == b.device and tuple(a.stride()) == tuple(b.stride())
    except RuntimeError:  # symbolic strides that cannot be compared without a guard
        return True


def aliased_arg(node: fx.Node) -> fx.Node | None:
    """The value ``node``'s result may alias (its first argument), or None for a fresh result."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if node.target is operator.getitem:   # an output of split / unbind / chunk
        return src if packet_of(src) in ALIASING else None
    if _writes(node, src):
        return src
    packet = packet_of(node)
    if packet in _COPIES or packet not in ALIASING:
        return None
    if packet in _SELF_OR_COPY and not _returns_self(node, src):
        return None
    return src


def written_arg(node: fx.Node) -> fx.Node | None:
    """The value an in-place op writes into (its first argument), or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0] if _writes(node, node.args[0]) else None


class Aliases:
    """Alias chains of a graph as it is now (call before the graph is rewired)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.parent: dict[fx.Node, fx.Node] = {}
        self.children: dict[fx.Node, list[fx.Node]] = {}
        self.users = {n: list(n.users) for n in graph.nodes}
        for n in graph.nodes:
            src = aliased_arg(n)
            if src is not None:
                self.parent[n] = src
                self.children.setdefault(src, []).append(n)

    def chain(self, node: fx.Node) -> list[fx.Node]:
        """``node``, the value it aliases, and so on up to the value that owns the storage."""
        out = [node]
        while out[-1] in self.parent:
            out.append(self.parent[out[-1]])
        return out

    def below(self, node: fx.Node) -> set[fx.Node]:
        """``node`` and every value aliasing it, directly or through others."""
        out, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.children.get(n, ()))
        return out

    def members(self, node: fx.Node) -> set[fx.Node]:
        """Every value sharing storage with ``node``."""
        return self.below(self.chain(node)[-1])

    def read_after(self, node: fx.Node, write: fx.Node) -> bool:
        """Some op after ``write`` reads ``node`` (or makes a view of it, or returns it)."""
        at = self.order[write]
        return any(u is not write and self.order.get(u, -1) > at for u in self.users.get(node, ()))
