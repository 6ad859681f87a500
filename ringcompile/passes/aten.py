"""The aten vocabulary the passes share: node values, shapes and dims, op families, the ring op.

Every pass reads the same normalised (pre-dispatch aten) graph, so what "a view", "a cast" or
"the tensor a node holds" means is decided here once. Helpers that mean something different
keep a different name (``tensor_val`` returns a tensor or None; ``val_of`` any value).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from ringcompile.ops import RING_ATTENTION, is_ring_call

aten = torch.ops.aten
__all__ = ["RING_ATTENTION", "is_ring_call"]  # re-exported: the ring op, for every pass

# ---------------------------------------------------------------------------- node metadata keys

SOURCE_KEY = "ringcompile_source"     # a graph input's Dynamo source name (``L['input_ids']``)
EXAMPLE_KEY = "ringcompile_example"   # a module buffer/parameter input's real example value

# ---------------------------------------------------------------------------- node values


def val_of(node: Any) -> Any:
    """The value a node holds (``meta["val"]``, else Dynamo's ``example_value``); non-nodes as is."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def dynamo_val(node: Any) -> Any:
    """The value a node of Dynamo's graph holds (``example_value``, else ``meta["val"]``); non-nodes as is.

    For the passes that run before the normalise retrace (``passes.flex``): there Dynamo's
    ``example_value`` is the value of record, so it is read first (``val_of`` reads ``val`` first).
    """
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_val(n: Any) -> torch.Tensor | None:
    """The (fake) tensor a node holds, or None for non-tensor nodes and non-nodes."""
    if isinstance(n, fx.Node):
        val = val_of(n)
        if isinstance(val, torch.Tensor):
            return val
    return None


def shape_or_none(n: Any) -> tuple | None:
    """The shape of a tensor node (ints or SymInts), or None."""
    val = tensor_val(n)
    return tuple(val.shape) if val is not None else None


def shape_or_raise(n: Any, error: type[Exception] = ValueError) -> tuple:
    """The shape of a tensor node (ints or SymInts); ``error`` when ``n`` holds no tensor."""
    val = tensor_val(n)
    if val is None:
        raise error(f"{n} has no tensor metadata")
    return tuple(val.shape)


def hint_of(size: Any) -> int | None:
    """The example value of a size (an int, or a SymInt's hint), read without adding a guard."""
    if isinstance(size, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        try:
            return int(optimization_hint(size))
        except Exception:  # noqa: BLE001 - unbacked sizes have no hint
            return None
    return int(size)


def hint_shape(n: Any) -> tuple[int, ...] | None:
    """Shape of a tensor node as example values (hints), never guarded; None without a tensor or hint."""
    val = tensor_val(n)
    if val is None:
        return None
    shape = tuple(hint_of(s) for s in val.shape)
    return None if any(s is None for s in shape) else shape


def size_expr(size: Any) -> Any:
    """A size as a sympy expression (an Integer for a static size): compared structurally, no guards."""
    import sympy

    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def sym_shape(n: Any) -> tuple | None:
    """Shape of a tensor node as sympy expressions, or None."""
    val = tensor_val(n)
    return tuple(size_expr(s) for s in val.shape) if val is not None else None


def dtype_of(n: Any) -> torch.dtype | None:
    """A tensor node's dtype, or the dtype a Python scalar promotes as."""
    val = tensor_val(n)
    if val is not None:
        return val.dtype
    if isinstance(n, bool):
        return torch.bool
    if isinstance(n, int):
        return torch.int64
    if isinstance(n, float):
        return torch.float64
    return None


def packet_of(n: fx.Node) -> Any:
    """The overload packet (``aten.add``) of a call_function node, else None."""
    return getattr(n.target, "overloadpacket", None) if n.op == "call_function" else None


# ---------------------------------------------------------------------------- sizes and dims


def is_one(size: Any) -> bool:
    """The size is provably 1 (never guards a symbolic size)."""
    if isinstance(size, int):
        return size == 1
    return statically_known_true(size == 1)


def static_int(x: Any) -> int | None:
    """A Python int for ints and concrete SymInts (never specialises a dynamic size)."""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return x
    if isinstance(x, fx.Node):
        x = x.meta.get("val")
    if isinstance(x, torch.SymInt) and is_concrete_int(x):
        return int(x)
    return None


def norm_dim(d: int, rank: int) -> int:
    """A possibly negative dim as an index in ``range(rank)``."""
    return d + rank if d < 0 else d


def norm_dims(dims: int | Sequence[int] | None, rank: int) -> list[int]:
    """Dims argument (one, several, or None = all) as sorted non-negative indices (none for a 0-d value)."""
    if dims is None or rank == 0:
        return list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({norm_dim(int(d), rank) for d in dims})


# ---------------------------------------------------------------------------- op families (packets)

CASTS = (aten.to, aten._to_copy, aten.type_as)
IDENTITY = (aten.clone, aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy)
# The value-preserving cast/copy overloads the attention rules walk a score or output through: a
# narrower set than CASTS + IDENTITY as packets (no to.other, detach or lift_fresh_copy), kept as
# the rules have always matched it
RULE_CASTS = frozenset({aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.clone.default,
                        aten.contiguous.default, aten.alias.default, aten.to.dtype_layout, aten.to.device})
RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)
# the same reshapes as overloads (the targets of a normalised graph's nodes), for ``n.target in``
RESHAPE_OVERLOADS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
# Overloads whose output regroups the input's dims (the reshapes, plus flatten/unflatten), with the
# position of their explicit size list (None: the output shape follows from the input's). Placement
# rules map a dim through any of them from the two shapes alone (``placements.view_dim``).
VIEW_SIZES: dict[Any, int | None] = {
    aten.view.default: 1, aten._unsafe_view.default: 1, aten.reshape.default: 1,
    aten.flatten.using_ints: None, aten.unflatten.int: 2,
}
# RESHAPE_OVERLOADS plus flatten/unflatten: attention rules walk a score through any of them
VIEW_OPS = frozenset(VIEW_SIZES)
# ops whose result may alias their first argument (in-place ops on it mutate the source too)
ALIASING = RESHAPES + (aten.alias, aten.detach, aten.expand, aten.slice, aten.select, aten.permute,
                       aten.transpose, aten.t, aten.unsqueeze, aten.squeeze, aten.as_strided,
                       aten.unflatten, aten.flatten, aten.view_as, aten.unfold, aten.diagonal,
                       aten.narrow, aten.split, aten.chunk, aten.unbind, aten.contiguous, aten.to,
                       aten.type_as, aten.lift_fresh_copy)
CREATION = (aten.ones, aten.zeros, aten.full, aten.ones_like, aten.zeros_like, aten.full_like,
            aten.scalar_tensor, aten.new_ones, aten.new_zeros, aten.new_full)
# ops whose value does not depend on their tensor inputs' values (only on shapes)
SHAPE_ONLY = (aten.ones_like, aten.zeros_like, aten.full_like, aten.empty_like, aten.new_ones,
              aten.new_zeros, aten.new_full, aten.new_empty, aten.sym_size, aten.sym_numel,
              aten.sym_stride)

# in-place pointwise ops and their functional twins
INPLACE = {
    aten.add_: aten.add, aten.sub_: aten.sub, aten.mul_: aten.mul, aten.div_: aten.div,
    aten.masked_fill_: aten.masked_fill, aten.clamp_: aten.clamp, aten.clamp_min_: aten.clamp_min,
    aten.clamp_max_: aten.clamp_max, aten.neg_: aten.neg, aten.tanh_: aten.tanh, aten.exp_: aten.exp,
    aten.logical_not_: aten.logical_not, aten.bitwise_not_: aten.bitwise_not, aten.tril_: aten.tril,
    aten.triu_: aten.triu, aten.fill_: aten.fill,
}


# Overloads that read one argument (at this position) for its shape, dtype or device only, never its
# values: ``expand_as(mask, scores)``, ``softmax(...).type_as(scores)``, ``scores.new_zeros(...)``.
METADATA_ARG: dict[Any, int] = {
    aten.expand_as.default: 1, aten.view_as.default: 1, aten.reshape_as.default: 1, aten.type_as.default: 1,
    aten.to.other: 1, aten.new_zeros.default: 0, aten.new_ones.default: 0, aten.new_empty.default: 0,
    aten.new_full.default: 0, aten.zeros_like.default: 0, aten.ones_like.default: 0,
    aten.empty_like.default: 0, aten.full_like.default: 0, aten.sym_size.int: 0, aten.sym_numel.default: 0,
    aten.sym_stride.int: 0,
}


def reads_only_metadata(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads ``node`` as a template only (shape, dtype, device): a mutation of ``node``'s values
    cannot reach ``user``'s result, and ``user`` does not keep ``node``'s values alive."""
    pos = METADATA_ARG.get(user.target) if user.op == "call_function" else None
    if pos is None or pos >= len(user.args) or user.args[pos] is not node:
        return False
    others: list[fx.Node] = []
    fx.node.map_arg(([a for i, a in enumerate(user.args) if i != pos], user.kwargs), others.append)
    return node not in others


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (``reads_only_metadata`` ones left out)."""
    return [u for u in node.users if not reads_only_metadata(u, node)]


def _writes(user: fx.Node, value: fx.Node) -> bool:
    """``user`` (an aten op) writes into its argument ``value`` (by its schema's alias info)."""
    schema = getattr(user.target, "_schema", None)
    if schema is None:
        return False
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        given = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
        if given is value or (isinstance(given, (list, tuple)) and value in given):
            return True
    return False


def mutated_in_place(node: fx.Node) -> bool:
    """Some later op writes in place into ``node``'s value or a view of it."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op != "call_function":
                continue
            if _writes(user, n):
                return True
            if packet_of(user) in ALIASING or user.target is operator.getitem:
                todo.append(user)
    return False


def functional_packet(n: fx.Node) -> Any:
    """``n``'s packet, with an in-place op read as its functional twin where that is exact.

    Exact when the mutated tensor is a fresh result (not a view of anything) whose only value
    reader is ``n`` (others may read its shape or dtype, ``expand_as(mask, scores)``): nothing else
    can observe the mutation, so ``n``'s value is the functional op's.
    """
    p = packet_of(n)
    twin = INPLACE.get(p)
    if twin is None:
        return p
    src = n.args[0] if n.args else None
    if (isinstance(src, fx.Node) and src.op == "call_function" and value_users(src) == [n]
            and packet_of(src) not in ALIASING):
        return twin
    return p
