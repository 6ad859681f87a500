"""The SDPA rule: ``aten.scaled_dot_product_attention`` with its mask, causal flag, scale and GQA."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from ringcompile import mods as mods_lib
from ringcompile.errors import UnsupportedPatternError
from ringcompile.site import AttentionSite

from ..aten import val_of
from ..locations import location_of
from .base import Decline, Match, Rule, register_rule
from .ops import SDPA_OPS
from .shapes import (
    _check_qkv,
    _identity,
    _layout_name,
    _or_none,
    _scalar_value,
    _shape,
    fold_permutes,
    permuted_shape,
    same_size,
    strip_kv_repeats,
)

aten = torch.ops.aten


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                  "enable_gqa": False}


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    """The SDPA call's arguments by name, defaults filled in."""
    args = dict(_SDPA_DEFAULTS)
    args.update(dict(zip(_SDPA_ARGS, node.args, strict=False)))
    args.update(node.kwargs)
    return args


def extract_sdpa(node: fx.Node, index: int) -> Match:
    args = sdpa_args(node)
    qs = _shape(args["query"])
    if len(qs) not in (3, 4) or len(_shape(args["key"])) != len(qs) or len(_shape(args["value"])) != len(qs):
        raise Decline(f"SDPA on {len(qs)}-D inputs (only 3-D and 4-D are rewritten)")
    is_3d = len(qs) == 3
    ident = _identity(len(qs))
    q_node, q_perm = fold_permutes(args["query"], ident)
    k_node, k_perm = fold_permutes(args["key"], ident)
    v_node, v_perm = fold_permutes(args["value"], ident)
    groups = 1
    if not is_3d:
        k_node, k_perm, v_node, v_perm, groups = strip_kv_repeats(k_node, k_perm, v_node, v_perm)
    kb = permuted_shape(k_node, k_perm)
    _check_qkv(qs, kb, permuted_shape(v_node, v_perm), is_3d)
    if not is_3d:
        groups = _sdpa_groups(qs[1], kb[1], groups, bool(args["enable_gqa"]))
    mask, score, ex = _sdpa_mask(args["attn_mask"], is_3d)
    dead_rows = ex.dead_rows
    if args["is_causal"]:
        mask = mods_lib.and_masks(mods_lib.causal(), mask) if mask is not None else mods_lib.causal()
        if dead_rows is not None:
            causal = mods_lib.causal()
            dead_rows = dataclasses.replace(dead_rows, mask=causal if dead_rows.mask is None
                                            else mods_lib.and_masks(causal, dead_rows.mask))
    site = AttentionSite(
        name=f"attn{index}", pattern="sdpa", q=q_node, k=k_node, v=v_node, output=node,
        layout=_layout_name(is_3d, q_perm, k_perm), output_layout="3d" if is_3d else "bhsd",
        scale=_scalar_value(args["scale"]) if args["scale"] is not None else None, gqa_groups=groups,
        dropout_p=_scalar_value(args["dropout_p"]) or 0.0, softmax_dtype=None, mask=mask, score=score,
        mask_extras=list(ex.mask_extras), score_extras=list(ex.score_extras), nodes={node} | set(ex.consumed),
        dead_rows=dead_rows,
        location=location_of(node), q_perm=_or_none(q_perm), k_perm=_or_none(k_perm), v_perm=_or_none(v_perm),
        out_perm=None, is_3d=is_3d, output_dtype=val_of(node).dtype, notes=list(ex.notes))
    return Match("sdpa", site)


def _sdpa_groups(hq: Any, hkv: Any, groups: int, enable_gqa: bool) -> int:
    """Query heads per KV head: a stripped repeat, MQA (one KV head broadcast), or enable_gqa."""
    if same_size(hkv, 1) and not same_size(hq, 1) and groups == 1:
        groups = int(hq)  # MQA: one KV head broadcast over the query heads
    if not same_size(hq, hkv * groups) and enable_gqa:
        ratio = hq // (hkv * groups)
        if same_size(ratio * hkv * groups, hq):
            groups *= int(ratio)
    if not same_size(hq, hkv * groups):
        raise Decline(f"query heads {hq} are not a multiple of key heads {hkv}")
    return groups


def _sdpa_mask(attn_mask: Any, is_3d: bool):
    """(mask mod, score mod, the extraction) of SDPA's attn_mask (none: empty extraction)."""
    from .. import mods as extract

    if attn_mask is None:
        return None, None, extract.ExtractedMods()
    dims = ("b", "q", "kv") if is_3d else ("b", "h", "q", "kv")
    try:
        ex = extract.extract_attn_mask(attn_mask, dims=dims)
    except UnsupportedPatternError as exc:
        raise Decline(f"attention mask not expressible: {exc}") from exc
    if ex.scale is not None:
        raise Decline("attention mask extraction reported a scale; SDPA masks carry none")
    return ex.mask, ex.score, ex


SDPA_RULE = register_rule(Rule("sdpa", frozenset(SDPA_OPS), extract_sdpa, pattern="sdpa"))
