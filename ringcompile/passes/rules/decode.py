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
from .window import cache_lengths, mask_window

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
    pattern: str = "sdpa"  # or "eager-chain": HF's matmul-softmax-matmul spelling


def is_gather(node: Any) -> bool:
    """A ``cache_gather`` call: its overload (what HF's cache records) or the packet (a direct call)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    name = getattr(getattr(node.target, "_schema", None), "name", None)
    return (name or getattr(node.target, "_qualified_op_name", None)) == _GATHER


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


def _dims(node: Any) -> tuple[str, ...] | None:
    val = _val(node)
    return tuple(str(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def _is_expand(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "expand") or (
        node.op == "call_function" and node.target == aten.expand.default)


def read_problem(read: tuple[fx.Node, int, list[fx.Node]]) -> str | None:
    """Why a walked ``cache_read`` is not the layer's keys / values whole with their heads repeated in
    repeat_kv's order (query head h reads kv head h // g, what decode_attention assumes); None: it is.

    Judged from the shapes along the walk, which the view ops between them fix (row-major): every
    step is the cache (B, Hkv, T, D), that with a head copy dim (B, Hkv, 1 or g, T, D), or at the end
    (B, Hkv * g, T, D); an expand keeps its input's rank (no broadcast that adds leading dims). A
    tile-order repeat (B, g, Hkv, T, D), a slice or a reshape along the sequence fails."""
    gather, index, walked = read
    cache = _val(gather)
    if not isinstance(cache, (tuple, list)) or len(cache) != 2 or not isinstance(cache[index], torch.Tensor):
        return "its cache read has no shape recorded"
    base = tuple(str(d) for d in cache[index].shape)
    final = _dims(walked[0])
    if len(base) != 4 or final is None or len(final) != 4:
        return "only 4-D (B, H, S, D) reads of a sharded cache are rewritten"
    B, hkv, T, D = base
    if not (hkv.isdigit() and final[1].isdigit()) or int(final[1]) % int(hkv):
        return f"its keys / values have {final[1]} heads, not a multiple of the cache's {hkv}"
    g = str(int(final[1]) // int(hkv))
    allowed = {base, (B, hkv, "1", T, D), (B, hkv, g, T, D)}
    if final != (B, str(int(hkv) * int(g)), T, D):
        return "its keys / values are not the cache read whole (sliced or reshaped along the sequence)"
    for node in walked[1:]:
        if _dims(node) not in allowed:
            return ("its keys / values pass through a shape other than repeat_kv's (B, Hkv, g, T, D) "
                    "(another head order, a slice or a reshape)")
    for node in walked:
        if _is_expand(node) and len(_dims(node.args[0]) or ()) != len(_dims(node) or ()):
            return "its keys / values are expanded with new leading dims (not repeat_kv's head copies)"
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
    reason = read_problem(k) or read_problem(v)
    if reason is not None:
        return reason
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
    reason = _mask_problem(args["attn_mask"], q, kf[0].shape[2])
    if reason is not None:
        return reason
    if not isinstance(args["scale"], (int, float, type(None))):
        return "its scale is not a constant"
    return None


def _mask_problem(mask_node: Any, q: Any, kv_len: Any) -> str | None:
    """Why this mask cannot be passed whole to decode_attention (bool, or additive float over the cache
    slots, 4-D or fewer dims broadcasting to the scores); None: it can."""
    if mask_node is None:
        return None
    mask = _val(mask_node)
    if not isinstance(mask, torch.Tensor):
        return "its mask is not a tensor"
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return f"its mask is a {mask.dtype} tensor; only boolean or additive float masks reach the shard"
    if mask.dim() != 4 or (q is not None and str(mask.shape[-2]) not in ("1", str(q.shape[-2]))):
        return f"its mask {tuple(mask.shape)} is not a 4-D (B, H, Sq, cache) mask over the cache's slots"
    if str(mask.shape[-1]) != str(kv_len):
        return f"its mask covers {mask.shape[-1]} keys, not the cache's {kv_len} slots"
    return None


def _prefill_layout(gather: fx.Node) -> str:
    """The cache's prefill layout a ``cache_gather`` call carries (argument 8; older calls: contiguous)."""
    from ringcompile.cache_codes import COMPILED_PREFILL_LAYOUT

    if len(gather.args) > 8:
        return gather.args[8]
    return gather.kwargs.get("prefill_layout", COMPILED_PREFILL_LAYOUT)


