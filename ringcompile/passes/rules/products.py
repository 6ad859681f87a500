"""The two matmuls of attention: q.k^T (matmul, bmm, baddbmm, einsum) and p.v, as typed matches."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..aten import mutated_in_place
from .base import Decline
from .shapes import _identity, _scalar_value, _shape, fold_permutes

aten = torch.ops.aten
Perm = tuple[int, ...]


@dataclasses.dataclass
class QK:
    """q.k^T: value == q_node permuted by q_perm times (k_node permuted by k_perm)^T, plus baddbmm's
    bias (``additive``) and factor (``alpha``)."""

    q: fx.Node
    q_perm: Perm
    k: fx.Node
    k_perm: Perm
    pattern: str
    additive: list[fx.Node] = dataclasses.field(default_factory=list)
    alpha: float = 1.0


@dataclasses.dataclass
class PV:
    """p.v: v_node permuted by v_perm; ``out_perm`` maps the canonical (batch.., S, Dv) onto the output."""

    v: fx.Node
    v_perm: Perm
    out_perm: Perm


def match_qk(score: fx.Node, ndim: int) -> QK:
    """The q.k^T product ``score`` (an einsum, baddbmm, bmm or matmul of two batched values)."""
    if score.target == aten.einsum.default:
        return _qk_einsum(score, ndim)
    if score.target == aten.baddbmm.default:
        bias, a, b = score.args[:3]
        beta = _scalar_value(score.kwargs.get("beta", 1.0))
        alpha = _scalar_value(score.kwargs.get("alpha", 1.0))
        if beta != 1.0 or alpha is None:
            raise Decline("baddbmm with beta != 1")
        # a bias that is all zeros by construction adds nothing: a scaled bmm (GPT-NeoX-Japanese)
        return _qk_operands(a, b, ndim, "baddbmm", [] if is_zeros(bias) else [bias], alpha)
    if score.target in (aten.matmul.default, aten.bmm.default):
        a, b = score.args[:2]
        return _qk_operands(a, b, ndim, "bmm" if score.target == aten.bmm.default else "matmul")
    raise Decline(f"unknown matmul {score.target}")  # pragma: no cover - MATMUL_OPS is exhaustive


_ZEROS = {aten.zeros.default: None, aten.zeros_like.default: None, aten.new_zeros.default: None,
          aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2}


def is_zeros(node) -> bool:
    """``node`` is a tensor of zeros by construction (``zeros``, ``zeros_like``, ``full(.., 0)``...) that no
    op writes into, directly or through a view; its values are never inspected, so a fill that is not a
    literal zero is not one."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _ZEROS:
        return False
    if mutated_in_place(node):
        return False
    pos = _ZEROS[node.target]
    if pos is None:
        return True
    fill = node.args[pos] if len(node.args) > pos else node.kwargs.get("fill_value")
    return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill == 0


def _qk_operands(a, b, ndim: int, pattern: str, additive: list[fx.Node] | None = None,
                 alpha: float = 1.0) -> QK:
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        raise Decline("matmul operands are not tensors")
    if len(_shape(a)) != ndim or len(_shape(b)) != ndim:
        raise Decline("matmul operands are not batched like q and k (e.g. a weight matrix)")
    ident = _identity(ndim)
    q_node, q_perm = fold_permutes(a, ident)
    k_node, k_perm = fold_permutes(b, ident[:-2] + (ndim - 1, ndim - 2))
    return QK(q_node, q_perm, k_node, k_perm, pattern, list(additive or []), alpha)


def _qk_einsum(score: fx.Node, ndim: int) -> QK:
    eq, operands = score.args[0], score.args[1]
    if len(operands) != 2:
        raise Decline("einsum with other than two operands")
    lhs, out = parse_einsum(eq)
    if len(lhs) != 2 or len(out) != ndim:
        raise Decline(f"einsum {eq!r} is not a q.k^T product")
    batch, ql, kl = out[:-2], out[-2], out[-1]
    contracted = (set(lhs[0]) & set(lhs[1])) - set(out)
    if len(contracted) != 1:
        raise Decline(f"einsum {eq!r} does not contract exactly one head dim")
    d = contracted.pop()
    qi = 0 if ql in lhs[0] else 1
    qs_, ks_ = lhs[qi], lhs[1 - qi]
    want_q, want_k = batch + ql + d, batch + kl + d
    if sorted(qs_) != sorted(want_q) or sorted(ks_) != sorted(want_k):
        raise Decline(f"einsum {eq!r} is not a q.k^T product")
    q_node, q_perm = fold_permutes(operands[qi], tuple(qs_.index(c) for c in want_q))
    k_node, k_perm = fold_permutes(operands[1 - qi], tuple(ks_.index(c) for c in want_k))
    return QK(q_node, q_perm, k_node, k_perm, "einsum")


def match_pv(pv: fx.Node, probs: fx.Node, ndim: int) -> PV:
    """The p.v product ``pv`` whose left operand is the probabilities ``probs``."""
    ident = _identity(ndim)
    if pv.target in (aten.matmul.default, aten.bmm.default):
        if pv.args[0] is not probs or pv.args[1] is probs:
            raise Decline("attention probabilities are not the left operand of the matmul with v")
        v = pv.args[1]
        if not isinstance(v, fx.Node) or len(_shape(v)) != ndim:
            raise Decline("v is not batched like the scores")
        v_node, v_perm = fold_permutes(v, ident)
        return PV(v_node, v_perm, ident)
    if pv.target == aten.einsum.default:
        return _pv_einsum(pv, probs, ndim)
    if pv.target == aten.baddbmm.default:
        raise Decline("probabilities feed a baddbmm, not a plain matmul with v")
    raise Decline(f"softmax output feeds {pv.target}, not a matmul with v")


def _pv_einsum(pv: fx.Node, probs: fx.Node, ndim: int) -> PV:
    eq, operands = pv.args[0], pv.args[1]
    lhs, out = parse_einsum(eq)
    if len(operands) != 2 or len(lhs) != 2 or operands[0] is operands[1]:
        raise Decline(f"einsum {eq!r} is not a p.v product")
    pi = 0 if operands[0] is probs else 1
    sp, sv = lhs[pi], lhs[1 - pi]
    if len(sp) != ndim or len(sv) != ndim or len(out) != ndim:
        raise Decline(f"einsum {eq!r} is not a p.v product")
    batch, ql, kl = sp[:-2], sp[-2], sp[-1]
    if (set(sp) & set(sv)) - set(out) != {kl}:
        raise Decline(f"einsum {eq!r} does not contract the key dim")
    rest = [c for c in sv if c not in batch and c != kl]
    if len(rest) != 1:
        raise Decline(f"einsum {eq!r} is not a p.v product")
    want_v, canon = batch + kl + rest[0], batch + ql + rest[0]
    if sorted(sv) != sorted(want_v) or sorted(out) != sorted(canon):
        raise Decline(f"einsum {eq!r} is not a p.v product")
    v_node, v_perm = fold_permutes(operands[1 - pi], tuple(sv.index(c) for c in want_v))
    return PV(v_node, v_perm, tuple(canon.index(c) for c in out))


def parse_einsum(eq: str) -> tuple[list[str], str]:
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise Decline(f"einsum {eq!r} uses ellipsis or implicit output")
    lhs, out = eq.split("->")
    return lhs.split(","), out
