"""FlexAttention (``torch.ops.higher_order.flex_attention``) as one more spelling of attention.

Why a marker op: the HOP cannot survive the normalize retrace, and the BlockMask that
``create_block_mask`` builds inside the compiled code is computed under functorch's vmap, which
the retrace cannot replay ("tensor may have escaped from inside a function being vmapped").
We never need those block tensors: the ring rebuilds its own block structure from the mask_mod.
So, before the retrace (``passes.hops``), each flex call becomes one call of the opaque custom op
``ringcompile::flex_attention_site`` that takes only q, k, v and the mods' captured buffers, and
the block-mask construction is dropped from the graph (``lower_flex_call``, ``prune_block_masks``).
After the retrace, ``passes.flex_sites`` turns each marker into an ``AttentionSite`` whose mods are the
HOP's own subgraphs (they already have our signatures; captured buffers become the mods' extras),
classified for block skipping (causal, sliding window, document ids), and hands the
ring op's lse to a ``return_lse`` caller after the rewrite; a marker left in the graph is an error
(the backend then compiles the original graph, with the reason).

A flex call is only vouched for when its BlockMask provably means "mask_mod and nothing else":
built inside the compiled region by ``create_block_mask`` from the same mask_mod, or the dense
default when no block_mask was passed. A BlockMask passed in as an input can hold any block
sparsity, so such a call is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx

from ringcompile.errors import RingCompileError, UnsupportedPatternError
from ringcompile.log import get_logger
from ringcompile.mods import KEY_PADDING_LOOKUPS, Mod

from .aten import dynamo_val

log = get_logger(__name__)

HOP_NAME = "flex_attention"
_VMAP_BATCH = ("_add_batch_dim", "_remove_batch_dim")
_VMAP_STATE = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "lazy_load_decompositions")
_ROLE_NAMES = ("b", "h", "q_idx", "kv_idx")
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------- the marker op


@dataclasses.dataclass(frozen=True, eq=False)
class FlexCall:
    """What one flex call means, kept under the key its marker op carries."""

    score_gm: fx.GraphModule
    mask_gm: fx.GraphModule
    scale: float
    n_score: int
    n_mask: int
    location: str
    note: str | None = None
    guards: tuple = ()  # flex_guards.CallGuard: what every call must still satisfy once rewritten
    refused: str | None = None  # why the rule must decline it (decided before the retrace)
    block_spec: tuple | None = None  # ((Q_LEN, KV_LEN), BLOCK_SIZE, which kv block tensors are passed)


_CALLS: dict[str, FlexCall] = {}
_HOLDERS: dict[str, int] = {}  # key -> how many live objects (graph modules) hold it
_ids = itertools.count()


def hold_call(key: str, holder: Any) -> None:
    """Keep ``_CALLS[key]`` while ``holder`` lives (the graph whose compile or run needs it): the entry is
    freed when its last holder is garbage collected, so the registry does not grow with every compile."""
    if key not in _CALLS:
        return
    _HOLDERS[key] = _HOLDERS.get(key, 0) + 1
    weakref.finalize(holder, _release_call, key)


def _release_call(key: str) -> None:
    left = _HOLDERS.get(key, 0) - 1
    if left > 0:
        _HOLDERS[key] = left
        return
    _HOLDERS.pop(key, None)
    _CALLS.pop(key, None)


def live_call_count() -> int:
    """How many flex calls the registry holds (tests check it does not grow across compiles)."""
    return len(_CALLS)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("ringcompile::flex_attention_site", mutates_args=())
def flex_attention_site(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_buffers: list[torch.Tensor],
                        mask_buffers: list[torch.Tensor], key: str,
                        block_tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands for one flex call between the retrace and the rewrite; (out, natural-log lse).

    A marker the rewrite refused (while other sites of its graph were rewritten) stays in the graph and
    runs here as the original flex call, on replicated inputs (``run_original``)."""
    call = _CALLS.get(key)
    if call is None:
        raise RingCompileError(
            f"internal error: the FlexAttention marker {key!r} has no record (its graph was freed?); "
            "recompile the model (torch._dynamo.reset()) and report this")
    return run_original(call, q, k, v, score_buffers, mask_buffers, block_tensors)


