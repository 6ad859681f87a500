"""Replace each attention site with one call of ``torch.ops.ringcompile.ring_attention``.

The op takes (B, H, S, D) q and un-repeated (B, Hkv, S, D) k/v, so the rewrite inserts the
permutes that bring the site's tensors into that order and the inverse permute (and cast)
that gives back exactly the value the original subgraph produced. The old subgraph is then
dead and removed.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ringcompile import ops as _ops  # noqa: F401  (registers the custom op)
from ringcompile.errors import UnsupportedPatternError
from ringcompile.log import get_logger
from ringcompile.options import Options
from ringcompile.site import AttentionSite
from ringcompile.spec import AttentionSpec, register_spec

from .aten import (
    INPLACE,
    RESHAPE_OVERLOADS,
    RING_ATTENTION,
    functional_packet,
    hint_of,
    mutated_in_place,
    packet_of,
)
from .normalize import fake_mode_of

log = get_logger(__name__)
aten = torch.ops.aten
SEED_HIGH = 2**62


def spec_for(site: AttentionSite, options: Options) -> AttentionSpec:
    """The static description the op call carries (by registry key)."""
    return AttentionSpec(
        scale=site.scale, mask=site.mask, score=site.score, dropout_p=site.dropout_p,
        strategy=options.strategy, layout=options.layout, group=options.group, mesh_dim=options.mesh_dim,
        kernel=options.kernel, timeout=options.timeout, block_size=options.block_size,
        profile=None if options.profile is None else str(options.profile),
        record_timing=options.record_timing, name=site.location or site.name, dead_rows=site.dead_rows,
    )


class _Builder:
    """Inserts nodes before an anchor and fills ``meta["val"]`` by running them on fake values."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node) -> None:
        self.graph = gm.graph
        self.anchor = anchor
        self.fake_mode = fake_mode_of(gm)
        self.meta = {k: anchor.meta[k] for k in ("stack_trace", "nn_module_stack") if k in anchor.meta}

    def call(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        kwargs = kwargs or {}
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta.update(self.meta)
        vals_args = fx.node.map_arg(args, lambda n: n.meta["val"])
        vals_kwargs = fx.node.map_arg(kwargs, lambda n: n.meta["val"])
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*vals_args, **vals_kwargs)
        else:
            node.meta["val"] = target(*vals_args, **vals_kwargs)
        return node


def _to_bhsd(b: _Builder, node: fx.Node, perm: Sequence[int] | None, is_3d: bool,
             head_split: Sequence[Any] | None = None) -> fx.Node:
    if perm is not None:
        node = b.call(aten.permute.default, (node, list(perm)))
    if head_split is not None:
        node = b.call(aten.unflatten.int, (node, 0, list(head_split)))
    elif is_3d:
        node = b.call(aten.unsqueeze.default, (node, 1))
    return node


