"""The decode rule: attention that reads a sharded KV cache becomes ``decode_attention`` on the shard.

A compiled forward over ``sharded_cache(..., compiled=True)`` reads its keys / values from
``ringcompile::cache_gather`` (the whole cache, gathered; ``runtime/cache_append.py``), optionally
repeated over the query heads (HF's ``repeat_kv``: index with None, expand, reshape). An SDPA whose
K and V are such a read, with a boolean mask (or none), no dropout, becomes one
``torch.ops.ringcompile.decode_attention`` call on this rank's shard, its slots and the step's query
positions (all arguments of the gather), with the mask passed whole (it is gathered at the shard's
slots inside the op): the queries stay replicated, each rank attends its shard, partials are merged
across ranks. Nothing is gathered, and the graph has fixed shapes (the cache is preallocated), so
one decode graph serves every token. An SDPA whose query length is not statically 1 (a later prompt
chunk: multi-turn / chunked prefill) becomes ``torch.ops.ringcompile.chunk_cache_attention`` instead
(``runtime/chunk_op.py``: each rank takes its share of the chunk's queries, pass-KV or pass-Q by the
cost model, outputs all-gathered back).

``rewrite_cache_attention`` runs on the Dynamo graph before the pipeline (the op needs the gather's
arguments, which the pipeline's sharding would otherwise treat as replicated inputs). An SDPA on the
gathered cache that it leaves (another mask kind, dropout) is declined by the registered rule
``decode`` with the reason, so ``explain()`` and the unsharded-attention WARNING name it; it runs on
the gathered cache (correct, the cache is still stored 1/N per rank); so is a softmax chain over it
(rule ``decode-softmax``, HF's eager attention).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ..locations import location_of
from .base import Decline, Rule, register_rule
from .ops import SOFTMAX_OPS
from .shapes import _is_full_slice

_GATHER = "ringcompile::cache_gather"
_REPEAT_METHODS = {"expand", "reshape", "view", "contiguous"}
aten = torch.ops.aten
_REPEAT_OPS = {aten.expand.default, aten.reshape.default, aten.view.default, aten.unsqueeze.default,
               aten.clone.default, aten._unsafe_view.default}
_SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}


@dataclasses.dataclass(frozen=True)
class DecodeRewrite:
    """What the rewrite did (or declined) at one attention: for explain() and the backend's decisions."""

    location: str
    rewritten: bool
    reason: str


def is_gather(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and getattr(
        getattr(node.target, "_schema", None), "name", None) == _GATHER


def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_head_unsqueeze(node: fx.Node) -> bool:
    """``x[:, :, None, :, :]`` (repeat_kv's head unsqueeze) as Dynamo records it."""
    if node.target is not operator.getitem or not isinstance(node.args[1], tuple):
        return False
    idx = node.args[1]
    return (len(idx) >= 3 and idx[2] is None and all(i == slice(None) for i in idx[:2])
            and all(i == slice(None) or i is Ellipsis for i in idx[3:]))


def _is_repeat_step(node: fx.Node) -> bool:
    """One op of a KV-head repeat (HF's repeat_kv, Dynamo's or aten's spelling)."""
    if node.op == "call_method":
        return node.target in _REPEAT_METHODS
    if node.op != "call_function":
        return False
    return (node.target in _REPEAT_OPS or _is_head_unsqueeze(node)
            or (node.target == aten.slice.Tensor and _is_full_slice(node)))


def cache_read(node: Any) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """(the gather, 0 for keys / 1 for values, the repeat nodes walked) when ``node`` is a head-repeated
    (or plain) read of a gathered cache; None otherwise."""
    walked: list[fx.Node] = []
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target is operator.getitem and is_gather(node.args[0]):
            return node.args[0], int(node.args[1]), walked + [node]
        if not _is_repeat_step(node):
            return None
        walked.append(node)
        node = node.args[0]
    return None


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                            "enable_gqa": False}
    args.update(dict(zip(names, node.args, strict=False)))
    args.update(node.kwargs)
    return args


def why_not(node: fx.Node) -> str | None:
    """Why the SDPA ``node`` on a gathered cache cannot become decode_attention (None: it can)."""
    args = _sdpa_args(node)
    k, v = cache_read(args["key"]), cache_read(args["value"])
    if k is None or v is None or k[0] is not v[0] or (k[1], v[1]) != (0, 1):
        return "its keys and values are not the keys and values of one sharded cache layer"
    q, kf = _val(args["query"]), _val(k[0])
    if q is None or kf is None or q.dim() != 4:
        return "only 4-D (B, H, S, D) attention on a sharded cache is rewritten"
    if q.shape[1] % kf[0].shape[1]:
        return f"query heads ({q.shape[1]}) are not a multiple of the cache's kv heads ({kf[0].shape[1]})"
    key_val = _val(args["key"])
    if key_val is None or key_val.shape[2] != kf[0].shape[2] or key_val.shape[-1] != kf[0].shape[-1]:
        return "the keys are not the cache read whole (sliced or reshaped along the sequence)"
    if args["dropout_p"] not in (0, 0.0):
        return "dropout on attention over a KV cache"
    if args["is_causal"] not in (False, 0):
        return "is_causal over a KV cache (HF passes a mask there; SDPA's top-left causal is not a cache's)"
    mask = _val(args["attn_mask"])
    if args["attn_mask"] is not None and (mask is None or mask.dtype != torch.bool):
        return (f"its mask is a {getattr(mask, 'dtype', 'non-tensor')} tensor (additive); only boolean masks "
                "are gathered at the shard's slots")
    if not isinstance(args["scale"], (int, float, type(None))):
        return "its scale is not a constant"
    return None


