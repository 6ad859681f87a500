"""Which dim of which graph input is the sequence: walked back from the attention calls.

Every ring_attention op takes q/k/v as (B, H, S, D), so their dim 2 is the sequence. The
walk follows each op's dim rules (``placements.links_for``; views through ``view_dim``)
backwards to the graph inputs. Inputs it reaches are sharded at the start of the graph;
everything else (parameters, arange positions, labels, padding masks) stays replicated
and is sliced to the local shard where it meets a sharded value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx

from ringcompile.errors import UnsupportedPatternError

from .aten import SOURCE_KEY, VIEW_OPS, is_ring_call, size_expr, val_of
from .aten import hint_shape as shape_of
from .convolution import conv_args, why_not_local
from .placements import GETITEM, Shard, get_arg, links_for, view_dim


def attention_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """The ring_attention calls of ``gm``, in graph order."""
    return [n for n in gm.graph.nodes if is_ring_call(n)]


def global_seq_len(ops: Iterable[fx.Node]) -> int:
    """The one sequence length every attention call shares (q/k/v dim 2)."""
    lengths = set()
    for op in ops:
        for x in op.args[:3]:
            shape = shape_of(x)
            if shape is None or len(shape) != 4:
                raise UnsupportedPatternError(f"attention input {x} has no static 4-D shape")
            lengths.add(shape[2])
    exprs = {size_expr(val_of(x).shape[2]) for op in ops for x in op.args[:3]}
    if len(lengths) != 1 or len(exprs) != 1:
        raise UnsupportedPatternError(
            f"attention calls in one graph disagree on the sequence length {sorted(map(str, exprs))} "
            "(cross-attention or several sequences): the graph is compiled unsharded")
    return lengths.pop()


def global_seq_size(ops: Iterable[fx.Node]) -> int | torch.SymInt:
    """The sequence length as the graph knows it: an int, or a SymInt under dynamic shapes."""
    global_seq_len(ops)
    return val_of(next(iter(ops)).args[0]).shape[2]


def input_name(node: fx.Node) -> str:
    """The user-facing name of a graph input: Dynamo's source (``L['input_ids']``) when recorded."""
    return str(node.meta.get(SOURCE_KEY) or node.name)


def _match_override(node: fx.Node, seq_dims: Mapping[str, int]) -> int | None:
    """``seq_dims`` keys match the input's node name, or its Dynamo source (``input_ids`` matches
    ``L['input_ids']``, ``L_input_ids_``)."""
    source = str(node.meta.get(SOURCE_KEY) or "")
    names = {node.name, str(node.target), source}
    for key, dim in seq_dims.items():
        if key in names or f"'{key}'" in source or any(f"_{key}_" in f"_{n}_" for n in names):
            return dim
    return None


def find_seq_dims(gm: fx.GraphModule, seq_len: int, overrides: Mapping[str, int] | None = None,
                  stops: list[fx.Node] | None = None) -> dict[fx.Node, Shard]:
    """{placeholder: Shard(dim, inner)} for the graph inputs that carry the sequence.

    ``stops`` (when given) collects the ops where the walk ended without reaching an input although they
    read tensors: the reason to report when no input carries the sequence."""
    seeds: dict[fx.Node, Shard] = {}
    if overrides:
        for node in gm.graph.find_nodes(op="placeholder"):
            dim = _match_override(node, overrides)
            if dim is not None:
                shape = shape_of(node)
                if shape is None or not -len(shape) <= dim < len(shape):
                    raise UnsupportedPatternError(f"seq_dims gives dim {dim} for input {node.name} of shape "
                                                  f"{shape}")
                seeds[node] = Shard(dim % len(shape))
    known: dict[fx.Node, Shard] = {}
    work: list[tuple[fx.Node, Shard]] = [(x, Shard(2)) for op in attention_ops(gm) for x in op.args[:3]]
    while work:
        node, pl = work.pop()
        if not isinstance(node, fx.Node):
            continue
        if node in known:
            if known[node] != pl:
                raise UnsupportedPatternError(
                    f"{node.name} would carry the sequence on two dims ({known[node]} and {pl}); "
                    "pass options={'seq_dims': {...}} to say which")
            continue
        known[node] = pl
        if node.op == "placeholder":
            seeds.setdefault(node, pl)
            continue
        if node.op != "call_function":
            continue
        found = _inputs_carrying(node, pl, seq_len)
        if not found and stops is not None and _reads_tensors(node):
            stops.append(node)
        work.extend(found)
    return seeds


