"""Higher-order ops in a Dynamo graph: inline, keep opaque, or refuse, before the normalize retrace.

``make_fx(pre_dispatch=True)`` does not treat every higher-order op (HOP) faithfully: it inlines
``autograd_function_apply`` (a custom ``autograd.Function`` then loses its backward), bakes
FakeTensors of ``associative_scan``/``scan`` bodies into constants, and cannot retrace a default
``tag_activation_checkpoint``. So every HOP of the Dynamo graph is classified first:

- inlined: ``wrap``, ``invoke_subgraph`` (a nested compile region) and ``tag_activation_checkpoint``
  (``torch.utils.checkpoint``) only mean "call this body". Their bodies are copied into the graph
  so discovery and sharding see the attention inside. Nodes of a checkpointed body keep the
  checkpoint tags (``meta["recompute"]``, ``meta["ac_graph_id"]``) that AOTAutograd's partitioner
  reads, so the region is still recomputed in the backward; see ``mark_ring_ops_saved``.
- opaque: ``autograd_function_apply`` (re-emitted as the same HOP with the user's forward and
  backward bodies) and ``cond`` (data-dependent branches). Attention inside them is reported.
- refused (the backend falls back with the reason): every other HOP, and functorch's vmap calls
  that ``create_block_mask`` leaves in the graph.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ringcompile.errors import UnsupportedPatternError
from ringcompile.log import get_logger

from . import flex

log = get_logger(__name__)

INLINED = ("wrap", "invoke_subgraph", "tag_activation_checkpoint")
OPAQUE = ("autograd_function_apply", "cond")
REJECTED_KEY = "ringcompile_hop_rejected"
AC_CONTEXT_KEY = "ringcompile_ac_contexts"
_VMAP_FUNCTIONS = ("_vmap_increment_nesting", "_add_batch_dim", "_remove_batch_dim")
_ATTENTION_WORDS = ("softmax", "scaled_dot_product_attention", "attention")
_ac_ids = itertools.count(1_000_000)  # distinct from torch's own ids


@dataclasses.dataclass
class HopRejected:
    """Attention inside a HOP body the passes do not descend into (same fields as find_attention's)."""

    location: str
    pattern: str
    reason: str
    node: fx.Node | None = None


def hop_name(node: fx.Node) -> str | None:
    """``cond`` for ``torch.ops.higher_order.cond`` nodes, None for other nodes."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    return node.target.name()


def _attr(owner: torch.nn.Module, target: str) -> Any:
    obj: Any = owner
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def bodies(gm: fx.GraphModule, node: fx.Node) -> list[fx.GraphModule]:
    """The GraphModules a node takes as arguments (HOP bodies, flex mods), looked up on ``gm``."""
    found: list[fx.GraphModule] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            obj = _attr(gm, str(a.target))
            if isinstance(obj, fx.GraphModule):
                found.append(obj)
        return a

    fx.node.map_aggregate((node.args, node.kwargs), visit)
    return found


def _node_name(node: fx.Node) -> str:
    if node.op not in ("call_function", "call_method", "call_module"):
        return ""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        name = node.target.name()
    return str(name).lower()


def attention_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """Softmax / SDPA / flex calls of ``gm`` and (recursively) of its HOP bodies."""
    calls = []
    for node in gm.graph.nodes:
        name = _node_name(node)
        if any(word in name for word in _ATTENTION_WORDS):
            calls.append(node)
        for body in bodies(gm, node):
            calls += attention_calls(body)
    return calls


def _location(node: fx.Node) -> str:
    from .locations import location_of

    return location_of(node)


# ---------------------------------------------------------------------------- inlining


class _Flattener:
    """Copies a Dynamo graph into a new one, inlining the bodies of INLINED HOPs."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = fx.Graph()
        self.attrs: dict[str, Any] = {}
        self.rejected: list[HopRejected] = []
        self.ac_contexts: dict[int, Callable | None] = {}

    def fresh_attr(self, obj: Any, hint: str) -> str:
        name = hint.replace(".", "_")
        i = 0
        while name in self.attrs and self.attrs[name] is not obj:
            i += 1
            name = f"{hint.replace('.', '_')}_{i}"
        self.attrs[name] = obj
        return name

    def copy(self, owner: fx.GraphModule, env: dict[fx.Node, Any], args: list[Any] | None,
             ac: tuple[int, Any] | None) -> Any:
        """Copy ``owner``'s graph; placeholders bind to ``args`` (None: the top graph). Returns the output."""
        placeholders = iter(args) if args is not None else None
        for node in owner.graph.nodes:
            if node.op == "placeholder" and placeholders is not None:
                env[node] = next(placeholders)
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[n])
                if placeholders is None:
                    self.graph.output(result)
                return result
            if node.op == "call_function" and node.target is _getitem and isinstance(env.get(node.args[0]),
                                                                                     (tuple, list)):
                env[node] = env[node.args[0]][node.args[1]]
                continue
            name = hop_name(node)
            if name is not None:
                self.hop(owner, node, name, env, ac)
                continue
            if node.op == "get_attr":
                obj = _attr(owner, str(node.target))
                new = self.graph.get_attr(self.fresh_attr(obj, str(node.target)))
                new.meta = dict(node.meta)
            else:
                new = self.graph.node_copy(node, lambda n: env[n])
            if ac is not None and node.op not in ("placeholder", "get_attr"):
                new.meta["recompute"] = _prefer_recompute()
                new.meta["ac_graph_id"] = ac[0]
            env[node] = new
        raise AssertionError("graph without output")  # pragma: no cover

    def hop(self, owner: fx.GraphModule, node: fx.Node, name: str, env: dict[fx.Node, Any],
            ac: tuple[int, Any] | None) -> None:
        if name in INLINED:
            body = _attr(owner, str(node.args[0].target))
            operands = list(node.args[2:] if name == "invoke_subgraph" else node.args[1:])
            inner_ac = ac
            if name == "tag_activation_checkpoint":
                graph_id = next(_ac_ids)
                inner_ac = (graph_id, None)
                self.ac_contexts[graph_id] = body.meta.get("_checkpoint_context_fn")
            result = self.copy(body, {}, fx.node.map_arg(operands, lambda n: env[n]), inner_ac)
            env[node] = result
            log.debug("inlined %s body at %s", name, _location(node))
            return
        if name == flex.HOP_NAME:  # FlexAttention: a marker op the find stage turns into a site
            env[node] = flex.lower_flex_call(self.graph, owner, node, env, _attr, _location(node))
            return
        if name in OPAQUE:
            for body in bodies(owner, node):
                for call in attention_calls(body):
                    self.rejected.append(HopRejected(
                        _location(call), name,
                        f"inside torch.ops.higher_order.{name}, which the backend keeps opaque "
                        f"({_OPAQUE_WHY[name]}); this attention runs unsharded on every rank", call))
            new = self.graph.node_copy(node, lambda n: env[n])
            if ac is not None:
                new.meta["recompute"] = _prefer_recompute()
                new.meta["ac_graph_id"] = ac[0]
            env[node] = new
            return
        raise UnsupportedPatternError(
            f"the graph holds torch.ops.higher_order.{name} at {_location(node)}, which the passes do not "
            "understand (retracing it would bake tensors into constants); the graph is left unchanged")


