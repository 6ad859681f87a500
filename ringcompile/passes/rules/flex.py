"""FlexAttention as an attention rule: the marker op ``passes.flex`` leaves where a ``flex_attention``
call was (before the retrace) anchors it, and the site's mods are the op's own score_mod / mask_mod
graphs, with the captured buffers as extras.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ringcompile.site import AttentionSite

from ..flex import _CALLS, check_broadcast_semantics, is_marker, mask_mod_from, score_mod_from
from .base import Decline, Match, Rule, register_rule
from .shapes import _layout_name, _or_none, fold_permutes, same_size


def extract_flex(node: fx.Node, index: int) -> Match:
    """The site of one flex marker; declines (the graph then falls back) when it cannot be described."""
    q, k, v, score_bufs, mask_bufs, key = node.args[:6]
    call = _CALLS.get(key)
    if call is None:
        raise Decline(f"flex marker {key!r} has no record (graph compiled elsewhere?)")
    if call.refused is not None:
        raise Decline(call.refused)
    outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(outs) != 1:
        raise Decline(f"flex_attention at {call.location}: output read {len(outs)} times")
    qv, kv_, vv = (n.meta["val"] for n in (q, k, v))
    hq, hkv = qv.shape[1], kv_.shape[1]
    if not same_size(kv_.shape[1], vv.shape[1]) or not same_size(qv.shape[2], kv_.shape[2]):
        raise Decline(f"flex_attention at {call.location}: query/key lengths or key/value heads differ "
                      "(cross-attention is not sequence-sharded)")
    groups = hq // hkv
    if not same_size(groups * hkv, hq):
        raise Decline(f"flex_attention at {call.location}: {hq} query heads, {hkv} kv heads")
    where = call.location
    sizes = [int(qv.shape[0]), int(hq), int(qv.shape[2]), int(kv_.shape[2])]
    guards: list = []
    mask = mask_mod_from(call.mask_gm, mask_bufs, guards)
    if guards:  # checked before every call of the rewritten graph (passes.flex_guards)
        _CALLS[key] = call = dataclasses.replace(call, guards=call.guards + tuple(guards))
    score = score_mod_from(call.score_gm, score_bufs)
    for mod, bufs in ((mask, mask_bufs), (score, score_bufs)):
        if mod is None:
            continue
        why = check_broadcast_semantics(mod.fn, mod.is_mask, sizes, [_probe_value(b) for b in bufs])
        if why is not None:
            raise Decline(f"flex_attention at {where}: its {'mask_mod' if mod.is_mask else 'score_mod'} is "
                          f"not rewritten: {why}")
    q_node, q_perm = fold_permutes(q, (0, 1, 2, 3))
    k_node, k_perm = fold_permutes(k, (0, 1, 2, 3))
    v_node, v_perm = fold_permutes(v, (0, 1, 2, 3))
    notes = ["FlexAttention call: mods taken from the op's own score_mod / mask_mod graphs"]
    notes += [call.note] if call.note else []
    return Match("flex", AttentionSite(
        name=f"attn{index}", pattern="flex_attention", q=q_node, k=k_node, v=v_node,
        output=outs[0], layout=_layout_name(False, q_perm, k_perm), output_layout="bhsd", scale=call.scale,
        gqa_groups=int(groups), mask=mask, score=score, mask_extras=list(mask_bufs),
        score_extras=list(score_bufs), nodes={node, outs[0]}, location=where, q_perm=_or_none(q_perm),
        k_perm=_or_none(k_perm), v_perm=_or_none(v_perm), output_dtype=outs[0].meta["val"].dtype,
        notes=notes))


def _probe_value(node: fx.Node) -> torch.Tensor:
    """A real value to probe a mod with: the example of a module buffer / input, else zeros."""
    example = node.meta.get("ringcompile_example")  # normalize.EXAMPLE_KEY (normalize imports this module)
    if isinstance(example, torch.Tensor) and not isinstance(example, torch._subclasses.FakeTensor):
        return example.detach()
    val = node.meta["val"]
    return torch.zeros([int(s) for s in val.shape], dtype=val.dtype)



FLEX_RULE = register_rule(Rule("flex", is_marker, extract_flex, pattern="flex"), before="sdpa")
