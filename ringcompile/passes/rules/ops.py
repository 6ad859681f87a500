"""The op families attention rules walk through (targets of the normalised aten graph)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..aten import INPLACE, RULE_CASTS, functional_packet, packet_of, val_of

aten = torch.ops.aten

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}


MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default, aten.baddbmm.default}


SDPA_OPS = {aten.scaled_dot_product_attention.default}


CAST_OPS = RULE_CASTS  # the vocabulary's (passes/aten.py)


def is_float_cast(n: object) -> bool:
    """``n`` casts one floating dtype to another (``.float()`` of scores, not a mask's bool -> float)."""
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target in CAST_OPS
            and isinstance(n.args[0], fx.Node) and _is_float(n) and _is_float(n.args[0]))


def _is_float(n: fx.Node) -> bool:
    val = val_of(n)
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


DROPOUT_OPS = {aten.dropout.default, aten.native_dropout.default}


CHAIN_OPS = CAST_OPS | {
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.add.Scalar,
    aten.sub.Tensor, aten.sub.Scalar, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
    aten.where.ScalarOther, aten.where.ScalarSelf, aten.tanh.default, aten.neg.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.maximum.default,
    aten.minimum.default, aten.rsub.Scalar, aten.rsub.Tensor, aten.div.Tensor_mode, aten.max.other,
}


_CHAIN_PACKETS = {op.overloadpacket for op in CHAIN_OPS}




def is_chain_op(n: fx.Node) -> bool:
    """An op the score may pass through between q.k^T and the softmax; an in-place one counts when
    it is exactly its functional twin (it mutates a fresh value nothing else reads)."""
    if n.op != "call_function":
        return False
    if n.target in CHAIN_OPS:
        return True
    return packet_of(n) in INPLACE and functional_packet(n) in _CHAIN_PACKETS

