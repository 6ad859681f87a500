"""The softmax(q.k^T) @ v rules, one per spelling:

- ``softmax-sink``: gpt-oss attention sinks (a logit column concatenated, sliced off after the softmax);
- ``softmax-head-split``: Bloom, a (B*H, S, S) matmul viewed to (B, H, S, S) for the mask chain (p @ v
  merged back to (B*H, S, S), or on the 4-D probabilities and v: GPT-NeoX-Japanese);
- ``softmax-lse``: the softmax input's ``logsumexp`` is read too (GraniteSWA's sink as post-attention
  scaling ``out * sigmoid(lse - sink)``): those reads become the op's lse;
- ``softmax-chain``: the plain chain (pointwise ops, in-place ones included, and view round trips).

Each rule finds its ``Spine`` (the matmul and the chain to the softmax input, row-max shifts stripped by
``shift.softmax_input``; ``softmax-row-shift`` declines the unsound ones first), then they share the walk
forward to p @ v (``Forward``), the q/k/v resolution (GQA, MQA) and the site construction.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ringcompile.site import AttentionSite

from ..aten import VIEW_OPS, norm_dim, val_of, value_users
from ..locations import location_of
from .base import Decline, Match, NotAttention, Rule, register_rule
from .chain import (
    Chain,
    _head_split_spine,
    _reshaped_score,
    _score_spine,
    extract_chain,
    not_attention_reason,
)
from .ops import CAST_OPS, DROPOUT_OPS, MATMUL_OPS, SOFTMAX_OPS
from .products import QK, match_pv, match_qk
from .shapes import (
    _check_qkv,
    _layout_name,
    _or_none,
    _same_shape,
    _scalar_value,
    _shape,
    permuted_shape,
    same_size,
    strip_kv_repeats,
)
from .shift import RowShift, softmax_input
from .sinks import _drops_sink, strip_sink

aten = torch.ops.aten


@dataclasses.dataclass
class Spine:
    """From the q.k^T matmul to the softmax input ``x``: ``score`` is where the mods chain starts
    (the matmul, or Bloom's 4-D view of it), ``path`` the nodes score .. x."""

    mm: fx.Node
    score: fx.Node
    path: list[fx.Node]
    x: fx.Node
    head_split: tuple | None = None
    sink: fx.Node | None = None
    extra_nodes: set[fx.Node] = dataclasses.field(default_factory=set)
    lse_readers: list[fx.Node] = dataclasses.field(default_factory=list)
    shift: RowShift | None = None  # row-max shifts stripped from the softmax input (``x`` is unshifted)

    def side_readers(self) -> set[fx.Node]:
        """Reads of the chain that are not "uses outside the softmax": the lse readers, the shift's max."""
        return set(self.lse_readers) | (self.shift.readers if self.shift is not None else set())


@dataclasses.dataclass
class Forward:
    """From the softmax to p @ v: the nodes in between, the left operand of ``pv``, dropout."""

    nodes: list[fx.Node]
    probs: fx.Node
    pv: fx.Node
    dropout_p: float = 0.0
    sink_sliced: bool = False
    pv_merged: bool = True  # head split: p @ v runs on merged (B*H, S, S) probabilities
    returned: fx.Node | None = None  # the probabilities are also an output of the graph (this node)


# ---------------------------------------------------------------------------- the three spines


def _shifted(spine: Spine | None, shift: RowShift | None) -> Spine | None:
    """``spine`` with the stripped row-max shifts recorded (their nodes die with the site)."""
    if spine is not None and shift is not None:
        spine.shift = shift
        spine.extra_nodes = spine.extra_nodes | shift.nodes
    return spine


def _sink_spine(sm: fx.Node) -> Spine | None:
    x, shift = softmax_input(sm)
    found = strip_sink(x) if isinstance(x, fx.Node) else None
    if found is None:
        return None
    scores, sink, nodes = found
    spine = _score_spine(scores)
    if spine is None:
        raise Decline("attention sinks: no q.k^T matmul reaches the scores through pointwise ops")
    return _shifted(Spine(spine[0], spine[0], spine[1], scores, sink=sink, extra_nodes=nodes), shift)


def _split_spine(sm: fx.Node) -> Spine | None:
    x, shift = softmax_input(sm)
    split = _head_split_spine(x) if isinstance(x, fx.Node) and _score_spine(x) is None else None
    if split is None:
        return None
    mm, view, pre, path, heads = split
    if len(mm.users) != 1:
        raise Decline(f"the score matrix ({mm.name}) is also used outside the softmax")
    if pre:  # 3-D chain ops before the head split (DeBERTa's relative-position bias): lift from the matmul
        return _shifted(Spine(mm, mm, pre[1:] + path, x, head_split=heads, extra_nodes={mm}), shift)
    return _shifted(Spine(mm, view, path, x, head_split=heads, extra_nodes={mm}), shift)


def _lse_spine(sm: fx.Node) -> Spine | None:
    """The plain chain whose softmax input is also read by ``logsumexp(x, -1)`` (and nothing else)."""
    x, shift = softmax_input(sm)
    if not isinstance(x, fx.Node):
        return None
    on_the_way = shift.next if shift is not None else sm
    readers = [u for u in value_users(x) if u is not on_the_way and (shift is None or u not in shift.readers)]
    if not readers or not all(_is_row_logsumexp(u, x) for u in readers):
        return None
    spine = _chain_spine(sm)
    spine.lse_readers = readers
    return spine


def _is_row_logsumexp(u: fx.Node, x: fx.Node) -> bool:
    """``u`` is ``logsumexp(x, -1)`` (keepdim or not): the log of the softmax's row normaliser."""
    if u.op != "call_function" or u.target != aten.logsumexp.default or u.args[0] is not x:
        return False
    dims = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
    ndim = len(_shape(x))
    return (isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], int)
            and norm_dim(dims[0], ndim) == ndim - 1)