def rewrite_cache_attention(gm: fx.GraphModule) -> list[DecodeRewrite]:
    """Replace each SDPA over a gathered sharded cache by decode_attention on the shard (in place)."""
    from ringcompile.cache_codes import COMPILED_POLICY, COMPILED_PREFILL_LAYOUT, layout_code

    done: list[DecodeRewrite] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        args = _sdpa_args(node)
        if cache_read(args["key"]) is None:
            continue
        reason = why_not(node)
        if reason is not None:
            done.append(DecodeRewrite(location_of(node), False, reason))
            continue
        gather, _, _ = cache_read(args["key"])
        keys, values, slots, positions, _max_len, prefill_len, group_name, timeout = gather.args
        q = _val(args["query"])
        scale = float(args["scale"]) if args["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        layout = layout_code(int(prefill_len), COMPILED_PREFILL_LAYOUT, COMPILED_POLICY)
        decode = isinstance(q.shape[2], int) and q.shape[2] == 1
        with gm.graph.inserting_before(node):
            if decode:
                new = gm.graph.call_function(
                    torch.ops.ringcompile.decode_attention.default,
                    (args["query"], keys, values, slots, positions, args["attn_mask"], -1, -1, scale,
                     group_name, float(timeout), layout))
            else:       # a prompt chunk (multi-turn / chunked prefill): pass-KV or pass-Q, by the cost model
                new = gm.graph.call_function(
                    torch.ops.ringcompile.chunk_cache_attention.default,
                    (args["query"], keys, values, slots, positions, args["attn_mask"], scale, group_name,
                     float(timeout), layout, "auto"))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        _erase_unused([args["key"], args["value"], gather])
        what = ("decode_attention on this rank's cache shard" if decode
                else "chunk_cache_attention (pass-KV / pass-Q) on this rank's cache shard")
        done.append(DecodeRewrite(location_of(new), True, what))
    if any(d.rewritten for d in done):
        gm.graph.lint()
        gm.recompile()
    return done


def _erase_unused(roots: list[Any]) -> None:
    """Erase the repeat / getitem chains (and the gather) nothing reads any more."""
    todo = [r for r in roots if isinstance(r, fx.Node)]
    erased: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in erased or n.users or n.op != "call_function":
            continue
        inputs = list(n.all_input_nodes)
        n.graph.erase_node(n)
        erased.add(n)
        todo.extend(a for a in inputs if a.op == "call_function" and not a.users)


def _reads_a_cache(node: fx.Node) -> bool:
    """SDPA over a gathered sharded cache, or (decode) over an HF cache nobody sharded."""
    if node.target != aten.scaled_dot_product_attention.default or len(node.args) < 2:
        return False
    return cache_read(node.args[1]) is not None or reads_unsharded_cache(node)


def _decline(node: fx.Node, index: int):
    if cache_read(node.args[1]) is None:
        raise Decline(PLAIN_CACHE_REASON)
    reason = why_not(node) or "the decode rewrite did not take it"
    raise Decline(f"{_LEFT}: {reason}")


def _near_gathered_cache(node: fx.Node, depth: int = 12) -> bool:
    """A softmax whose scores come from a gathered cache within ``depth`` ops (HF's eager attention)."""
    if node.target not in SOFTMAX_OPS:
        return False
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        if any(is_gather(a) for a in frontier):
            return True
    return False


def _decline_softmax(node: fx.Node, index: int):
    raise Decline(f"{_LEFT}: only SDPA over the cache becomes decode_attention (this is a softmax chain; "
                  "attn_implementation='sdpa' shards it)")


def _unsharded_cache_source(node: Any) -> fx.Node | None:
    """The node a plain (unsharded) HF KV cache hands attention: ``cat(past, new)`` (DynamicCache) or an
    in-place write into a graph input (StaticCache's ``index_copy_``), reached through a head repeat."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in _CACHE_WRITES:
            past = node.args[0]
            past = past if isinstance(past, (list, tuple)) else [past]
            return node if any(isinstance(p, fx.Node) and p.op == "placeholder" for p in past) else None
        if not _is_repeat_step(node):
            return None
        node = node.args[0]
    return None


def reads_unsharded_cache(node: fx.Node) -> bool:
    """An SDPA whose keys come from an HF cache the user did not shard and are longer than its queries
    (a decode / later-chunk step: the whole cache is on every rank)."""
    if node.target not in _SDPA_TARGETS or len(node.args) < 3:
        return False
    q, k = _val(node.args[0]), _val(node.args[1])
    if q is None or k is None or q.dim() != 4 or k.dim() != 4 or str(q.shape[-2]) == str(k.shape[-2]):
        return False
    return cache_read(node.args[1]) is None and _unsharded_cache_source(node.args[1]) is not None


PLAIN_CACHE_REASON = ("attention over an HF KV cache that is not sharded (every rank holds and attends the "
                      "whole cache; correct, unsharded): pass ringcompile.serving.hf.sharded_cache("
                      "num_layers, rank, world, max_cache_len=M, compiled=True) to generate as its cache, "
                      "or call ringcompile.serving.prepare(model) once")


_CACHE_WRITES = {aten.cat.default, aten.index_copy.default, aten.index_copy_.default, aten.index_put.default,
                 aten.index_put_.default, aten.copy_.default, aten.slice_scatter.default}
_LEFT = ("attention over a sharded KV cache left on the gathered cache (correct; every rank gathers that "
         "layer's cache per step)")
DECODE_RULE = register_rule(Rule("decode", _reads_a_cache, _decline, pattern="sdpa"), before="sdpa")
DECODE_SOFTMAX_RULE = register_rule(Rule("decode-softmax", _near_gathered_cache, _decline_softmax,
                                         pattern="softmax"), before="softmax-sink")