def _check_order(gm: fx.GraphModule, site: AttentionSite) -> None:
    """Every input of the new call must be defined before the node it replaces."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    anchor = order[site.output]
    sink = [site.sink] if site.sink is not None else []
    for n in [site.q, site.k, site.v, *site.mask_extras, *site.score_extras, *sink]:
        if not isinstance(n, fx.Node) or n not in order:
            raise UnsupportedPatternError(f"input {n} of {site.name} is not a node of this graph")
        if order[n] >= anchor:
            raise UnsupportedPatternError(
                f"input {n.name} of {site.name} is defined after the attention output")


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, options: Options) -> fx.Node:
    """Insert the op call for ``site`` and redirect the users of its output; returns the new output."""
    _check_order(gm, site)
    b = _Builder(gm, site.output)
    q = _to_bhsd(b, site.q, site.q_perm, site.is_3d, site.head_split)
    k = _to_bhsd(b, site.k, site.k_perm, site.is_3d, site.head_split)
    v = _to_bhsd(b, site.v, site.v_perm, site.is_3d, site.head_split if site.pv_merged else None)
    dtypes = [n.meta["val"].dtype for n in (q, k, v)]
    common = torch.promote_types(torch.promote_types(dtypes[0], dtypes[1]), dtypes[2])
    if any(d != common for d in dtypes):  # the op takes one dtype; compute in the widest one
        q, k, v = (n if d == common else b.call(aten.to.dtype, (n, common)) for n, d in zip((q, k, v), dtypes,
                                                                                            strict=True))
    seq = k.meta["val"].shape[2]
    seq_len: Any = seq if isinstance(seq, int) else b.call(aten.sym_size.int, (k, 2))
    seed = None
    if site.dropout_p > 0:
        seed = b.call(aten.randint.low, (0, SEED_HIGH, []), {"dtype": torch.int64,
                                                              "device": q.meta["val"].device})
    key = register_spec(spec_for(site, options))
    call = b.call(RING_ATTENTION, (q, k, v, list(site.mask_extras), list(site.score_extras), seq_len, key,
                                   seed))
    out = b.call(operator.getitem, (call, 0))
    if site.sink is not None:
        out = _apply_sink(b, out, b.call(operator.getitem, (call, 1)), site.sink)
    if site.lse_readers:
        _connect_lse(b, call, site)
    if site.head_split is not None and site.pv_merged:
        out = b.call(aten.flatten.using_ints, (out, 0, 1))
    elif site.is_3d:
        out = b.call(aten.squeeze.dim, (out, 1))
    if site.out_perm is not None:
        out = b.call(aten.permute.default, (out, list(site.out_perm)))
    want = site.output_dtype or site.output.meta["val"].dtype
    if out.meta["val"].dtype != want:
        out = b.call(aten.to.dtype, (out, want))
    old_shape = tuple(site.output.meta["val"].shape)
    new_shape = tuple(out.meta["val"].shape)
    if len(old_shape) != len(new_shape):
        raise UnsupportedPatternError(f"rewrite of {site.name} changes the output rank")
    out = _match_memory_order(b, out, site.output.meta["val"])
    if mutated_in_place(site.output):
        # the op saves its output for backward: a later in-place write into it (Nystromformer's
        # ``context += conv(v)``) would bump its version and break backward, so the graph gets a copy
        out = b.call(aten.clone.default, (out,))
    site.output.replace_all_uses_with(out)
    return out


def _memory_order(t: torch.Tensor) -> list[int] | None:
    """Dims from outermost to innermost in memory (by stride, size-1 dims in place), or None when a
    stride has no hint."""
    strides = []
    for st in t.stride():
        hint = hint_of(st)
        if hint is None:
            return None
        strides.append(int(hint))
    return sorted(range(t.dim()), key=lambda d: (-strides[d], d))


def _match_memory_order(b: _Builder, out: fx.Node, old: torch.Tensor) -> fx.Node:
    """Give the ring output the memory order of the value it replaces (CPU SDPA returns (B, H, S, D)
    with (B, S, H, D) strides, and a model may ``view`` it as such), so later views stay valid."""
    new = out.meta["val"]
    want, have = _memory_order(old), _memory_order(new)
    if want is None or have is None or old.dim() != new.dim():
        return out
    sized = [d for d in range(old.dim()) if hint_of(old.shape[d]) != 1]  # size-1 dims: any order is valid
    if [d for d in want if d in sized] == [d for d in have if d in sized]:
        return out
    inverse = sorted(range(len(want)), key=want.__getitem__)
    dense = b.call(aten.clone.default, (b.call(aten.permute.default, (out, want)),),
                   {"memory_format": torch.contiguous_format})
    return b.call(aten.permute.default, (dense, inverse))


def _apply_sink(b: _Builder, out: fx.Node, lse: fx.Node, sink: fx.Node) -> fx.Node:
    """Attention sinks: the sink logit joins the denominator, ``Z' = Z + exp(sink)``, so the ring
    output (normalised by ``Z = exp(lse)``) is scaled by ``exp(lse - logaddexp(lse, sink))``."""
    lse4 = b.call(aten.unsqueeze.default, (lse, -1))
    sink = b.call(aten.to.dtype, (sink, lse4.meta["val"].dtype))
    total = b.call(aten.logaddexp.default, (lse4, sink))
    factor = b.call(aten.exp.default, (b.call(aten.sub.Tensor, (lse4, total)),))
    scaled = b.call(aten.mul.Tensor, (out, factor))
    return b.call(aten.to.dtype, (scaled, out.meta["val"].dtype))


def _connect_lse(b: _Builder, call: fx.Node, site: AttentionSite) -> None:
    """Readers of ``logsumexp(scores, -1)`` read the op's lse instead (cast to their dtype). Their
    dependents that ran before the attention output move after the op's lse, in their order."""
    lse = b.call(operator.getitem, (call, 1))
    if site.is_3d:
        lse = b.call(aten.squeeze.dim, (lse, 1))
    inputs = {site.q, site.k, site.v, *site.mask_extras, *site.score_extras}
    for reader in site.lse_readers:
        want = reader.meta["val"]
        keepdim = reader.args[2] if len(reader.args) > 2 else reader.kwargs.get("keepdim", False)
        value = b.call(aten.unsqueeze.default, (lse, -1)) if keepdim else lse
        if value.meta["val"].dtype != want.dtype:
            value = b.call(aten.to.dtype, (value, want.dtype))
        if value.meta["val"].dim() != want.dim():
            raise UnsupportedPatternError(f"the op's lse does not have the shape of {reader.name}")
        _move_dependents_after(reader, value, inputs)
        reader.replace_all_uses_with(value)