def _refuse_vmap(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") in _VMAP_FUNCTIONS:
            raise UnsupportedPatternError(
                f"the graph runs functorch vmap ({node.target.__name__} at {_location(node)}) outside a "
                "BlockMask of a FlexAttention call; the aten retrace cannot replay it")


_OPAQUE_WHY = {
    "autograd_function_apply": "a custom autograd.Function keeps its own forward and backward",
    "cond": "data-dependent control flow",
}


def _getitem_target() -> Any:
    import operator

    return operator.getitem


_getitem = _getitem_target()


def _prefer_recompute() -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.PREFER_RECOMPUTE


def has_hops(gm: fx.GraphModule) -> bool:
    return any(hop_name(n) is not None or getattr(n.target, "__name__", "") in _VMAP_FUNCTIONS
               for n in gm.graph.nodes if n.op == "call_function")


def flatten_hops(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with INLINED HOPs inlined (``gm`` is not changed); raises for refused ones.

    The result's ``meta[REJECTED_KEY]`` lists attention inside opaque HOPs and
    ``meta[AC_CONTEXT_KEY]`` maps each checkpoint region's ``ac_graph_id`` to its context_fn.
    """
    flat = _Flattener(gm)
    flat.copy(gm, {}, None, None)
    flex.prune_block_masks(flat.graph)  # create_block_mask's vmap work: the ring rebuilds its own blocks
    _refuse_vmap(flat.graph)
    out = fx.GraphModule(flat.attrs, flat.graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    out.meta[REJECTED_KEY] = flat.rejected
    out.meta[AC_CONTEXT_KEY] = flat.ac_contexts
    return out


# ---------------------------------------------------------------------------- autograd.Function


def emit_autograd_function(hop: Any, args: tuple, kwargs: dict) -> Any:
    """Inside the make_fx retrace: record ``hop(fwd, bwd, *args)`` as one node instead of tracing into it."""
    from torch.fx.experimental import proxy_tensor as pt
    from torch.utils import _pytree as pytree

    mode = pt.get_proxy_mode()
    if mode is None:
        return hop(*args, **kwargs)
    tracer = mode.tracer
    with pt.disable_proxy_modes_tracing():
        example = hop(*args, **kwargs)

    def unwrap(a: Any) -> Any:
        if isinstance(a, fx.GraphModule):
            name = tracer.get_fresh_qualname("autograd_function_body")
            tracer.root.register_module(name, a)
            return tracer.create_proxy("get_attr", name, (), {})
        return tracer.unwrap_proxy(a) if isinstance(a, (torch.Tensor, torch.SymInt, torch.SymFloat)) else a

    proxy_args = tuple(unwrap(a) for a in args)
    proxy_kwargs = pytree.tree_map(lambda a: a, kwargs)
    out_proxy = tracer.create_proxy("call_function", hop, proxy_args, proxy_kwargs)
    return pt.track_tensor_tree(example, out_proxy, constant=None, tracer=tracer)


def is_autograd_function(target: Any) -> bool:
    return isinstance(target, torch._ops.HigherOrderOperator) and target.name() == "autograd_function_apply"


# ---------------------------------------------------------------------------- checkpoint tags


def apply_selective_policies(aten_gm: fx.GraphModule, contexts: dict[int, Callable | None]) -> None:
    """Replace the default PREFER_RECOMPUTE tag with the user's policy in selective-checkpoint regions.

    The policy sees the pre-dispatch aten op (``aten.linear``, not its ``aten.mm``); for the
    composite matmul-likes it is also asked about the mm/bmm/addmm they run, and "save" wins.
    """
    from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

    policies: dict[int, Callable] = {}
    for graph_id, context_fn in contexts.items():
        if context_fn is None:
            continue
        fwd_ctx, _ = context_fn()
        policy = getattr(fwd_ctx, "policy_fn", None)
        if policy is None:
            raise UnsupportedPatternError(
                "selective checkpointing context without a policy function; "
                "pass context_fn=partial(create_selective_checkpoint_contexts, ...)")
        policies[graph_id] = policy
    if not policies:
        return
    aten = torch.ops.aten
    also = {aten.linear.default: (aten.addmm.default, aten.mm.default),
            aten.matmul.default: (aten.mm.default, aten.bmm.default),
            aten.einsum.default: (aten.bmm.default, aten.mm.default)}
    ctx = SelectiveCheckpointContext(is_recompute=False)
    saves = (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE)
    for node in aten_gm.graph.nodes:
        policy = policies.get(node.meta.get("ac_graph_id"))
        if policy is None or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        vals = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        choices = [policy(ctx, op, *vals[0], **vals[1]) for op in (node.target, *also.get(node.target, ()))]
        saved = [c for c in choices if c in saves]
        node.meta["recompute"] = saved[0] if saved else choices[0]


def mark_ring_ops_saved(gm: fx.GraphModule) -> int:
    """Tag every ring_attention call MUST_SAVE when the graph holds checkpoint regions.

    The backward then reuses the saved (out, lse) and never re-runs the ring forward, so no
    collective is repeated in the backward (recomputed collectives are where checkpointing
    and sequence parallelism deadlock elsewhere). Returns how many calls were tagged.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if not any("ac_graph_id" in n.meta for n in gm.graph.nodes):
        return 0
    from .aten import is_ring_call

    count = 0
    for node in gm.graph.nodes:
        if not is_ring_call(node):
            continue
        graph_id = _nearest_ac_id(node)
        for n in (node, *node.users):
            n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            if graph_id is not None:
                n.meta["ac_graph_id"] = graph_id
        count += 1
    return count


def _nearest_ac_id(node: fx.Node, depth: int = 6) -> int | None:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if "ac_graph_id" in a.meta:
                    return a.meta["ac_graph_id"]
                nxt.append(a)
        frontier = nxt
    return None