def _reads_tensors(node: fx.Node) -> bool:
    return any(isinstance(val_of(a), torch.Tensor) for a in node.all_input_nodes)


def _why_stopped(node: fx.Node) -> str:
    name = str(node.target)
    if "conv" in name:
        return _why_conv(node)
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        fresh = _fresh_base(node)
        if fresh is not None:
            return (f"an in-place write into {fresh.name} ({fresh.target}), a tensor built in the graph, "
                    "not read from an input: ids assembled by writes into a fresh tensor (e.g. "
                    "shift_tokens_right's new_zeros + slice copy_ + masked_fill_) have no sequence rule")
        return "an in-place write, which has no sequence rule"
    return "no sequence rule for this op"


def _why_conv(node: fx.Node) -> str:
    """The convolution's own reason (``passes.convolution``): kernel, stride or padding along the sequence."""
    args = conv_args(node)
    if args is None:
        return ("a convolution without static input/weight shapes: whether it is position-local along the "
                "sequence is unknown, so it has no sequence rule")
    return why_not_local(args)


def _fresh_base(node: fx.Node, depth: int = 8) -> fx.Node | None:
    """The tensor-creating op (new_zeros, zeros, full, empty...) an in-place write lands in, through views."""
    x = node.args[0] if node.args else None
    for _ in range(depth):
        if not isinstance(x, fx.Node) or x.op != "call_function":
            return None
        schema = getattr(x.target, "_schema", None)
        base = schema.name.split("::")[-1] if schema is not None else str(x.target)
        if base in ("new_zeros", "new_ones", "new_full", "new_empty", "zeros", "ones", "full",
                                "empty", "zeros_like", "ones_like", "full_like", "empty_like"):
            return x
        if x.target in VIEW_OPS or _is_mutating(x) or "slice" in str(x.target) or "select" in str(x.target):
            x = x.args[0] if x.args else None
            continue
        return None
    return None


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def no_seed_reason(stops: list[fx.Node]) -> str:
    """Why no graph input carries the sequence, naming where the walk back from the attention stopped."""
    msg = "no graph input carries the attention's sequence dim"
    if stops:
        where = "; ".join(f"{n.name} ({n.target}: {_why_stopped(n)})" for n in stops[:4])
        msg += f": walking back from the attention stops at {where}"
    return msg + "; pass options={'seq_dims': {name: dim}} to name the input"


def _inputs_carrying(node: fx.Node, pl: Shard, seq_len: int, out_index: int | None = None
                     ) -> list[tuple[fx.Node, Shard]]:
    """The inputs of ``node`` (and their dims) that its output's sequence dim comes from."""
    if node.target is GETITEM:
        src, idx = node.args
        if isinstance(src, fx.Node) and src.op == "call_function":
            return _inputs_carrying(src, pl, seq_len, idx)
        return []
    if node.target in VIEW_OPS:
        a, b = shape_of(node.args[0]), shape_of(node)
        if a is None or b is None:
            return []
        m = view_dim(b, a, pl.dim, pl.inner, seq_len)
        return [(node.args[0], m)] if m is not None else []
    rule = links_for(node)
    if rule is None:
        return []
    found = []
    for link in rule.links:
        if link.out_dim == pl.dim and link.out_index == out_index:
            arg = get_arg(node, link.arg)
            if isinstance(arg, fx.Node):
                found.append((arg, Shard(link.in_dim, pl.inner)))
    return found