def _chain_spine(sm: fx.Node) -> Spine:
    why_not = not_attention_reason(sm)
    if why_not is not None:
        raise NotAttention(why_not)
    x, shift = softmax_input(sm)
    spine = _score_spine(x)
    if spine is None:
        if _reshaped_score(x):
            raise Decline("the score matrix is reshaped between q.k^T and the softmax in a way other "
                          "than splitting (B*H) into (B, H); only pointwise ops may sit in between")
        raise Decline("no q.k^T matmul reaches the softmax through pointwise ops")
    return _shifted(Spine(spine[0], spine[0], spine[1], x), shift)


# ---------------------------------------------------------------------------- shared steps


def _check_spine(sm: fx.Node, spine: Spine) -> int:
    """The softmax runs over the key dim of 3-D or 4-D scores that nothing else reads; returns ndim."""
    ndim = len(_shape(spine.x))
    dim = norm_dim(int(sm.args[1]), ndim)
    if dim != ndim - 1:
        raise Decline(f"softmax over dim {dim}, not the key dim {ndim - 1}")
    if ndim not in (3, 4):
        raise Decline(f"{ndim}-D score matrix (only 3-D and 4-D attention is rewritten)")
    for n in spine.path:  # a dtype/shape template use (``type_as(p, scores)``) reads no values
        if len([u for u in value_users(n) if u not in spine.side_readers()]) != 1:
            raise Decline(f"the score matrix ({n.name}) is also used outside the softmax")
    return ndim


def walk_forward(sm: fx.Node, spine: Spine) -> Forward:
    """softmax -> casts / dropout / (sink slice) / (head merge) -> the matmul with v."""
    fwd = Forward([sm], sm, sm)
    while True:
        users = [u for u in fwd.probs.users if u.op != "output"]
        if len(users) < len(fwd.probs.users) and fwd.returned is None:
            fwd.returned = fwd.probs
        if len(users) != 1:
            raise Decline("attention probabilities are also used outside the matmul with v")
        user = users[0]
        if user.op == "call_function" and user.target in MATMUL_OPS:
            fwd.pv = user
            return fwd
        fwd.probs = _forward_step(user, fwd, spine)
        fwd.nodes.append(fwd.probs)


def _forward_step(user: fx.Node, fwd: Forward, spine: Spine) -> fx.Node:
    cur = fwd.probs
    if user.op != "call_function" or user.args[0] is not cur:
        raise Decline(f"softmax output feeds {user.target}, not a matmul with v")
    if user.target in CAST_OPS:
        return user
    if user.target in DROPOUT_OPS:
        return _dropout_step(user, fwd)
    if spine.sink is not None and not fwd.sink_sliced and cur is fwd.nodes[0] and _drops_sink(user, cur):
        fwd.sink_sliced = True  # the sink column's probability is dropped
        return user
    if user.target in VIEW_OPS:
        return user  # a view of the probabilities: _check_forward wants them back in the shape p @ v reads
    raise Decline(f"softmax output feeds {user.target}, not a matmul with v")