def layout_arg(gather: fx.Node) -> list[Any]:
    """The cache layout argument of the emitted op, from the gather's prefill length and layout. The
    prefill length is a graph node (a SymInt) once Dynamo has seen caches with different prefill lengths
    (a new conversation, or assisted generation, whose first forward is the prompt plus the draft's
    candidates): it stays a node, and the op reads the value at run time."""
    from ringcompile.cache_codes import COMPILED_POLICY, layout_code

    prefill_len = gather.args[5]
    code: list[Any] = layout_code(0, _prefill_layout(gather), COMPILED_POLICY)
    code[0] = prefill_len if isinstance(prefill_len, fx.Node) else int(prefill_len)
    return code


def rewrite_cache_attention(gm: fx.GraphModule) -> list[DecodeRewrite]:
    """Replace each SDPA over a gathered sharded cache by decode_attention on the shard (in place)."""
    done: list[DecodeRewrite] = []
    lengths = cache_lengths(gm, is_gather)
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
        keys, values, slots, positions, _max_len, prefill_len, group_name, timeout = gather.args[:8]
        window = mask_window(args["attn_mask"], _val(gather)[0].shape[2], positions, lengths)
        q = _val(args["query"])
        scale = float(args["scale"]) if args["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        layout = layout_arg(gather)
        mask = _val(args["attn_mask"])
        # a prompt chunk takes the chunk op, which slices a boolean mask per rank; an additive mask on a
        # chunk stays with decode_attention (replicated queries, the mask passed whole: correct, not cheaper)
        decode = (isinstance(q.shape[2], int) and q.shape[2] == 1) or (
            isinstance(mask, torch.Tensor) and mask.dtype != torch.bool)
        with gm.graph.inserting_before(node):
            if decode:
                new = gm.graph.call_function(
                    torch.ops.ringcompile.decode_attention.default,
                    (args["query"], keys, values, slots, positions, args["attn_mask"], -1,
                     -1 if window is None else window, scale, group_name, float(timeout), layout))
            else:       # a prompt chunk (multi-turn / chunked prefill): pass-KV or pass-Q, by the cost model
                new = gm.graph.call_function(
                    torch.ops.ringcompile.chunk_cache_attention.default,
                    (args["query"], keys, values, slots, positions, args["attn_mask"], scale, group_name,
                     float(timeout), layout, "auto", -1 if window is None else window))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        _erase_unused([args["key"], args["value"], gather])
        what = ("decode_attention on this rank's cache shard" if decode
                else "chunk_cache_attention (pass-KV / pass-Q) on this rank's cache shard")
        if window is not None:
            what += f" (sliding window {window}, read from the mask: shards outside it are skipped)"
        done.append(DecodeRewrite(location_of(new), True, what))
    done += _rewrite_eager_chains(gm)
    if any(d.rewritten for d in done):
        gm.graph.lint()
        gm.recompile()
    return done


def _rewrite_eager_chains(gm: fx.GraphModule) -> list[DecodeRewrite]:
    """Each plain eager chain over a gathered cache (``match_eager_chain``) becomes decode_attention."""
    done: list[DecodeRewrite] = []
    for sm in list(gm.graph.nodes):
        if not _is(sm, _SOFTMAX_TARGETS, frozenset({"softmax"})):
            continue
        chain = match_eager_chain(sm)
        if chain is None:
            continue
        if isinstance(chain, str):
            done.append(DecodeRewrite(location_of(sm), False, chain, "eager-chain"))
            continue
        keys, values, slots, positions, _max_len, prefill_len, group_name, timeout = chain.gather.args[:8]
        layout = layout_arg(chain.gather)
        with gm.graph.inserting_before(chain.output):
            new = gm.graph.call_function(
                torch.ops.ringcompile.decode_attention.default,
                (chain.query, keys, values, slots, positions, chain.mask, -1, -1, chain.scale, group_name,
                 float(timeout), layout))
        new.meta = dict(chain.output.meta)
        chain.output.replace_all_uses_with(new)
        inputs = list(chain.output.all_input_nodes)
        gm.graph.erase_node(chain.output)
        _erase_unused(inputs + [chain.gather])
        done.append(DecodeRewrite(location_of(new), True, "decode_attention on this rank's cache shard "
                                                          "(eager softmax chain)", "eager-chain"))
    return done


def _erase_unused(roots: list[Any]) -> None:
    """Erase the repeat / getitem chains (and the gather) nothing reads any more."""
    todo = [r for r in roots if isinstance(r, fx.Node)]
    erased: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in erased or n.users or not (n.op == "call_function" or (
                n.op == "call_method" and n.target in _ERASABLE_METHODS)):
            continue
        inputs = list(n.all_input_nodes)
        n.graph.erase_node(n)
        erased.add(n)
        todo.extend(a for a in inputs if a.op in ("call_function", "call_method") and not a.users)


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
    chain = match_eager_chain(node) if node.args else None
    why = chain if isinstance(chain, str) else "the decode rewrite did not take this softmax chain"
    raise Decline(f"{_LEFT}: {why} (attn_implementation='sdpa', or a plain softmax(q @ k^T * scale + "
                  "mask) @ v, becomes decode_attention)")


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


# --- HF's eager spelling: softmax(q @ k^T * scale + mask) @ v over the gathered cache -------------------

_SOFTMAX_TARGETS = {torch.nn.functional.softmax, torch.softmax, aten.softmax.int, aten._softmax.default}
_MATMULS = {torch.matmul, operator.matmul, aten.matmul.default}
_ADDS = {operator.add, torch.add, aten.add.Tensor}
_MULS = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_DIVS = {operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar}
_DROPOUTS = {torch.nn.functional.dropout, aten.dropout.default}
_CASTS = {"to", "type", "float"}
_ERASABLE_METHODS = _REPEAT_METHODS | _CASTS | {"transpose", "permute", "softmax"}


@dataclasses.dataclass
class EagerChain:
    """One matched ``softmax(q @ k^T * scale + mask) @ v`` over a gathered cache."""

    query: fx.Node
    gather: fx.Node
    mask: fx.Node | None
    scale: float
    output: fx.Node          # the p @ v matmul the decode_attention call replaces


def _is(node: Any, targets: set, methods: frozenset = frozenset()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in targets) or (
        node.op == "call_method" and node.target in methods)


def _is_key_transpose(node: Any) -> fx.Node | None:
    """``k.transpose(2, 3)`` / ``(-2, -1)`` / ``.mT`` of a 4-D k: the k, else None."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    if (node.op == "call_method" and node.target == "transpose") or (
            node.op == "call_function" and node.target in (torch.transpose, aten.transpose.int)):
        dims = {d % 4 for d in node.args[1:3] if isinstance(d, int)}
        return node.args[0] if dims == {2, 3} else None
    return None


def _one_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _softmax_dim(node: fx.Node) -> Any:
    """The softmax's dim (``F.softmax(x, dim)``, ``x.softmax(dim)`` and aten all put it second)."""
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def match_eager_chain(sm: fx.Node) -> EagerChain | str | None:
    """The chain around softmax ``sm`` when it is HF's eager attention over a gathered cache; a reason
    string when it reads the cache but is not plain (then it stays on the gathered cache); None when it
    does not read a gathered cache at all."""
    x = sm.args[0]
    scale, mask = 1.0, None
    while True:   # backwards from the softmax input: additive mask, constant scale, then q @ k^T
        if _is(x, _ADDS) and len(x.args) == 2 and all(isinstance(a, fx.Node) for a in x.args):
            a, b = x.args
            score_side = a if _leads_to_gathered_keys(a) else b if _leads_to_gathered_keys(b) else None
            if score_side is None:
                return None
            if mask is not None:
                return "more than one additive term on its scores (only one mask is passed to the shard)"
            mask, x = (b if score_side is a else a), score_side
        elif _is(x, _MULS | _DIVS) and len(x.args) == 2 and isinstance(x.args[1], (int, float)):
            scale = scale * x.args[1] if x.target in _MULS else scale / x.args[1]
            x = x.args[0]
        elif _is(x, _MULS) and len(x.args) == 2 and isinstance(x.args[0], (int, float)):
            scale, x = scale * x.args[0], x.args[1]
        else:
            break
        if len(x.users) != 1:
            return "its scores are read by something besides the softmax"
    if not _is(x, _MATMULS) or len(x.args) != 2:
        return None if not _leads_to_gathered_keys(x) else (
            "its scores pass through ops other than a constant scale and an additive mask (softcap, "
            "bias products); only that plain chain becomes decode_attention")
    query, kt = x.args
    key = _is_key_transpose(kt)
    read = cache_read(key) if key is not None else None
    if read is None or read[1] != 0:
        return None if not _leads_to_gathered_keys(x) else "its keys are not a read of the gathered cache"
    if _softmax_dim(sm) not in (-1, 3):
        return "its softmax is not over the last (key) dimension"
    out = _pv_matmul(sm)
    if isinstance(out, str):
        return out
    v_read = cache_read(out.args[1])
    if v_read is None or v_read[0] is not read[0] or v_read[1] != 1:
        return "its probabilities multiply something other than the same cache layer's values"
    reason = read_problem(read) or read_problem(v_read)
    if reason is not None:
        return reason
    q = _val(query)
    if q is None or q.dim() != 4:
        return "only 4-D (B, H, S, D) attention on a sharded cache is rewritten"
    if q.shape[1] % _val(read[0])[0].shape[1]:
        return "its query heads are not a multiple of the cache's kv heads"
    reason = _mask_problem(mask, q, _val(read[0])[0].shape[2])
    if reason is not None:
        return reason
    if _val(out) is None or _val(out).dtype != q.dtype:
        return "its output's dtype is not the queries' (a cast between the softmax and the p @ v product)"
    return EagerChain(query, read[0], mask, float(scale), out)


def _leads_to_gathered_keys(node: Any, depth: int = 12) -> bool:
    """Is a cache_gather among the inputs of ``node`` within ``depth`` ops?"""
    frontier = {node} if isinstance(node, fx.Node) else set()
    seen = set(frontier)
    for _ in range(depth):
        if any(is_gather(n) for n in frontier):
            return True
        frontier = {a for n in frontier for a in n.all_input_nodes} - seen
        seen |= frontier
    return False


def _pv_matmul(sm: fx.Node) -> fx.Node | str:
    """Forward from the softmax through casts and inactive dropout to the p @ v matmul."""
    node = sm
    while True:
        user = _one_user(node)
        if user is None:
            return "its probabilities are read by more than the p @ v product (returned attention weights)"
        if _is(user, _MATMULS) and user.args[0] is node:
            return user
        if _is(user, set(), frozenset(_CASTS)):
            node = user
        elif _is(user, _DROPOUTS):
            p = user.kwargs.get("p", user.args[1] if len(user.args) > 1 else 0.5)
            train = user.kwargs.get("training", user.kwargs.get("train", user.args[2] if len(user.args) > 2
                                                               else True))
            if p not in (0, 0.0) and train is not False:
                return "dropout on attention over a KV cache"
            node = user
        else:
            return f"its probabilities pass through {user.target} before the p @ v product"
