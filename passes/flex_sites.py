"""After the retrace: FlexAttention markers (``passes.flex``) become attention sites.

Its own module because it reads discovery's helpers (``find_attention``), and the pre-retrace half
in ``passes.flex`` is imported by ``passes.hops``, which discovery's imports reach.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from ringcompile.errors import UnsupportedPatternError
from ringcompile.site import AttentionSite

from .find_attention import _layout_name, _or_none, fold_permutes, same_size
from .flex import _CALLS, check_broadcast_semantics, is_marker, mask_mod_from, score_mod_from


def flex_sites(gm: fx.GraphModule, first_index: int) -> list[AttentionSite]:
    """One AttentionSite per flex marker of the aten graph ``gm``; raises UnsupportedPatternError for
    a marker it cannot describe (its graph must then fall back)."""
    sites = []
    for node in [n for n in gm.graph.nodes if is_marker(n)]:
        q, k, v, score_bufs, mask_bufs, key = node.args
        call = _CALLS.get(key)
        if call is None:
            raise UnsupportedPatternError(f"flex marker {key!r} has no record (graph compiled elsewhere?)")
        outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
        if len(outs) != 1:
            raise UnsupportedPatternError(f"flex_attention at {call.location}: output read {len(outs)} times")
        qv, kv_, vv = (n.meta["val"] for n in (q, k, v))
        hq, hkv = qv.shape[1], kv_.shape[1]
        if not same_size(kv_.shape[1], vv.shape[1]) or not same_size(qv.shape[2], kv_.shape[2]):
            raise UnsupportedPatternError(
                f"flex_attention at {call.location}: query/key lengths or key/value heads differ "
                "(cross-attention is not sequence-sharded)")
        groups = hq // hkv
        if not same_size(groups * hkv, hq):
            raise UnsupportedPatternError(
                f"flex_attention at {call.location}: {hq} query heads, {hkv} kv heads")
        where = call.location
        sizes = [int(qv.shape[0]), int(hq), int(qv.shape[2]), int(kv_.shape[2])]
        mask = mask_mod_from(call.mask_gm, mask_bufs)
        score = score_mod_from(call.score_gm, score_bufs)
        for mod, bufs in ((mask, mask_bufs), (score, score_bufs)):
            if mod is None:
                continue
            probe = [_probe_value(b) for b in bufs]
            why = check_broadcast_semantics(mod.fn, mod.is_mask, sizes, probe)
            if why is not None:
                raise UnsupportedPatternError(
                    f"flex_attention at {where}: its {'mask_mod' if mod.is_mask else 'score_mod'} is not "
                    f"rewritten: {why}")
        q_node, q_perm = fold_permutes(q, (0, 1, 2, 3))
        k_node, k_perm = fold_permutes(k, (0, 1, 2, 3))
        v_node, v_perm = fold_permutes(v, (0, 1, 2, 3))
        notes = ["FlexAttention call: mods taken from the op's own score_mod / mask_mod graphs"]
        notes += [call.note] if call.note else []
        sites.append(AttentionSite(
            name=f"attn{first_index + len(sites)}", pattern="flex_attention", q=q_node, k=k_node, v=v_node,
            output=outs[0], layout=_layout_name(False, q_perm, k_perm), output_layout="bhsd",
            scale=call.scale,
            gqa_groups=int(groups), mask=mask, score=score, mask_extras=list(mask_bufs),
            score_extras=list(score_bufs), nodes={node, outs[0]}, location=where, q_perm=_or_none(q_perm),
            k_perm=_or_none(k_perm), v_perm=_or_none(v_perm), output_dtype=outs[0].meta["val"].dtype,
            notes=notes))
    return sites


def _probe_value(node: fx.Node) -> torch.Tensor:
    """A real value to probe a mod with: the example of a module buffer / input, else zeros."""
    example = node.meta.get("ringcompile_example")  # normalize.EXAMPLE_KEY (normalize imports this module)
    if isinstance(example, torch.Tensor) and not isinstance(example, torch._subclasses.FakeTensor):
        return example.detach()
    val = node.meta["val"]
    return torch.zeros([int(s) for s in val.shape], dtype=val.dtype)


def connect_lse(gm: fx.GraphModule, sites: Sequence[AttentionSite]) -> None:
    """After the rewrite: readers of a marker's lse read the ring op's lse; then no marker may remain."""
    from ringcompile.ops import RingCall, is_ring_call

    calls = [RingCall.from_node(n) for n in gm.graph.nodes if is_ring_call(n)]
    for site in sites:
        marker = next((n for n in site.nodes if is_marker(n)), None)
        if marker is None or not site.rewritten or marker.graph is not gm.graph:
            continue
        lse_users = [u for u in marker.users if u.target is operator.getitem and u.args[1] == 1]
        if not lse_users:
            continue
        ring = [c for c in calls if _base(c.q) is site.q and _base(c.k) is site.k and _base(c.v) is site.v
                and c.spec.mask is site.mask and c.spec.score is site.score]
        if not ring:
            raise UnsupportedPatternError(f"flex_attention at {site.location}: lost its ring call for lse")
        with gm.graph.inserting_after(ring[0].node):
            lse = gm.graph.call_function(operator.getitem, (ring[0].node, 1))
        lse.meta.update(ring[0].node.meta)
        lse.meta["val"] = ring[0].node.meta["val"][1]
        for u in lse_users:
            u.replace_all_uses_with(lse)
    gm.graph.eliminate_dead_code()
    left = [n for n in gm.graph.nodes if is_marker(n)]
    if left:
        where = [_CALLS[n.args[5]].location if n.args[5] in _CALLS else n.name for n in left]
        raise UnsupportedPatternError(f"FlexAttention call(s) at {where} were not rewritten")
    gm.recompile()


def _base(node: Any) -> Any:
    return fold_permutes(node, (0, 1, 2, 3))[0] if isinstance(node, fx.Node) else node



__all__ = ["connect_lse", "flex_sites"]
