"""Sequence-shard a whole graph around its ring_attention calls (transparent mode).

Entry point ``shard_graph(aten_gm, sites, options)``: mutates the graph so that each rank
computes only its shard of the sequence. Graph inputs are full on every rank; inputs that
carry the sequence (found by ``seq_dims``) are sliced at the start; placements
(``placements``) are propagated node by node; where placements meet, collectives from
``ringcompile.graph_ops`` (the runtime's interface for passes) are inserted:

* replicated meets sharded -> ``to_local`` (slice by the layout's index list);
* replicated float feeding sharded work -> ``grad_reduce`` (its gradient is summed over ranks);
* partial consumed by a non-linear op, or at an output -> ``reduce_partial``;
* ``x[:, :-k]`` of a shard -> the same shard with a shorter valid length (no communication);
* ``x[:, k:]`` of a shard -> ``shift_seq`` (a halo of k positions from the neighbouring chunks);
* ``x[:, i]`` or ``x[:, -k:]`` of a few static positions of a shard (HF's ``logits_to_keep`` slice) ->
  ``gather_rows`` (each rank sends its rows of those positions; replicated result);
* sharded consumed by an op with no rule along the sequence (cumsum, a conv with kernel > 1 over time) ->
  ``gather_seq`` (correct, not cheap).

Dynamic shapes: when the sequence length is a SymInt (``torch.compile(dynamic=True)`` or Dynamo's
automatic dynamic shapes), decisions are made on the example length (the SymInt's hint, read without
a guard) but nothing length-dependent is baked in: ``passes.sym_sizes.SymSizes`` emits nodes that
compute the padded length, the local length, shifted valid lengths and local view sizes from the
graph's size inputs at run time; ``sym_size`` reads of sharded tensors are replaced by the global
size; a reduction over the sequence (whose padding is known only at run time) runs on the gathered
sequence. One compiled graph then serves every length, padded or not.

Mean losses over the sequence (cross-entropy with ``ignore_index``) become a sum and a count,
both all-reduced, so the loss is exactly the one-device loss. View ops get their sizes
rewritten to the local length. Anything the pass cannot do raises
``UnsupportedPatternError``; the backend then compiles the unsharded (correct) graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ringcompile import graph_ops as coll
from ringcompile.cache_codes import causal_layout
from ringcompile.errors import UnsupportedPatternError
from ringcompile.log import get_logger
from ringcompile.ops import RingCall
from ringcompile.options import Options
from ringcompile.spec import register_spec

from .aliases import Aliases, written_arg
from .aten import RING_ATTENTION
from .placements import (
    GETITEM,
    VIEW_OPS,
    VIEW_SIZES,
    LocalShardRule,
    P,
    Partial,
    R,
    Replicate,
    Shard,
    arg_or_kwarg,
    explicit_template,
    get_arg,
    hint_of,
    links_for,
    local_shard_rule,
    resolve_shape,
    shape_of,
    size_expr,
    sym_shape_of,
    tensor_paths,
    val_of,
    view_dim,
)
from .seq_dims import (
    attention_ops,
    find_seq_dims,
    global_seq_len,
    global_seq_size,
    input_name,
    no_seed_reason,
)
from .sym_sizes import SymSizes

log = get_logger(__name__)
aten = torch.ops.aten
ops = torch.ops.ringcompile

LOSS_OPS = {aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default}
SYMBOLIC_SHAPES_MSG = ("a tensor of the graph has a data-dependent (unbacked) size; sequence sharding needs "
                       "sizes with example values, so the graph runs unsharded")
DYNAMIC_REDUCE_MSG = ("the sequence length is symbolic, so whether padding exists is known only at run time: "
                      "this reduction over the sequence runs on the gathered sequence")


@dataclasses.dataclass
class ShardReport:
    """What the pass did to one graph (kept on ``gm.meta['ringcompile_shard']``)."""

    seq_len: int  # the example's length (and padded length) when ``dynamic``
    padded: int
    world_size: int
    layout: str
    seeds: dict[str, int]
    gathers: list[str] = dataclasses.field(default_factory=list)
    reductions: int = 0
    dynamic: bool = False  # the sequence length is a SymInt: lengths are computed in the graph at run time
    # gathered value -> the op that needed it full, and why (a conv over time, a cumsum...)
    gather_reasons: dict[str, str] = dataclasses.field(default_factory=dict)


def choose_layout(options: Options, masks: Sequence[Any], seq_len: int, world: int, dynamic: bool = False,
                  cache_layout: str | None = None) -> str:
    """The user's layout, else the one the strategy needs, else the layout a sharded KV cache written by the
    graph stores its prefill in (``cache_layout``: the same causal rule, decided where the cache is built;
    following it keeps the cache's K/V local), else zigzag for causal masks.

    With ``outputs="sharded"`` the user assembles outputs with ``ringcompile.gather``, whose
    default layout is contiguous, so that is the default there too."""
    if options.layout is not None:
        return options.layout
    if options.outputs == "sharded":
        return "contiguous"
    if options.strategy == "zigzag":
        return "zigzag"
    if options.strategy in ("ring", "allgather", "ulysses", "local"):
        return "contiguous"
    if cache_layout is not None:
        return cache_layout
    causal = any(m is not None and ("causal" in m.kinds or m.params.get("causal")) for m in masks)
    if causal and (dynamic or causal_layout(seq_len, world) == "zigzag"):
        return "zigzag"
    return "contiguous"


_GRAD_MODE_SETTERS = (torch._C._set_grad_enabled, torch.set_grad_enabled,
                      torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast)


def grad_mode_regions(graph: fx.Graph) -> dict[fx.Node, int]:
    """Node -> index of the grad-mode region it runs in (a new region after every grad-mode switch that
    Dynamo recorded, e.g. ``with torch.no_grad()`` inside the model, and at every autocast enter/exit, so a
    conversion made under autocast is never reused outside it). ``torch.inference_mode`` never gets here:
    normalize refuses it; the ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` HOPs are refused by
    passes.hops."""
    region, out = 0, {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _GRAD_MODE_SETTERS:
            region += 1
        out[n] = region
    return out


class _Sharder:
    def __init__(self, gm: fx.GraphModule, options: Options, seq_len: int, layout: str, world: int,
                 group_name: str, sizes: SymSizes | None = None):
        self.gm, self.graph, self.options = gm, gm.graph, options
        self.sizes = sizes  # set when the sequence length is symbolic
        self.dynamic = sizes is not None
        self.seq, self.layout, self.world, self.group_name = seq_len, layout, world, group_name
        self.padded = coll.padded_length(seq_len, world, layout)
        self.local = self.padded // world
        self.timeout = float(options.timeout)
        self.pl: dict[fx.Node, Any] = {}        # placement per original node (tuple for multi-output)
        self.value: dict[fx.Node, fx.Node] = {}  # node that carries the (local) value of an original node
        # conversions are shared only within one grad-mode region: a grad_reduce_view / to_local made
        # under torch.no_grad is not differentiable, so reusing it where grad is on drops gradients
        self.cache: dict[tuple, fx.Node] = {}
        self.grad_region = grad_mode_regions(gm.graph)
        self.gathers: list[str] = []
        self.gather_reasons: dict[str, str] = {}
        self.reductions = 0
        # in-place writes: which values share storage on one device, and where sharding breaks that
        self.aliases = Aliases(gm.graph)
        self.fresh: set[fx.Node] = set()      # a copy locally, not a view of the value it aliases globally
        self.overbroad: set[fx.Node] = set()  # x[:, :n] of a shard: locally the whole shard (past n rows)
        self.written_inputs: dict[fx.Node, None] = {}  # sharded graph inputs written in place (copied back)

    # ------------------------------------------------------------------ lengths written into the graph

    def len_arg(self, n: int) -> Any:
        """Global length ``n`` (an example value when dynamic) as an op argument."""
        return self.sizes.length(n) if self.dynamic else n

    def padded_arg(self) -> Any:
        return self.sizes.padded if self.dynamic else self.padded

    # ------------------------------------------------------------------ conversions

    def _insert(self, before: fx.Node, target: Any, args: tuple, name_hint: str) -> fx.Node:
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args)
        node.meta["ringcompile"] = name_hint
        return node

    def region_of(self, before: fx.Node) -> int:
        """The grad-mode region ``before`` runs in (inserted nodes: that of the next original node)."""
        n = before
        while n is not None and n.op != "root":
            if n in self.grad_region:
                return self.grad_region[n]
            n = n.next
        return -1

    def convert(self, node: fx.Node, have: Any, want: Any, before: fx.Node, at_output: bool = False
                ) -> fx.Node:
        """The value of original ``node`` with placement ``want`` (inserting collectives as needed)."""
        v = self.value.get(node, node)
        if have == want:
            return v
        region = self.region_of(before)
        key = (region, node, want)
        if key in self.cache:
            return self.cache[key]
        if isinstance(have, Partial):
            out = self.cache.get((region, node, R))
            if out is None:
                out = self._insert(before, ops.reduce_partial.default, (v, self.group_name, self.timeout),
                                   "reduce")
                self.reductions += 1
                self.cache[(region, node, R)] = out
            return out if want == R else self.convert_value(out, node, R, want, before)
        if isinstance(have, Shard):
            full = self.cache.get((region, node, R))
            if full is None:
                full = self._insert(before, ops.gather_seq.default,
                                    (v, have.dim, have.inner, self.len_arg(self.vlen(have)),
                                     self.padded_arg(), self.layout, self.group_name, self.timeout), "gather")
                if not at_output:
                    self.gathers.append(node.name)
                self.cache[(region, node, R)] = full
            return full if want == R else self.convert_value(full, node, R, want, before)
        return self.convert_value(v, node, have, want, before)

    def vlen(self, p: Shard) -> int:
        return self.seq if p.valid is None else p.valid

    def shard(self, dim: int, inner: int = 1, valid: int | None = None) -> Shard:
        return Shard(dim, inner, None if valid is None or valid == self.seq else valid)

    def convert_value(self, v: fx.Node, node: fx.Node, have: Any, want: Any, before: fx.Node,
                      fill: float = 0.0) -> fx.Node:
        """Replicated -> shard (slice; padding holds ``fill``) or -> replicated with a summed gradient."""
        key = (self.region_of(before), node, want, fill)
        if key in self.cache:
            return self.cache[key]
        if isinstance(want, Shard):
            args = (v, want.dim, want.inner, self.len_arg(self.vlen(want)), self.padded_arg(), self.layout,
                    self.group_name, self.timeout)
            out = self._insert(before, ops.to_local.default, args + ((float(fill),) if fill else ()),
                               "to_local")
        elif want == "grad":
            out = self._insert(before, coll.grad_reduce_view, (v, self.group_name, self.timeout),
                               "grad_reduce")
        else:
            raise UnsupportedPatternError(f"cannot convert {node.name} from {have} to {want}")
        self.cache[key] = out
        return out

    def placement(self, node: Any) -> Any:
        return self.pl.get(node, R) if isinstance(node, fx.Node) else R

    def set_arg(self, node: fx.Node, path: tuple[int, ...], new: Any) -> None:
        args = list(node.args)
        if len(path) == 1:
            args[path[0]] = new
        else:
            inner = list(args[path[0]])
            inner[path[1]] = new
            args[path[0]] = inner
        node.args = tuple(args)

    def use(self, node: fx.Node, path: tuple[int, ...], want: Any, fill: float = 0.0) -> None:
        """Make argument ``path`` of ``node`` carry placement ``want``."""
        arg = get_arg(node, path)
        if not isinstance(arg, fx.Node):
            return
        have = self.placement(arg)
        if fill and have == R and isinstance(want, Shard):
            self.set_arg(node, path, self.convert_value(self.value.get(arg, arg), arg, R, want, node, fill))
            return
        if want == "grad":
            if have != R:
                raise UnsupportedPatternError(f"internal: grad_reduce of a {have} value")
            if _needs_grad_sum(arg):
                self.set_arg(node, path, self.convert_value(self.value.get(arg, arg), arg, R, "grad", node))
            return
        self.set_arg(node, path, self.convert(arg, have, want, node))

    def keep(self, node: fx.Node) -> None:
        """Rewire every tensor argument to the node carrying its current value."""
        for path in tensor_paths(node):
            arg = get_arg(node, path)
            if arg in self.value:
                self.set_arg(node, path, self.value[arg])

    def replicate_all(self, node: fx.Node, why: str) -> None:
        """Fallback: compute ``node`` on full, replicated inputs."""
        if any(not isinstance(self.placement(get_arg(node, p)), Replicate) for p in tensor_paths(node)):
            log.info("ringcompile shard: %s (%s) runs on the full sequence: %s", node.name, node.target, why)
        src = self.aliases.parent.get(node)
        if src is not None and not isinstance(self.placement(src), Replicate):
            self.fresh.add(node)  # a view of a gathered (or reduced) copy, not of the value itself
        for path in tensor_paths(node):
            arg = get_arg(node, path)
            if isinstance(self.placement(arg), Shard):
                self.gather_reasons.setdefault(arg.name, f"{node.name} ({node.target}) runs on the full "
                                                         f"sequence: {why}")
        for path in tensor_paths(node):
            self.use(node, path, R)
        self.pl[node] = _replicated_like(node)

    # ------------------------------------------------------------------ the walk

    def run(self, seeds: dict[fx.Node, Shard]) -> None:
        nodes = list(self.graph.nodes)
        first = self.sizes.anchor if self.dynamic else next(n for n in nodes if n.op != "placeholder")
        for node in nodes:
            if node.meta.get("ringcompile") == "size":  # emitted by SymSizes: global sizes, replicated
                self.pl[node] = R
            elif node.op == "placeholder":
                self.pl[node] = R
                if node in seeds:
                    self.pl[node] = seeds[node]
                    self.value[node] = self.convert_value(node, node, R, seeds[node], first)
            elif node.op == "get_attr":
                self.pl[node] = R
            elif node.op == "call_function":
                self.visit(node)
            elif node.op == "output":
                self.outputs(node)

    def visit(self, node: fx.Node) -> None:
        target = written_arg(node)  # read before the walk rewires the arguments to local values
        self._visit(node)
        if target is not None:
            self.after_write(node, target)

    def after_write(self, node: fx.Node, target: fx.Node) -> None:
        """``node`` wrote in place into ``target``: check that the write reaches locally every value it
        reaches on one device (else raise: the graph runs unsharded), forget conversions taken of those
        values before the write, and note a sharded graph input the write lands in (copied back at the
        end)."""
        al = self.aliases
        chain = al.chain(target)
        over = next((a for a in chain if a in self.overbroad), None)
        if over is not None:
            raise UnsupportedPatternError(
                f"{node.name} ({node.target}) writes in place into {over.name}, a slice x[:, :n] of a "
                "sequence shard: on each rank it is the whole local shard, so the write would reach "
                "positions past n")
        members = al.members(target)
        # computed on full values from a gathered / reduced copy of the target: the write lands in the copy
        copied = not isinstance(self.placement(target), Replicate) and isinstance(self.pl.get(node),
                                                                                   Replicate)
        reached = self._local_component(node if copied else target, members, cut=node if copied else None)
        for n in sorted(members - reached, key=lambda n: al.order[n]):
            if al.read_after(n, node) or n.op == "placeholder":
                what = "the caller's tensor" if n.op == "placeholder" else f"{n.name}, read after it,"
                raise UnsupportedPatternError(
                    f"{node.name} ({node.target}) writes in place into {target.name}, which shares storage "
                    f"with {what} on one device; on each rank {n.name} is a separate copy (a sequence slice "
                    "of a shard that is a halo or gathered rows, or a gathered / reduced / sliced copy), so "
                    "the write would not reach it")
        self.cache = {k: v for k, v in self.cache.items() if k[1] not in members}
        root = chain[-1]
        if root.op == "placeholder" and isinstance(self.pl.get(root), Shard):
            self.written_inputs[root] = None

    def _local_component(self, start: fx.Node, members: set[fx.Node], cut: fx.Node | None) -> set[fx.Node]:
        """The values among ``members`` that share ``start``'s storage on each rank: alias links, except
        those of a value that is a local copy (``fresh``) and of ``cut`` (a write done on a copy)."""
        al = self.aliases
        seen, todo = set(), [start]
        while todo:
            n = todo.pop()
            if n in seen or n not in members:
                continue
            seen.add(n)
            if n in al.parent and n not in self.fresh and n is not cut:
                todo.append(al.parent[n])
            todo.extend(c for c in al.children.get(n, ()) if c not in self.fresh and c is not cut)
        return seen

    def _visit(self, node: fx.Node) -> None:
        t = node.target
        if t is GETITEM:
            src, idx = node.args
            p = self.placement(src)
            self.pl[node] = p[idx] if isinstance(p, tuple) else p
            self.keep(node)
            return
        paths = tensor_paths(node)
        placements = [self.placement(get_arg(node, p)) for p in paths]
        if t is RING_ATTENTION:
            return self.attention(node)
        if self.dynamic and _is_sym_scalar(node):
            return self.sym_scalar(node)
        if all(isinstance(p, Replicate) for p in placements):
            self.keep(node)
            self.pl[node] = _replicated_like(node)
            return
        local_rule = local_shard_rule(node)
        if local_rule is not None:
            return self.local_shard(node, local_rule)
        if t in VIEW_OPS:
            return self.view(node)
        if t in LOSS_OPS:
            return self.loss(node)
        if t == aten.slice.Tensor and self.slice_seq(node):
            return
        if t == aten.select.int and self.select_seq(node):
            return
        if shape_of(node) is None and _has_unbacked(node):
            raise UnsupportedPatternError(SYMBOLIC_SHAPES_MSG)
        if _mutates(t) and paths and not isinstance(placements[0], Shard):
            # x.add_(sharded) on a full x: slicing x would mutate a copy; compute on full values
            return self.replicate_all(node, "in-place op on a full tensor")
        rule = links_for(node)
        if rule is None:
            return self.replicate_all(node, "no sharding rule for this op")
        self.generic(node, rule, paths, placements)

    def local_shard(self, node: fx.Node, rule: LocalShardRule) -> None:
        """An op that takes its sequence inputs as this rank's shard, told the layout (``LocalShardRule``);
        where it cannot (another layout, a shifted or differently sharded input), it gets full inputs."""
        want = dict(rule.seq_args)
        why = None
        if rule.wants is not None and rule.wants != self.layout:
            why = f"it stores the {rule.wants} layout and the graph's sequence is {self.layout}"
        for path in tensor_paths(node):
            p = self.placement(get_arg(node, path))
            if path in want and p != Shard(want[path]):
                why = why or f"argument {path} is {p}, not this rank's whole shard along dim {want[path]}"
            elif path not in want and not isinstance(p, Replicate):
                why = why or f"argument {path} is {p}, not replicated"
        if why is not None:
            return self.replicate_all(node, f"it takes its inputs full: {why}")
        self.keep(node)
        pos, name = rule.layout_arg
        if len(node.args) > pos:
            self.set_arg(node, (pos,), self.layout)
        else:
            node.kwargs = {**node.kwargs, name: self.layout}
        self.pl[node] = _replicated_like(node)

    def generic(self, node: fx.Node, rule, paths, placements) -> None:
        links = rule.links
        for path in rule.passive:
            self.keep_arg(node, path)
        active = [(pa, p) for pa, p in zip(paths, placements, strict=True) if pa not in rule.passive]
        paths, placements = [pa for pa, _ in active], [p for _, p in active]
        kept: set[tuple[int | None, Shard]] = set()
        valids = []
        reduced = False
        bad: list[tuple[tuple[int, ...], int]] = []
        partial = []
        for path, p in zip(paths, placements, strict=True):
            if isinstance(p, Shard):
                found = [lk for lk in links if lk.arg == path and lk.in_dim == p.dim]
                outs = {(lk.out_index, lk.out_dim) for lk in found}
                if not found:
                    bad.append((path, p.dim))
                elif all(lk.out_dim is None for lk in found):
                    reduced = True
                else:
                    kept |= {(oi, Shard(od, p.inner)) for oi, od in outs if od is not None}
                    valids.append(self.vlen(p))
            elif isinstance(p, Partial):
                partial.append(path)
        if bad or (reduced and kept) or (reduced and rule.reduce == "full"):
            why = next((rule.why_unlinked[b] for b in bad if b in rule.why_unlinked),
                       "the sequence dim is sliced, reduced or moved by this op")
            return self.replicate_all(node, why)
        out_dims = {od for _, od in kept}
        if len(out_dims) > 1 or len({oi for oi, _ in kept}) != len(kept):
            return self.replicate_all(node, "inputs are sharded along different output dims")
        if partial:
            linear_ok = (not kept and not reduced and all(pa in rule.linear_in for pa in partial)
                         and all(isinstance(self.placement(get_arg(node, pa)), Partial)
                                 for pa in rule.linear_in if get_arg(node, pa) is not None)
                         and all(isinstance(p, Partial | Replicate) for p in placements))
            if linear_ok:
                self.keep(node)
                for path, p in zip(paths, placements, strict=True):
                    if isinstance(p, Replicate):
                        self.use(node, path, "grad")
                self.pl[node] = _like(node, P)
                return
            if not kept and not reduced:
                for path in partial:
                    self.use(node, path, R)
                self.keep(node)
                self.pl[node] = _replicated_like(node)
                return
            # a sharded output: ``_fit_replicated`` turns each Partial argument into the shard it needs
            # (reduce, then slice) or, where it is broadcast, into a reduced value with a summed gradient
        if not kept and not reduced:
            # no active argument is sharded (only a dtype/shape template is): the result is replicated.
            # Falling through would call it a reduction and make it Partial (summed N times).
            self.keep(node)
            self.pl[node] = _replicated_like(node)
            return
        if kept:
            valid = min(valids)
            kept = {(oi, self.shard(s_.dim, s_.inner, valid)) for oi, s_ in kept}
            out_shard = next(iter(kept))[1]
            self._fit_replicated(node, links, paths, placements, out_shard)
            multi = isinstance(val_of(node), (tuple, list))
            if multi:
                self.pl[node] = tuple(next((s for oi, s in kept if oi == i), R)
                                      for i in range(len(val_of(node))))
            else:
                self.pl[node] = out_shard
            self._resize(node, out_shard)
            return
        # the sequence dim is reduced by a linear op (sum, mean, matmul contraction): Partial
        junk = [p for p in placements if isinstance(p, Shard) and self.vlen(p) != self.padded]
        if self.dynamic and any(isinstance(p, Shard) for p in placements):
            return self.replicate_all(node, DYNAMIC_REDUCE_MSG)
        if junk:
            raise UnsupportedPatternError(
                f"{node.name} reduces over a sequence with padded or shifted positions ({self.seq} tokens on "
                f"{self.world} ranks, valid {self.vlen(junk[0])}); use a sequence length the layout divides")
        for path, p in zip(paths, placements, strict=True):
            if isinstance(p, Replicate):
                red = [lk for lk in links if lk.arg == path and lk.out_dim is None
                       and shape_of(get_arg(node, path))[lk.in_dim] == self.seq]
                sharded_red = [lk for lk in links if lk.out_dim is None and isinstance(
                    self.placement(get_arg(node, lk.arg)), Shard)]
                if red and sharded_red:
                    inner = self.placement(get_arg(node, sharded_red[0].arg)).inner
                    self.use(node, path, Shard(red[0].in_dim, inner))
                else:
                    self.use(node, path, "grad")
            else:
                self.keep_arg(node, path)
        self.pl[node] = P
        if rule.reduce == "mean":
            self.scale_after(node, 1.0 / self.world)

    def keep_arg(self, node: fx.Node, path) -> None:
        arg = get_arg(node, path)
        if arg in self.value:
            self.set_arg(node, path, self.value[arg])

    def _fit_replicated(self, node, links, paths, placements, out: Shard) -> None:
        for path, p in zip(paths, placements, strict=True):
            if isinstance(p, Shard):
                self.keep_arg(node, path)
                continue
            match = [lk for lk in links if lk.arg == path and lk.out_dim == out.dim]
            if isinstance(p, Partial) and not match:
                arg = get_arg(node, path)
                full = self.convert(arg, p, R, node)
                if _needs_grad_sum(arg):
                    full = self.convert_value(full, arg, R, "grad", node)
                self.set_arg(node, path, full)
                continue
            shape = shape_of(get_arg(node, path))
            if match and shape is not None and \
                    shape[match[0].in_dim] == shape_of_out(node, match[0].out_index)[out.dim] and \
                    sym_shape_of(get_arg(node, path))[match[0].in_dim] == \
                    _out_size_expr(node, match[0].out_index, out.dim):
                self.use(node, path, Shard(match[0].in_dim, out.inner, out.valid))
            else:
                self.use(node, path, "grad")

    def _resize(self, node: fx.Node, out: Shard) -> None:
        """Rewrite explicit size arguments (expand) to the local length."""
        if node.target in (aten.expand.default, aten.broadcast_to.default):
            sizes = list(node.args[1])
            if self.dynamic:  # -1: keep the (already local) input size
                sizes[out.dim] = -1
                self.set_arg(node, (1,), sizes)
                return
            full = shape_of(node)
            sizes[out.dim] = full[out.dim] // self.vlen(out) * self.local
            self.set_arg(node, (1,), sizes)

    def scale_after(self, node: fx.Node, factor: float) -> None:
        with self.graph.inserting_after(node):
            scaled = self.graph.call_function(aten.mul.Tensor, (node, factor))
        self.value[node] = scaled

    def view(self, node: fx.Node) -> None:
        src = node.args[0]
        p = self.placement(src)
        if isinstance(p, Partial):
            self.keep(node)
            self.pl[node] = P
            return
        a, b = shape_of(src), shape_of(node)
        if a is None or b is None:
            raise UnsupportedPatternError(SYMBOLIC_SHAPES_MSG)
        out = view_dim(a, b, p.dim, p.inner, self.vlen(p))
        if out is None:
            return self.replicate_all(node, "a view splits the sequence dim")
        out = self.shard(out.dim, out.inner, p.valid)
        self.keep(node)
        where = VIEW_SIZES[node.target]
        if where is None:  # flatten: the output shape follows from the (local) input's
            self.pl[node] = out
            return
        if node.target == aten.unflatten.int:
            return self.unflatten(node, out)
        if self.dynamic:
            sizes = list(node.args[1])
            if not (isinstance(sizes[out.dim], int) and sizes[out.dim] == -1):
                sizes[out.dim] = self.sizes.local_size(val_of(node).shape[out.dim], self.vlen(out))
            self.set_arg(node, (1,), sizes)
            self.pl[node] = out
            return
        sizes = resolve_shape(b, math.prod(b))
        sizes[out.dim] = sizes[out.dim] // self.vlen(out) * self.local
        self.set_arg(node, (1,), sizes)
        self.pl[node] = out

    def unflatten(self, node: fx.Node, out: Shard) -> None:
        """``unflatten(x, dim, sizes)``: the size of the sequence's output dim becomes the local one."""
        d = node.args[1] % len(shape_of(node.args[0]))
        sizes = list(node.args[2])
        k = out.dim - d
        if 0 <= k < len(sizes):
            if self.dynamic:
                if any(isinstance(x, int) and x == -1 for i, x in enumerate(sizes) if i != k):
                    return self.replicate_all(node, "unflatten with a -1 size and a symbolic sequence length")
                sizes[k] = -1
            else:
                sizes[k] = shape_of(node)[out.dim] // self.vlen(out) * self.local
            self.set_arg(node, (2,), sizes)
        self.pl[node] = out

    def slice_seq(self, node: fx.Node) -> bool:
        """``x[..., :n, ...]`` along the sequence: the same shards with a shorter valid length."""
        src = node.args[0]
        p = self.placement(src)
        shape = shape_of(src)
        if not isinstance(p, Shard) or shape is None:
            return False
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
        start = node.args[2] if len(node.args) > 2 else 0
        step = node.args[4] if len(node.args) > 4 else 1
        if dim != p.dim or p.inner != 1 or shape[dim] != self.vlen(p) or step != 1:
            return False
        if not isinstance(start, int | None):
            return False
        n = shape_of(node)[dim]
        if self.dynamic and (self.sizes.offset(val_of(src).shape[dim]) != self.seq - shape[dim]
                             or self.sizes.offset(val_of(node).shape[dim]) != self.seq - n):
            return False  # not (sequence length - constant) for every length
        if start not in (0, None):
            end = node.args[3] if len(node.args) > 3 else None
            done = self.shift(node, src, p, dim, start, n) or self.gather_rows(node, src, p, dim, start, end)
            if done:
                self.fresh.add(node)  # a halo exchange or gathered rows: a new tensor, not a view of src
            return done
        if n == shape[dim]:
            self.value[node] = self.value.get(src, src)
            self.pl[node] = p
            return True
        self.value[node] = self.value.get(src, src)
        self.pl[node] = self.shard(dim, 1, n)
        self.overbroad.add(node)
        return True

    def gather_rows(self, node: fx.Node, src: fx.Node, p: Shard, dim: int, start: Any, end: Any) -> bool:
        """``x[..., a:b, ...]`` of a few static positions (HF's ``logits_to_keep`` slice ``[:, -1:]``):
        replicated, from ``gather_rows`` (each rank sends its rows of a..b-1), not the whole gathered
        sequence. Static lengths only (a dynamic graph gathers, as before)."""
        full = self.vlen(p)
        if not isinstance(start, int) or not isinstance(end, int | None):
            return False
        a = start + full if start < 0 else start
        b = full if end is None else (end + full if end < 0 else end)
        a, b = max(0, a), min(b, full)
        if shape_of(node)[dim] != b - a:
            return False
        rows = self._rows(node, src, p, dim, a, b)
        if rows is None:
            return False
        self.value[node] = rows
        self.pl[node] = _replicated_like(node)
        return True

    def select_seq(self, node: fx.Node) -> bool:
        """``x[:, i]`` of one static sequence position: that row from its owner (``gather_rows``)."""
        src, dim, index = node.args[0], node.args[1], node.args[2]
        p, shape = self.placement(src), shape_of(src)
        if not (isinstance(p, Shard) and shape is not None and isinstance(index, int)
                and isinstance(dim, int)):
            return False
        dim = dim % len(shape)
        if dim != p.dim:
            return False
        i = index + self.vlen(p) if index < 0 else index
        rows = self._rows(node, src, p, dim, i, i + 1)
        if rows is None:
            return False
        with self.graph.inserting_before(node):
            self.value[node] = self.graph.call_function(aten.squeeze.dim, (rows, dim))
        self.pl[node] = _replicated_like(node)
        self.fresh.add(node)
        return True

    def _rows(self, node: fx.Node, src: fx.Node, p: Shard, dim: int, a: int, b: int) -> fx.Node | None:
        """Positions a..b-1 of the sharded ``src`` along ``dim``, replicated (None: not this way)."""
        full = self.vlen(p)
        shape = shape_of(src)
        if (self.dynamic or p.inner != 1 or shape is None or shape[dim] != full
                or not 0 <= a < b <= full or b - a >= full):
            return None
        return self._insert(node, ops.gather_rows.default,
                            (self.value.get(src, src), dim, a, b, self.padded, self.layout, self.group_name,
                             self.timeout), "gather rows")

    def _mask_junk(self, node: fx.Node, target: fx.Node, want: Shard, ignore: int) -> fx.Node:
        """where(row is valid, local target, ignore_index) for a sharded target with junk rows."""
        g = self.graph
        full = list(shape_of(target))
        if self.dynamic:  # the global shape of the target, computed at run time
            full = [self.sizes.emit(size_expr(s)) for s in val_of(target).shape]
        with g.inserting_before(node):
            ones = g.call_function(aten.ones.default, (full,), {"dtype": torch.bool})
        valid = self._insert(node, ops.to_local.default,
                             (ones, want.dim, want.inner, self.len_arg(self.vlen(want)), self.padded_arg(),
                              self.layout, self.group_name, self.timeout), "valid rows")
        return self._insert(node, aten.where.ScalarOther, (valid, self.value.get(target, target), ignore),
                            "mask junk")

    def shift(self, node: fx.Node, src: fx.Node, p: Shard, dim: int, start: int, n: int) -> bool:
        """``x[..., k:]`` along the sequence (to the end): same layout, rows fetched as a halo."""
        full = self.vlen(p)
        k = start if start >= 0 else full + start
        chunk = self.local // (2 if self.layout == "zigzag" else 1)
        if not 0 < k <= chunk or n != full - k:
            return False
        self.value[node] = self._insert(node, ops.shift_seq.default,
                                        (self.value.get(src, src), dim, k, self.padded_arg(), self.layout,
                                         self.group_name, self.timeout), "halo")
        self.pl[node] = self.shard(dim, 1, full - k)
        return True

    def loss(self, node: fx.Node) -> None:
        """Cross-entropy / NLL over sharded rows: mean -> all-reduced sum / all-reduced count."""
        inp, target = node.args[0], node.args[1]
        p = self.placement(inp)
        weight = arg_or_kwarg(node, 2, "weight", None)
        reduction = arg_or_kwarg(node, 3, "reduction", 1)
        ignore = arg_or_kwarg(node, 4, "ignore_index", -100)
        smoothing = arg_or_kwarg(node, 5, "label_smoothing", 0.0) if node.target == \
            aten.cross_entropy_loss.default else 0.0
        in_shape = shape_of(inp)
        if isinstance(p, Partial) or not isinstance(p, Shard) or p.dim == (1 if len(in_shape) > 1 else 0):
            return self.replicate_all(node, "loss input is not sharded along a row dim")
        if weight is not None or smoothing or reduction not in (0, 1, 2):
            return self.replicate_all(node, "loss with class weights or label smoothing")
        tdim = p.dim if p.dim == 0 else p.dim - 1
        self.keep_arg(node, (0,))
        tp = self.placement(target)
        want = self.shard(tdim, p.inner, p.valid)
        if tp != R and tp != want:
            return self.replicate_all(node, "loss target is sharded differently from its input")
        if tp == R:
            self.use(node, (1,), want, fill=float(ignore))  # padded / shifted-out rows are ignored
        else:
            self.keep_arg(node, (1,))
            if self.dynamic or self.vlen(want) != self.padded:  # rows past the valid length hold junk
                self.set_arg(node, (1,), self._mask_junk(node, target, want, ignore))
        if reduction == 0:
            self.pl[node] = want
            return
        args = [node.args[0], node.args[1], None, 2, ignore]  # reduction "sum"
        if node.target == aten.cross_entropy_loss.default:
            args.append(0.0)
        node.args, node.kwargs = tuple(args), {}
        if reduction == 2:
            self.pl[node] = P
            return
        g = self.graph
        with g.inserting_after(node):
            total = g.call_function(ops.reduce_partial.default, (node, self.group_name, self.timeout))
        with g.inserting_after(total):
            valid = g.call_function(aten.ne.Scalar, (node.args[1], ignore))
        with g.inserting_after(valid):
            count = g.call_function(aten.sum.default, (valid,))
        with g.inserting_after(count):
            count_all = g.call_function(ops.reduce_partial.default, (count, self.group_name, self.timeout))
        with g.inserting_after(count_all):
            mean = g.call_function(aten.div.Tensor, (total, count_all))
        self.reductions += 2
        self.value[node] = mean
        self.pl[node] = R

    def attention(self, node: fx.Node) -> None:
        # Score extras (learned biases) stay plain replicated values: the op's backward already returns
        # their gradient summed over ranks (runtime ``reduce_extras``), as it does for k/v, whose grads
        # it sums around the ring. A ``grad_reduce`` here would sum that sum again (N x the gradient).
        # The op owns the reduction because only it knows which ranks saw which (q, k) pairs, and
        # because callers of the op outside this pass (``ringcompile.api``) need the same contract.
        for i in range(3):
            self.use(node, (i,), Shard(2))
        for i in (3, 4):
            for j in range(len(node.args[i])):
                self.use(node, (i, j), R)
        call = RingCall.from_node(node)
        spec = call.spec.replace(layout=self.layout, group=self.options.group, mesh_dim=self.options.mesh_dim)
        call.replace_args(seq_len=self.len_arg(self.seq), spec_key=register_spec(spec))
        self.pl[node] = (Shard(2), Shard(2))

    def sym_scalar(self, node: fx.Node) -> None:
        """A size read from a (now local) tensor, e.g. ``sym_size(k, 2)``: the global size, recomputed from
        the graph's size inputs."""
        if all(isinstance(self.placement(get_arg(node, p)), Replicate) for p in tensor_paths(node)):
            self.keep(node)
        else:
            node.replace_all_uses_with(self.sizes.emit(size_expr(val_of(node))))
        self.pl[node] = R

    def copy_back_inputs(self, before: fx.Node) -> None:
        """A sharded graph input written in place: each rank wrote its shard (``to_local``'s copy), so the
        caller's tensor gets the gathered result, as one device writes it."""
        for x in self.written_inputs:
            p = self.pl[x]
            full = self._insert(before, ops.gather_seq.default,
                                (self.value[x], p.dim, p.inner, self.len_arg(self.vlen(p)), self.padded_arg(),
                                 self.layout, self.group_name, self.timeout), "gather written input")
            self._insert(before, aten.copy_.default, (x, full), "copy back written input")
            log.info("ringcompile shard: input %s is written in place; its shards are gathered and copied "
                     "back into it", x.name)

    def outputs(self, node: fx.Node) -> None:
        sharded_out = self.options.outputs == "sharded"
        self.copy_back_inputs(node)

        def fix(a: Any) -> Any:
            if not isinstance(a, fx.Node):
                return a
            p = self.placement(a)
            if isinstance(p, Shard) and sharded_out:
                return self.value.get(a, a)
            if isinstance(p, tuple):
                return a
            return self.convert(a, p, R, node, at_output=True)

        node.args = tuple(fx.node.map_aggregate(node.args, fix))


def shape_of_out(node: fx.Node, out_index: int | None) -> tuple[int, ...]:
    v = val_of(node)
    if out_index is not None and isinstance(v, (tuple, list)):
        v = v[out_index]
    return tuple(hint_of(s) for s in v.shape)


def _out_size_expr(node: fx.Node, out_index: int | None, dim: int) -> Any:
    v = val_of(node)
    if out_index is not None and isinstance(v, (tuple, list)):
        v = v[out_index]
    return size_expr(v.shape[dim])


def _needs_grad_sum(node: fx.Node) -> bool:
    """Whether a replicated value can carry a gradient (float or complex), so its uses sum it over ranks."""
    v = val_of(node)
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _is_sym_scalar(node: fx.Node) -> bool:
    return isinstance(val_of(node), torch.SymInt)


def _has_unbacked(node: fx.Node) -> bool:
    v = val_of(node)
    vals = v if isinstance(v, (tuple, list)) else [v]
    return any(isinstance(x, torch.Tensor) and any(hint_of(s) is None for s in x.shape) for x in vals)


def _like(node: fx.Node, p: Any) -> Any:
    v = val_of(node)
    return tuple(p for _ in v) if isinstance(v, (tuple, list)) else p


def _replicated_like(node: fx.Node) -> Any:
    return _like(node, R)


def _mutates(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _check_hinted(gm: fx.GraphModule) -> None:
    for node in gm.graph.find_nodes(op="placeholder"):
        if _has_unbacked(node):
            raise UnsupportedPatternError(SYMBOLIC_SHAPES_MSG)


def _explicit_templates(gm: fx.GraphModule) -> None:
    """``view_as(x, t)`` / ``reshape_as`` / ``expand_as`` -> the op with t's (global) sizes written out, so
    that the template's placement never reaches the result (the walk then treats them as plain views and
    expands). Symbolic sizes are left alone: those ops have no rule and run on full values."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        explicit = explicit_template(node)
        if explicit is not None:
            node.target, node.args = explicit
            node.kwargs = {}


def _refresh_meta(gm: fx.GraphModule) -> None:
    """Recompute node.meta['val'] (now local shapes) with fake tensors."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        inputs = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in inputs]
    allowed = mode.allow_scalar_outputs
    mode.allow_scalar_outputs = mode.shape_env is not None  # .item() of Dynamo's unspecialised floats
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    finally:
        mode.allow_scalar_outputs = allowed


def shard_graph(aten_gm: fx.GraphModule, sites: Sequence[Any], options: Options) -> fx.GraphModule:
    """Shard ``aten_gm`` along the sequence in place (and return it); raise UnsupportedPatternError to
    make the backend compile the unsharded graph."""
    group = coll.resolve_group(options.group, options.mesh_dim)
    if group.world_size <= 1:
        return aten_gm
    ops_ = attention_ops(aten_gm)
    if not ops_:
        raise UnsupportedPatternError("no rewritten attention in the graph: nothing says where the sequence "
                                      "is")
    _check_hinted(aten_gm)
    _explicit_templates(aten_gm)
    seq = global_seq_len(ops_)
    seq_size = global_seq_size(ops_)
    dynamic = isinstance(seq_size, torch.SymInt)
    stops: list[fx.Node] = []
    seeds = find_seq_dims(aten_gm, seq, options.seq_dims, stops)
    if not seeds:
        raise UnsupportedPatternError(no_seed_reason(stops))
    masks = [RingCall.from_node(op).spec.mask for op in ops_]
    rules = [local_shard_rule(n) for n in aten_gm.graph.nodes]
    cache_layouts = {r.wants for r in rules if r is not None and r.wants is not None}
    cache_layout = cache_layouts.pop() if len(cache_layouts) == 1 else None
    layout = choose_layout(options, masks, seq, group.world_size, dynamic, cache_layout)
    name = coll.group_name_of(group.group)
    sizes = SymSizes(aten_gm, seq_size, group.world_size, layout) if dynamic else None
    sharder = _Sharder(aten_gm, options, seq, layout, group.world_size, name, sizes)
    sharder.run(seeds)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.graph.lint()
    aten_gm.recompile()
    _refresh_meta(aten_gm)
    seed_names = {input_name(n): s.dim for n, s in seeds.items()}
    reasons = {n: w for n, w in sharder.gather_reasons.items() if n in sharder.gathers}
    report = ShardReport(seq, sharder.padded, group.world_size, layout, seed_names, sharder.gathers,
                         sharder.reductions, dynamic, gather_reasons=reasons)
    aten_gm.meta["ringcompile_shard"] = report
    log.info("ringcompile shard: seq %d on %d ranks (%s, padded %d); inputs %s; %d gathers %s; "
             "%d all-reduces",
             seq, group.world_size, layout, sharder.padded, report.seeds, len(sharder.gathers),
             sharder.gathers, sharder.reductions)
    return aten_gm


__all__ = ["shard_graph", "choose_layout", "ShardReport"]