def _dropout_step(user: fx.Node, fwd: Forward) -> fx.Node:
    p = _scalar_value(user.args[1]) or 0.0
    train = user.args[2] if len(user.args) > 2 else user.kwargs.get("train", True)
    if user.target == aten.native_dropout.default:
        getters = list(user.users)
        if len(getters) != 1 or getters[0].target is not operator.getitem or getters[0].args[1] != 0:
            raise Decline("dropout mask is used outside the attention")
        fwd.nodes.append(user)
        user = getters[0]
    if train is True or train is None:
        fwd.dropout_p = p
    elif not isinstance(train, bool):
        raise Decline("dropout with a data-dependent training flag")
    return user


def _resolve_heads(qk: QK, v: fx.Node, v_perm: tuple[int, ...], is_3d: bool):
    """(k, k_perm, v, v_perm, groups) with KV-head repeats stripped (GQA) or one KV head broadcast (MQA)."""
    qb = permuted_shape(qk.q, qk.q_perm)
    k, k_perm, groups = qk.k, qk.k_perm, 1
    if not is_3d:
        k, k_perm, v, v_perm, groups = strip_kv_repeats(k, k_perm, v, v_perm)
        kb = permuted_shape(k, k_perm)
        if same_size(kb[1], 1) and not same_size(qb[1], 1) and groups == 1:
            groups = int(qb[1])  # MQA by broadcasting a single KV head
        if not same_size(qb[1], kb[1] * groups):
            raise Decline(f"query heads {qb[1]} do not match key heads {kb[1]} x {groups}")
    _check_qkv(qb, permuted_shape(k, k_perm), permuted_shape(v, v_perm), is_3d)
    return k, k_perm, v, v_perm, groups


def _resolve_split_qk_4d_v(qk: QK, pv, heads: tuple):
    """GPT-NeoX-Japanese: (B*H, S, D) q/k split into ``heads`` = (B, H) for the op, a (B, H, S, D) v as it is
    (no KV-head repeats: the merged q.k^T has one key head per query head)."""
    qb, kb = permuted_shape(qk.q, qk.q_perm), permuted_shape(qk.k, qk.k_perm)
    vb = permuted_shape(pv.v, pv.v_perm)
    if not (isinstance(heads[1], int) and same_size(vb[1], heads[1]) and same_size(qb[0], vb[0] * vb[1])):
        raise Decline(f"v heads {tuple(vb[:2])} do not match the (B, H) split {tuple(heads)} of q.k^T")
    if not same_size(kb[0], qb[0]):
        raise Decline("query and key batch sizes differ (broadcast over batch is not rewritten)")
    _check_qkv((vb[0], vb[1], qb[1], qb[2]), (vb[0], vb[1], kb[1], kb[2]), vb, False)
    return qk.k, qk.k_perm, pv.v, pv.v_perm, 1


def _split_additive(spine: Spine, qk: QK) -> list[fx.Node]:
    """baddbmm's (B*H, ., .) bias as the (B, H, ., .) view ``rewrite.split_merged_head_biases`` added."""
    out = []
    bh = permuted_shape(qk.q, qk.q_perm)[0]
    for bias in qk.additive:
        bs = _shape(bias)
        if len(bs) < 3 or (len(bs) == 3 and same_size(bs[0], 1)):
            out.append(bias)  # broadcasts the same way against 3-D and 4-D scores
            continue
        view = _head_split_view(bias, spine.head_split) if same_size(bs[0], bh) else None
        if view is None:
            raise Decline("baddbmm bias does not split into (B, H) like the scores")
        out.append(view)
    return out


def _head_split_view(bias: fx.Node, heads: tuple) -> fx.Node | None:
    for u in bias.users:
        if (u.target == aten.unflatten.int and u.args[0] is bias and u.args[1] == 0
                and list(u.args[2]) == list(heads)):
            return u
    return None


# ---------------------------------------------------------------------------- the site