def run_original(call: FlexCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 score_buffers: Sequence[torch.Tensor], mask_buffers: Sequence[torch.Tensor],
                 block_tensors: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The flex call the marker stands for, eagerly: its mods with their buffers and its BlockMask,
    rebuilt from the kv block tensors it carries, or built from mask_mod (where the call's BlockMask
    provably means mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    def score_mod(s, b, h, qi, ki):
        return call.score_gm(s, b, h, qi, ki, *score_buffers)

    def mask_mod(b, h, qi, ki):
        return call.mask_gm(b, h, qi, ki, *mask_buffers)

    block = None
    if call.block_spec is not None:
        seq_lengths, block_size, present = call.block_spec
        it = iter(block_tensors)
        kv = [next(it) if p else None for p in present]
        block = BlockMask.from_kv_blocks(kv[0], kv[1], kv[2], kv[3], BLOCK_SIZE=tuple(block_size),
                                         mask_mod=mask_mod, seq_lengths=tuple(seq_lengths))
    elif not _always_true(call.mask_gm):
        block = create_block_mask(mask_mod, q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block, scale=call.scale,
                              enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@flex_attention_site.register_fake
def _(q, k, v, score_buffers, mask_buffers, key, block_tensors):
    B, H, S, _ = q.shape
    return q.new_empty(B, H, S, v.shape[-1]), q.new_empty(B, H, S, dtype=_lse_dtype(q))


MARKER = torch.ops.ringcompile.flex_attention_site.default


def is_marker(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is MARKER


# ---------------------------------------------------------------------------- before the retrace


def _ancestors(nodes: Sequence[fx.Node], seen: set[fx.Node] | None = None) -> set[fx.Node]:
    """``nodes`` and everything they read, added to ``seen`` (a walk stops at nodes already in it)."""
    seen = set() if seen is None else seen
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack += n.all_input_nodes
    return seen


def _fn_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _check_block_mask(block: tuple, mask_gm: fx.GraphModule, mask_bufs: Sequence[fx.Node],
                      sizes: Sequence[Any], where: str, guards: list) -> str | None:
    """Refuse a BlockMask whose block sparsity might mean more than its mask_mod (see module docstring);
    returns a note for the report, if any."""
    q_len, kv_len = sizes[2], sizes[3]
    tensors = [a for a in block[:-1] if isinstance(a, fx.Node) and isinstance(dynamo_val(a), torch.Tensor)]
    outside = [a.name for a in tensors if a.op in ("placeholder", "get_attr")]
    if outside:
        why = _check_passed_block_mask(block, mask_gm, mask_bufs, sizes, guards)
        if why is None:
            return "BlockMask passed in: its blocks are checked against mask_mod (again on every call that " \
                "passes different contents)"
        raise UnsupportedPatternError(
            f"flex_attention at {where} takes a BlockMask built outside the compiled region (its block "
            f"tensors {outside} are graph inputs) whose blocks cannot be vouched for: {why}; the call is "
            "not rewritten")
    if _always_true(mask_gm):
        sizes = [a for a in block[:-1] if isinstance(a, int)]
        if len(sizes) >= 2 and _at_least(sizes[-2], q_len) and _at_least(sizes[-1], kv_len):
            return None  # flex's own default: one block covering everything, no mask
        raise UnsupportedPatternError(
            f"flex_attention at {where} has block sparsity but no mask_mod (BlockMask.from_kv_blocks?): "
            "only masks given as a mask_mod are rewritten")
    if not any(_fn_name(n) in _VMAP_BATCH for n in _ancestors(tensors)):
        raise UnsupportedPatternError(
            f"flex_attention at {where}: the BlockMask was not built by create_block_mask from its mask_mod "
            "in the compiled region, so its blocks may not match mask_mod; the call is not rewritten")
    return None


def _example(node: fx.Node) -> torch.Tensor | None:
    ex = getattr(node.meta.get("grapharg"), "example", None)
    return ex if isinstance(ex, torch.Tensor) and not isinstance(ex, torch._subclasses.FakeTensor) else None


def _blocks_dense(num: torch.Tensor | None, idx: torch.Tensor | None, n_kv: int) -> torch.Tensor | None:
    """(B, H, q_blocks, kv_blocks) bool: which kv blocks the ordered (num, idx) pair lists per q block."""
    if num is None or idx is None:
        return None
    keep = torch.arange(idx.shape[-1]).view(1, 1, 1, -1) < num.unsqueeze(-1).long()
    dense = torch.zeros(*idx.shape[:3], n_kv + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(keep, idx.long(), n_kv), True)
    return dense[..., :n_kv]


def _check_passed_block_mask(block: tuple, mask_gm: fx.GraphModule, mask_bufs: Sequence[fx.Node],
                             sizes: Sequence[Any], guards: list) -> str | None:
    """None when the example BlockMask means exactly mask_mod (``passed_block_mask_reason``); then a
    guard in ``guards`` re-checks it on every call whose block tensors or mask buffers change."""
    from .flex_guards import CallGuard, SameContents, input_position

    if _always_true(mask_gm):
        return "it has no mask_mod (block sparsity alone is not rewritten)"
    try:
        B, H, S, Skv = (int(x) for x in sizes)
        q_bs, kv_bs = int(block[-3]), int(block[-2])
    except Exception:  # noqa: BLE001
        return "its sizes are symbolic"
    slots = [i for i, a in enumerate(block[2:6]) if isinstance(a, fx.Node)]
    nodes = [block[2 + i] for i in slots] + list(mask_bufs)
    ex = [_example(a) for a in nodes]
    if any(e is None for e in ex) or slots[:2] != [0, 1]:
        return "its example values are not available at compile time"
    positions = [input_position(n) for n in nodes]
    if any(p is None for p in positions):
        return "its tensors are not inputs of the compiled graph"
    lifted = lifted_mod_graph(mask_gm, True, len(mask_bufs))

    def reason(*tensors: torch.Tensor) -> str | None:
        blocks: list[torch.Tensor | None] = [None] * 4
        for i, t in zip(slots, tensors, strict=False):
            blocks[i] = t
        return passed_block_mask_reason(blocks, tensors[len(slots):], lifted, (B, H, S, Skv), (q_bs, kv_bs))

    why = reason(*ex)
    if why is None:
        guards.append(CallGuard(tuple(positions), SameContents(ex, reason),  # type: ignore[arg-type]
                                "the BlockMask passed to flex_attention no longer means its mask_mod"))
    return why


def passed_block_mask_reason(blocks: Sequence[torch.Tensor | None], bufs: Sequence[torch.Tensor],
                             lifted: fx.GraphModule, sizes: tuple[int, int, int, int],
                             block_sizes: tuple[int, int]) -> str | None:
    """None when a BlockMask ((kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)) means
    exactly the lifted mask_mod on ``bufs``: every block holding a kept pair is listed, and every block
    listed as full keeps all its pairs (for every batch and head of the call)."""
    B, H, S, Skv = sizes
    q_bs, kv_bs = block_sizes
    if S * Skv * B * H > 2**28:
        return "too large to check"
    bufs = [t.cpu() for t in bufs]
    nq, nkv = -(-S // q_bs), -(-Skv // kv_bs)
    blocks = [None if t is None else t.cpu() for t in blocks]
    partial = _blocks_dense(blocks[0], blocks[1], nkv)
    full = _blocks_dense(blocks[2], blocks[3], nkv)
    if partial is None:
        return "it lists no blocks"
    listed = partial if full is None else partial | full
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.arange(H).view(1, -1, 1, 1)
    q = torch.arange(nq * q_bs).view(1, 1, -1, 1)
    kv = torch.arange(nkv * kv_bs).view(1, 1, 1, -1)
    try:
        keep = torch.as_tensor(lifted(b, h, q.clamp(max=S - 1), kv.clamp(max=Skv - 1), *bufs)).to(torch.bool)
    except Exception as exc:  # noqa: BLE001
        return f"mask_mod does not evaluate on index grids ({type(exc).__name__})"
    keep = keep.expand(B, H, nq * q_bs, nkv * kv_bs) & (q < S) & (kv < Skv)
    grid = keep.view(B, H, nq, q_bs, nkv, kv_bs)
    any_kept, all_kept = grid.any(5).any(3), grid.all(5).all(3)
    if listed.shape[-2:] != (nq, nkv):
        return f"its block grid {tuple(listed.shape[-2:])} is not {(nq, nkv)}"
    listed = listed.expand(B, H, nq, nkv)
    if bool((any_kept & ~listed).any()):
        return "it leaves out blocks where mask_mod keeps pairs"
    if full is not None and bool((full.expand(B, H, nq, nkv) & ~all_kept).any()):
        return "it lists blocks as full where mask_mod drops pairs"
    return None


def _at_least(size: Any, length: Any) -> bool:
    try:
        return bool(int(size) >= int(length))
    except Exception:  # noqa: BLE001 - symbolic sizes: not provable here
        return False


def lower_flex_call(graph: fx.Graph, owner: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any],
                    get_attr: Callable[[fx.GraphModule, str], Any], where: str) -> tuple:
    """Emit the marker op for the flex HOP ``node`` into ``graph`` (the flattener's new graph).

    Returns what ``env[node]`` becomes: the HOP's (out, lse, max) as new nodes (max: None).
    Raises UnsupportedPatternError for a call it cannot vouch for.
    """
    where = _user_location(node, where)
    args = list(node.args) + [()] * (9 - len(node.args))
    q, k, v, score_ref, block, scale, kernel_options, score_bufs, mask_bufs = args[:9]
    score_bufs = node.kwargs.get("score_mod_other_buffers", score_bufs)
    mask_bufs = node.kwargs.get("mask_mod_other_buffers", mask_bufs)
    kernel_options = dict(kernel_options or {})
    if not isinstance(block, tuple) or not block or not isinstance(block[-1], fx.Node):
        raise UnsupportedPatternError(f"flex_attention at {where}: block mask in an unknown form")
    if not isinstance(scale, (int, float)):
        raise UnsupportedPatternError(f"flex_attention at {where}: scale {scale!r} is not a number")
    score_gm = get_attr(owner, str(score_ref.target))
    mask_gm = get_attr(owner, str(block[-1].target))
    if not isinstance(score_gm, fx.GraphModule) or not isinstance(mask_gm, fx.GraphModule):
        raise UnsupportedPatternError(f"flex_attention at {where}: score_mod/mask_mod are not graphs")
    for bufs in (score_bufs, mask_bufs):
        if not all(isinstance(b, fx.Node) and isinstance(dynamo_val(b), torch.Tensor) for b in bufs):
            raise UnsupportedPatternError(
                f"flex_attention at {where}: a captured value of score_mod/mask_mod is not a tensor")
    qv, kv_ = dynamo_val(q), dynamo_val(k)
    if not isinstance(qv, torch.Tensor) or qv.dim() != 4 or kv_.dim() != 4:
        raise UnsupportedPatternError(f"flex_attention at {where}: q/k/v are not 4-D")
    sizes = [qv.shape[0], qv.shape[1], qv.shape[2], kv_.shape[2]]
    guards: list = []
    # judged in the flattened graph: a BlockMask handed into a HOP body (a checkpointed block taking
    # the mask as an argument) is then seen for what it is outside the body
    resolved = tuple(env.get(a, a) if isinstance(a, fx.Node) and a is not block[-1] else a for a in block)
    refused, block_spec, block_nodes = None, None, []
    try:
        note = _check_block_mask(resolved, mask_gm, [env.get(b, b) for b in mask_bufs], sizes, where, guards)
    except UnsupportedPatternError as exc:
        # kept as a marker that runs the original call with this very BlockMask (the flex rule declines
        # it with this reason), so the graph's other sites can still be rewritten
        kv_blocks = list(resolved[2:6])
        if not (isinstance(kv_blocks[0], fx.Node) and isinstance(kv_blocks[1], fx.Node)
                and all(type(a) is int for a in (block[0], block[1], block[-3], block[-2]))):
            raise
        refused, note = str(exc), None
        block_spec = ((block[0], block[1]), (block[-3], block[-2]), [a is not None for a in kv_blocks])
        block_nodes = [a for a in kv_blocks if a is not None]
    used: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            raise UnsupportedPatternError(f"flex_attention at {where}: its result is used whole")
        used.setdefault(int(user.args[1]), []).append(user)
    if any(used.get(2, [])) and any(u.users for u in used[2]):
        raise UnsupportedPatternError(
            f"flex_attention at {where} returns max_scores (return_aux): not supported by the ring op")
    key = f"flex{next(_ids)}"
    _CALLS[key] = FlexCall(score_gm, mask_gm, float(scale), len(score_bufs), len(mask_bufs), where, note,
                           tuple(guards), refused, block_spec)
    hold_call(key, owner)  # the Dynamo graph being compiled: freed with it
    marker = graph.call_function(MARKER, (env[q], env[k], env[v], [env[b] for b in score_bufs],
                                          [env[b] for b in mask_bufs], key, block_nodes))
    marker.meta = {m: node.meta[m] for m in ("stack_trace", "nn_module_stack") if m in node.meta}
    out = graph.call_function(operator.getitem, (marker, 0))
    lse = None
    if any(u.users for u in used.get(1, [])):
        lse = graph.call_function(operator.getitem, (marker, 1))
        if kernel_options.get("BACKEND") != "FLASH":  # the HOP's lse is in base 2 unless FLASH
            lse = graph.call_function(operator.mul, (lse, 1.0 / _LN2))
        hop_val = dynamo_val(node)
        want = hop_val[1].dtype if isinstance(hop_val, (tuple, list)) else None
        if want is not None and want != _lse_dtype(qv):
            lse = graph.call_method("to", (lse, want))
    log.debug("flex_attention at %s lowered to marker %s", where, key)
    return (out, lse, None)


def _user_location(node: fx.Node, fallback: str) -> str:
    """Module path and the innermost source line outside torch (flex's own wrapper is no news)."""
    import os

    from .locations import module_path

    torch_dir = os.path.dirname(torch.__file__)
    stack = node.meta.get("nn_module_stack")
    where = module_path(str(list(stack.values())[-1][0])) if stack else ""
    for text in reversed((node.meta.get("stack_trace") or "").strip().splitlines()):
        text = text.strip()
        parts = text.split('"')
        if text.startswith("File ") and len(parts) >= 3 and not parts[1].startswith(torch_dir):
            line = f"{os.path.basename(parts[1])}:{parts[2].split(',')[1].strip().replace('line ', '')}"
            return f"{where} @ {line}" if where else line
    return fallback


def _always_true(mask_gm: fx.GraphModule) -> bool:
    """mask_mod returns a constant True (flex's noop_mask)."""
    out = next(n for n in mask_gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node) or out.op != "call_method" or out.target != "new_ones":
        return out is True
    return out.kwargs.get("dtype") == torch.bool


def prune_block_masks(graph: fx.Graph) -> int:
    """Drop everything that only fed the BlockMasks of lowered flex calls, vmap bookkeeping included.

    A node stays when the output needs it or when it has a side effect other than functorch's vmap
    bookkeeping; a mutation (``x[i] = y``, in-place methods) stays only when its target stays.
    Returns how many nodes were removed. vmap nodes still alive afterwards are the caller's to refuse.
    """
    nodes = list(graph.nodes)

    if not any(is_marker(n) for n in nodes):
        return 0

    def written(n: fx.Node) -> Any:
        """What a mutation writes into (False: not a mutation)."""
        if n.op == "call_function" and n.target is operator.setitem:
            return n.args[0]
        if n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).startswith("_"):
            return n.args[0]
        return False

    def mutation_target(n: fx.Node) -> fx.Node | None:
        """The fresh tensor a mutation writes into (a view could alias a live tensor: then None)."""
        target = written(n)
        return target if isinstance(target, fx.Node) and _is_fresh(target) else None

    alive: set[fx.Node] = set()

    def mark(root: fx.Node) -> None:
        _ancestors([root], alive)

    for n in nodes:
        if n.op in ("output", "placeholder"):
            mark(n)
        elif n.op == "call_function" and _fn_name(n) in _VMAP_STATE:
            continue
        elif mutation_target(n) is None and (n.is_impure() or written(n) is not False):
            mark(n)
    changed = True
    while changed:
        changed = False
        for n in nodes:
            target = mutation_target(n)
            if target is not None and n not in alive and target in alive:
                mark(n)
                changed = True
    if any(_fn_name(n) in _VMAP_BATCH for n in alive):
        return 0  # vmap of the user's own: leave it for the caller to refuse
    removed = 0
    for n in reversed(nodes):
        if n not in alive:
            graph.erase_node(n)
            removed += 1
    return removed


_FRESH_METHODS = ("new_zeros", "new_ones", "new_empty", "new_full", "clone")
_FRESH_FUNCTIONS = ("zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
                    "full_like")


def _is_fresh(node: fx.Node) -> bool:
    """A tensor allocated by this node (no alias of anything else)."""
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _FRESH_FUNCTIONS \
        and getattr(node.target, "__module__", "") in ("torch", "torch._C._VariableFunctions", None)


# ---------------------------------------------------------------------------- mods from the HOP's graphs


def lifted_mod_graph(gm: fx.GraphModule, is_mask: bool, n_extras: int) -> fx.GraphModule:
    """The HOP subgraph with our placeholder names (score, b, h, q_idx, kv_idx, extra0...) and
    tuple-indexed lookups, the form ``classify_mods`` and the mods runtime read."""
    names = ([] if is_mask else ["score"]) + list(_ROLE_NAMES) + [f"extra{i}" for i in range(n_extras)]
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise UnsupportedPatternError(f"flex mod graph has {len(placeholders)} inputs, expected {len(names)}")
    attrs: dict[str, Any] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(names[placeholders.index(n)])
        elif n.op == "output":
            g.output(fx.node.map_arg(n.args[0], lambda a: env[a]))
        elif n.op == "get_attr":
            attrs[str(n.target).replace(".", "_")] = getattr(gm, str(n.target))
            env[n] = g.get_attr(str(n.target).replace(".", "_"))
        elif n.op == "call_method" and n.target == "to" and _device_only(n):
            env[n] = env[n.args[0]]  # x.to(device): a no-op on the index grids
        elif n.op == "call_method" and n.target == "new_ones" and _bool_scalar(n):
            env[n] = True  # HF's ``result = q_idx.new_ones((), dtype=bool)`` seed of an and-chain
        elif n.op in ("call_function", "call_method"):
            new = g.node_copy(n, lambda a: env[a])
            if n.op == "call_function" and n.target is operator.getitem \
                    and not isinstance(new.args[1], tuple):  # x[i] is x[(i,)]: the form lookups are read in
                new.args = (new.args[0], (new.args[1],))
            env[n] = new
        else:
            raise UnsupportedPatternError(f"flex mod graph holds a {n.op} node ({n.target})")
    out = fx.GraphModule(attrs, g)
    return out


def _device_only(n: fx.Node) -> bool:
    rest = list(n.args[1:]) + list(n.kwargs.values())
    return len(rest) == 1 and isinstance(rest[0], (torch.device, str)) and (
        isinstance(rest[0], torch.device) or rest[0] in ("cpu", "cuda"))


def _bool_scalar(n: fx.Node) -> bool:
    size = n.args[1] if len(n.args) > 1 else n.kwargs.get("size")
    return tuple(size or ()) == () and n.kwargs.get("dtype") == torch.bool


def _vmapped(fn: Callable, is_mask: bool) -> Callable:
    """fn over (b, h, q, kv) vectors through four nested vmaps, the way FlexAttention evaluates a mod."""
    from torch.func import vmap

    n = 4 if is_mask else 5
    off = 0 if is_mask else 1
    for dim in (3, 2, 1, 0):
        in_dims: list[Any] = [None] * n
        in_dims[off + dim] = 0
        if not is_mask:
            in_dims[0] = 0
        fn = vmap(fn, in_dims=tuple(in_dims), out_dims=0)
    return fn


def check_broadcast_semantics(gm: fx.GraphModule, is_mask: bool, sizes: Sequence[int],
                              extras: Sequence[torch.Tensor]) -> str | None:
    """None when evaluating ``gm`` on broadcast index grids (our runtime) equals flex's vmapped
    scalar evaluation on a probe grid; otherwise the reason it does not."""
    B, H, S, Skv = sizes
    pos = sorted({0, 1, 2, S // 2, S - 2, S - 1} & set(range(S)))
    kpos = sorted({0, 1, Skv // 3, Skv // 2, Skv - 2, Skv - 1} & set(range(Skv)))
    b = torch.arange(min(B, 2))
    h = torch.arange(min(H, 3))
    qi, ki = torch.tensor(pos), torch.tensor(kpos)
    score = torch.randn(len(b), len(h), len(qi), len(ki), generator=torch.Generator().manual_seed(0))
    lead = [] if is_mask else [score]
    try:
        want = _vmapped(lambda *a: gm(*a[:4 + (not is_mask)], *extras), is_mask)(
            *lead, b.int(), h.int(), qi.int(), ki.int())
        got = gm(*lead, b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), qi.view(1, 1, -1, 1), ki.view(1, 1, 1, -1),
                 *extras)
        got = torch.as_tensor(got).expand(want.shape)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot vouch"
        return f"it does not evaluate on broadcast index grids ({type(exc).__name__}: {exc})"
    if is_mask:
        ok = torch.equal(got.to(torch.bool), want.to(torch.bool))
    else:
        ok = torch.allclose(got.to(want.dtype), want, rtol=1e-5, atol=1e-6, equal_nan=True)
    return None if ok else "broadcast evaluation differs from FlexAttention's elementwise evaluation"


def _document_keep(expr: Any) -> tuple[bool, bool]:
    """(some clause of the keep formula is ``ids(b, q) == ids(b, kv)`` (packed documents), every
    clause that is not over indices alone is one)."""
    from .classify_mods import _cnf_clauses, _literal_set

    found, only = False, True
    for clause in _cnf_clauses(expr) or []:
        if all(_literal_set(atom, pol) is not None for atom, pol in clause):
            continue
        if _is_document_clause(clause):
            found = True
        else:
            only = False
    return found, only


def _is_document_clause(clause: list) -> bool:
    from .classify_mods import KV, SYMS, Q

    undef = sympy.core.function.AppliedUndef
    if len(clause) != 1 or not clause[0][1] or not isinstance(clause[0][0], sympy.Eq):
        return False
    atom = clause[0][0]
    terms = sympy.Add.make_args(sympy.expand(atom.args[0] - atom.args[1]))
    if len(terms) != 2:
        return False
    (c1, f1), (c2, f2) = (t.as_coeff_Mul() for t in terms)
    if not (isinstance(f1, undef) and isinstance(f2, undef) and f1.func == f2.func and c1 == -c2
            and abs(c1) == 1):
        return False
    return {f1.args, f2.args} in ({(SYMS["b"], Q), (SYMS["b"], KV)}, {(Q,), (KV,)})


def _position_causal(expr: Any, extras: Sequence[fx.Node]) -> tuple[Any, Any] | None:
    """HF's packed-sequence form of causality, ``pos[b, kv] <= pos[b, q]`` (``position_ids`` remapped
    indices, ``and``-ed with ``doc[b, q] == doc[b, kv]``): the keep formula with that clause read as
    ``kv <= q``, and the guard under which that reading is exact (positions increase inside each
    document, checked on every call), or None when the mask has no such clause over graph inputs."""
    from .classify_mods import KV, SYMS, Q, _cnf_clauses
    from .flex_guards import CallGuard, input_position, positions_increase_within_documents

    undef = sympy.core.function.AppliedUndef
    clauses = _cnf_clauses(expr) or []
    docs = [c[0][0] for c in clauses if _is_document_clause(c)]
    for n, clause in enumerate(clauses):
        if len(clause) != 1 or not clause[0][1]:
            continue
        atom = clause[0][0]
        if isinstance(atom, sympy.GreaterThan):
            diff = atom.args[0] - atom.args[1]  # diff >= 0
        elif isinstance(atom, sympy.LessThan):
            diff = atom.args[1] - atom.args[0]
        else:
            continue
        terms = [t.as_coeff_Mul() for t in sympy.Add.make_args(sympy.expand(diff))]
        if len(terms) != 2 or not all(isinstance(f, undef) and abs(c) == 1 for c, f in terms):
            continue
        (big, small) = [f for c, f in sorted(terms, key=lambda t: -t[0])]
        if small.func != big.func or sorted(c for c, _ in terms) != [-1, 1]:
            continue
        if (small.args, big.args) not in (((SYMS["b"], KV), (SYMS["b"], Q)), ((KV,), (Q,))):
            continue
        pos = extras[int(str(small.func)[len("extra"):])]
        doc = None
        if docs:
            f = next(a for a in sympy.Add.make_args(docs[0].args[0]) if isinstance(a, undef))
            doc = extras[int(str(f.func)[len("extra"):])]
        inputs = [input_position(pos)] + ([input_position(doc)] if doc is not None else [])
        if any(i is None for i in inputs):
            return None  # computed in the graph: nothing to check it against on each call
        guard = CallGuard(tuple(inputs), positions_increase_within_documents,  # type: ignore[arg-type]
                          "flex mask causality over positions"
                          " (pos[b, kv] <= pos[b, q] read as kv <= q)")
        rest = [sympy.Or(*[a if pol else sympy.Not(a) for a, pol in c])
                for m, c in enumerate(clauses) if m != n]
        return sympy.And(sympy.Le(KV, Q), *rest), guard
    return None


def mask_mod_from(gm: fx.GraphModule, extras: Sequence[fx.Node], guards: list | None = None) -> Mod | None:
    """Our Mod for a flex mask_mod graph (None when it keeps everything); facts its classification
    relies on that must be re-checked on every call are appended to ``guards`` (not claimed without it)."""
    from .classify_mods import MaskClass, _bool, classify_keep, to_sympy
    from .index_lift import dtype_of
    from .mods import aten_graph, canonical_mask, clamp_lookups

    lifted = lifted_mod_graph(gm, True, len(extras))
    if _always_true(lifted):
        return None
    phs = [n for n in lifted.graph.nodes if n.op == "placeholder"][4:]
    dtypes = {ph: dtype_of(e) for ph, e in zip(phs, extras, strict=True) if dtype_of(e) is not None}
    document, only_document = False, False
    try:
        keep = _bool(to_sympy(lifted, extra_dtypes=dtypes))
        claim = _position_causal(keep.expr, extras) if guards is not None else None
        if claim is not None:  # classification only: the mod itself stays the exact mask_mod
            keep = type(keep)(claim[0])
            guards.append(claim[1])
        cls = classify_keep(keep)
        if claim is not None:
            # the mod's causal clause is over positions (pos[b, kv] <= pos[b, q]), not kv <= q, and its
            # lookups are not in the class: no strict key padding is stated
            cls.params.pop(KEY_PADDING_LOOKUPS, None)
        document, only_document = _document_keep(keep.expr)
    except Exception as exc:  # noqa: BLE001 - classification only enables fast paths
        log.info("flex: could not classify mask_mod (%r); treated as custom", exc)
        cls = MaskClass("custom", "custom", {}, None)
    if cls.always_true:
        return None
    if cls.index_only is not None and not extras:
        return canonical_mask(cls.index_only, cls.window, cls.params.get("causal", True))
    kind, desc = cls.kind, cls.description
    if document:  # the doc-id clause is what classify_keep calls "dense"
        drop = "dense" if only_document else None
        kind = "+".join([k for k in kind.split("+") if k != drop] + ["document"])
        desc = " & ".join([d for d in desc.split(" & ") if d != drop] + ["document"])
    return Mod(clamp_lookups(lifted), True, kind, dict(cls.params), len(extras), f"flex mask_mod: {desc}",
               aten_graph(lifted, True, extras))


def score_mod_from(gm: fx.GraphModule, extras: Sequence[fx.Node]) -> Mod | None:
    """Our Mod for a flex score_mod graph (None for the identity)."""
    from .classify_mods import Num, classify_bias, to_sympy
    from .index_lift import dtype_of
    from .mods import aten_graph, clamp_lookups

    lifted = lifted_mod_graph(gm, False, len(extras))
    out = next(n for n in lifted.graph.nodes if n.op == "output").args[0]
    if isinstance(out, fx.Node) and out.op == "placeholder" and out.name == "score":
        return None
    kind, desc, params = "custom", "custom", {}
    phs = [n for n in lifted.graph.nodes if n.op == "placeholder"][5:]
    dtypes = {ph: dtype_of(e) for ph, e in zip(phs, extras, strict=True) if dtype_of(e) is not None}
    try:
        val = to_sympy(lifted, extra_dtypes=dtypes)
        s = sympy.Symbol("score")
        if isinstance(val, Num) and len(val.cases) == 1:
            e = val.cases[0][0]
            if sympy.diff(e, s) == 1:
                kind, desc = classify_bias(Num([(sympy.expand(e - s), sympy.true)]))
            else:
                cap = _softcap(e, s)
                if cap is not None:
                    kind, desc, params = "softcap", f"softcap({cap:g})", {"cap": cap}
    except Exception as exc:  # noqa: BLE001 - description only; the graph is exact either way
        log.info("flex: could not classify score_mod (%r)", exc)
    return Mod(clamp_lookups(lifted), False, kind, params, len(extras), f"flex score_mod: {desc}",
               aten_graph(lifted, False, extras))


def _softcap(e: Any, s: Any) -> float | None:
    c = sympy.Wild("c", exclude=[s])
    m = e.match(c * sympy.tanh(s / c))
    if m and m.get(c) is not None and m[c].is_number and m[c] > 0:
        return float(m[c])
    return None


__all__ = ["FlexCall", "MARKER", "check_broadcast_semantics", "hold_call", "is_marker", "lifted_mod_graph",
           "live_call_count", "lower_flex_call", "mask_mod_from", "prune_block_masks", "score_mod_from"]