def _move_dependents_after(node: fx.Node, anchor: fx.Node, inputs: set[fx.Node]) -> None:
    """Move every node that depends on ``node`` and sits before ``anchor`` to just after it (order kept);
    refused when one of ``inputs`` (the op's own) is among them."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    limit, todo, deps = order[anchor], [node], set()
    while todo:
        for u in todo.pop().users:
            if u not in deps and order[u] < limit:
                deps.add(u)
                todo.append(u)
    if deps & inputs:
        raise UnsupportedPatternError(f"the attention's inputs depend on {node.name}, which its lse replaces")
    for n in sorted(deps, key=order.__getitem__):
        anchor.append(n)
        anchor = n


def split_merged_head_biases(gm: fx.GraphModule) -> int:
    """Bloom's spelling: ``baddbmm(bias, q, k)`` on (B*H, S, D) viewed to (B, H, S, S) for the mask chain.
    Give each such (B*H, ., .) bias an ``unflatten(bias, 0, [B, H])`` view, so discovery (which does not
    edit the graph) can lift it with the 4-D chain. Unused views are removed by the rewrite's dead-code
    pass. Returns how many views were added."""
    added = 0
    for mm in list(gm.graph.nodes):
        if mm.op != "call_function" or mm.target != aten.baddbmm.default or len(mm.users) != 1:
            continue
        view = next(iter(mm.users))
        bias = mm.args[0]
        heads = _head_split_sizes(mm, view)
        if (heads is None or not isinstance(bias, fx.Node)
                or not isinstance(bias.meta.get("val"), torch.Tensor)):
            continue
        shape = bias.meta["val"].shape
        if len(shape) != 3 or shape[0] != mm.meta["val"].shape[0] or shape[0] == 1:
            continue
        if any(u.target == aten.unflatten.int and list(u.args[2]) == list(heads) for u in bias.users):
            continue
        _Builder(gm, view).call(aten.unflatten.int, (bias, 0, list(heads)))
        added += 1
    return added


def _head_split_sizes(mm: fx.Node, view: fx.Node) -> tuple | None:
    """(B, H) when ``view`` reshapes the 3-D ``mm`` to (B, H, S, S), else None."""
    if view.op != "call_function" or view.target not in RESHAPE_OVERLOADS:
        return None
    sizes = view.args[1]
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 4 or len(mm.meta["val"].shape) != 3:
        return None
    if any(isinstance(z, int) and z < 0 for z in sizes[:2]):
        return None
    return sizes[0], sizes[1]


def _substitute(site: AttentionSite, replaced: dict[fx.Node, fx.Node]) -> None:
    """Point a site at the new outputs of sites rewritten before it (attention feeding attention)."""
    if not replaced:
        return
    site.q, site.k, site.v = (replaced.get(n, n) for n in (site.q, site.k, site.v))
    site.mask_extras = [replaced.get(n, n) for n in site.mask_extras]
    site.score_extras = [replaced.get(n, n) for n in site.score_extras]
    if site.sink is not None:
        site.sink = replaced.get(site.sink, site.sink)


def rewrite_attention(gm: fx.GraphModule, sites: list[AttentionSite], options: Options) -> fx.GraphModule:
    """Rewrite every site in place (a site that cannot be rewritten keeps its reason); returns ``gm``."""
    replaced: dict[fx.Node, fx.Node] = {}  # old site output -> new output, for sites that read it
    for site in sites:
        if site.reason is not None:
            continue
        _substitute(site, replaced)
        try:
            replaced[site.output] = rewrite_site(gm, site, options)
        except UnsupportedPatternError as exc:
            site.reason = str(exc)
            # INFO: the backend's one no-silent-fallback WARNING per graph names this site and reason
            log.info("attention at %s not rewritten: %s", site.location, exc)
            continue
        site.rewritten = True
        log.info("rewrote attention at %s (%s, mask=%s, score=%s, gqa=%d)", site.location, site.pattern,
                 site.mask_description, site.score_description, site.gqa_groups)
    gm.graph.eliminate_dead_code()
    if _drop_dead_inplace(sites):
        gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _drop_dead_inplace(sites: list[AttentionSite]) -> int:
    """Erase a rewritten site's in-place score ops that nothing reads any more (Falcon's ``scores /= d``,
    Flaubert's ``scores.masked_fill_``). Dead-code elimination keeps mutating ops, but discovery read
    each as its functional twin (it mutates a fresh value no one else reads), so erasing it is exact and
    frees the S x S product it wrote into."""
    todo = [n for s in sites if s.rewritten for n in s.nodes
            if packet_of(n) in INPLACE and functional_packet(n) is not packet_of(n)]
    erased, changed = 0, True
    while changed:
        changed = False
        for n in list(todo):
            if not n.users:
                n.graph.erase_node(n)
                todo.remove(n)
                erased, changed = erased + 1, True
    return erased