def extract_site(sm: fx.Node, index: int, spine: Spine, rule: str) -> Match:
    ndim = _check_spine(sm, spine)
    split = spine.head_split is not None
    qk = match_qk(spine.mm, 3 if split else ndim)
    fwd = walk_forward(sm, spine)
    _check_forward(fwd, spine, ndim)
    merged_pv = split and fwd.pv_merged
    pv = match_pv(fwd.pv, fwd.probs, 3 if merged_pv else ndim)
    is_3d = ndim == 3 or split
    if split and not merged_pv:
        k, k_perm, v, v_perm, groups = _resolve_split_qk_4d_v(qk, pv, spine.head_split)
    else:
        k, k_perm, v, v_perm, groups = _resolve_heads(qk, pv.v, pv.v_perm, is_3d)
    additive = _split_additive(spine, qk) if split else qk.additive
    chain: Chain = extract_chain(spine.score, spine.x, 4 if split else ndim, additive, qk.alpha,
                                 merged_heads=spine.head_split if split and spine.score is spine.mm else None)
    pattern = qk.pattern + ("+view" if split else "")
    if qk.pattern == "einsum" and fwd.pv.target != aten.einsum.default:
        pattern = "einsum+matmul"
    if spine.sink is not None:
        pattern += "+sink"
    if spine.lse_readers:
        pattern += "+lse"
    four_d_out = not is_3d or (split and not merged_pv)
    bshd = four_d_out and pv.out_perm == (0, 2, 1, 3)
    site = AttentionSite(
        name=f"attn{index}", pattern=pattern, q=qk.q, k=k, v=v, output=fwd.pv,
        layout="3d" if split else _layout_name(is_3d, qk.q_perm, k_perm),
        output_layout="bshd" if bshd else ("bhsd" if four_d_out else "3d"), scale=chain.scale,
        gqa_groups=groups,
        dropout_p=fwd.dropout_p, softmax_dtype=val_of(sm).dtype, mask=chain.mask, score=chain.score,
        mask_extras=chain.mask_extras, score_extras=chain.score_extras, dead_rows=chain.dead_rows,
        nodes=set(spine.path) | set(fwd.nodes) | {fwd.pv} | chain.consumed | spine.extra_nodes,
        location=location_of(sm), q_perm=_or_none(qk.q_perm), k_perm=_or_none(k_perm),
        v_perm=_or_none(v_perm), out_perm=None if merged_pv else _or_none(pv.out_perm),
        is_3d=is_3d and not split, head_split=spine.head_split, sink=spine.sink,
        lse_readers=list(spine.lse_readers), pv_merged=fwd.pv_merged, output_dtype=val_of(fwd.pv).dtype,
        notes=chain.notes + ([RETURNED_NOTE] if fwd.returned is not None else []))
    return Match(rule, site)


RETURNED_NOTE = ("the attention probabilities are also returned from the graph (e.g. a layer's attention "
                 "weights where a graph break makes the layer its own frame): the returned copy is still "
                 "computed by the original ops (S x S), p @ v by the ring")


def _check_forward(fwd: Forward, spine: Spine, ndim: int) -> None:
    if fwd.returned is not None and fwd.dropout_p > 0:
        raise Decline("attention probabilities are returned from the graph and dropout is active (the "
                      "returned ones would not match the ring's dropout)")
    if spine.lse_readers and fwd.dropout_p > 0:
        raise Decline("the scores' logsumexp is read and dropout is active (the op's lse gradient is exact "
                      "without dropout only)")
    if spine.sink is not None:
        if not fwd.sink_sliced:
            raise Decline("attention sinks: the sink column's probability is not sliced off before p @ v")
        if ndim != 4:
            raise Decline("attention sinks on merged-head (3-D) scores are not rewritten")
        if fwd.dropout_p > 0:
            raise Decline("attention sinks with dropout are not rewritten (the lse correction is exact "
                          "without dropout only)")
    xs, ps = _shape(spine.x), _shape(fwd.probs)
    if spine.head_split is not None:
        if len(ps) == 4 and _same_shape(ps, xs):
            fwd.pv_merged = False  # p @ v on the (B, H, S, S) probabilities and a 4-D v
        elif len(ps) != 3 or not same_size(ps[0], xs[0] * xs[1]) or not _same_shape(ps[1:], xs[2:]):
            raise Decline("probabilities are neither merged back to (B*H, S, S) nor kept (B, H, S, S) "
                          "before the matmul with v")
    elif not _same_shape(ps, _shape(fwd.nodes[0])[:-1] + (xs[-1],)):  # (a sink column is sliced off)
        raise Decline(f"probabilities are reshaped to {tuple(ps)} before the matmul with v (only view round "
                      "trips back to the softmax's shape are rewritten)")


def _rule(name: str, find_spine) -> Rule:
    def extract(sm: fx.Node, index: int) -> Match | None:
        spine = find_spine(sm)
        return None if spine is None else extract_site(sm, index, spine, name)

    return Rule(name, frozenset(SOFTMAX_OPS), extract, pattern="softmax")


SINK_RULE = register_rule(_rule("softmax-sink", _sink_spine))
HEAD_SPLIT_RULE = register_rule(_rule("softmax-head-split", _split_spine))
LSE_RULE = register_rule(_rule("softmax-lse", _lse_spine))
CHAIN_RULE = register_rule(_rule("softmax-chain", _chain_spine))
