"""``torch.ops.ringcompile.ring_attention``: the op every rewritten attention becomes.

Forward and backward are both custom ops, so AOTAutograd and Inductor treat each as one
opaque call in the forward and backward graphs; the ring communication inside them is
never traced. Inputs are the local shards (B, H, S_local, D) in the spec's layout;
``seq_len`` is the true global sequence length (keys past it are padding).
Both ops wait on collectives (and the metadata check reads a result on the host), so they
are tagged cudagraph-unsafe where torch has the tag (``op_support``); their work runs under
``torch.cuda.device(q.device)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from . import op_support
from .spec import AttentionSpec, get_spec

Tensor = torch.Tensor


def lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("ringcompile::ring_attention", mutates_args=(), **op_support.SYNCING)
def ring_attention_op(
    q: Tensor, k: Tensor, v: Tensor, mask_extras: list[Tensor], score_extras: list[Tensor],
    seq_len: int, spec_key: str, dropout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns (out in q's dtype, lse of shape (B, Hq, S_local) in fp32, fp64 for fp64 q)."""
    from .runtime.dispatch import attention_forward

    with op_support.device_guard(q.device):
        out, lse = attention_forward(q, k, v, mask_extras, score_extras, seq_len, get_spec(spec_key),
                                     dropout_seed)
    return out.to(q.dtype).contiguous(), lse.to(lse_dtype(q)).contiguous()


@ring_attention_op.register_fake
def _(q, k, v, mask_extras, score_extras, seq_len, spec_key, dropout_seed=None):
    B, H, S, D = q.shape
    return q.new_empty(B, H, S, v.shape[-1]), q.new_empty(B, H, S, dtype=lse_dtype(q))


@torch.library.custom_op("ringcompile::ring_attention_backward", mutates_args=(), **op_support.SYNCING)
def ring_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    mask_extras: list[Tensor], score_extras: list[Tensor], seq_len: int, spec_key: str,
    dropout_seed: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Returns (dq, dk, dv, d_score_extras); a non-differentiable extra gets an empty tensor."""
    from .runtime.dispatch import attention_backward

    with op_support.device_guard(q.device):
        dq, dk, dv, d_extras = attention_backward(dout, q, k, v, out, lse, mask_extras, score_extras,
                                                  seq_len, get_spec(spec_key), dropout_seed)
    grads = [
        g.to(e.dtype).contiguous() if g is not None
        else (torch.zeros_like(e) if e.is_floating_point() else e.new_empty(0))
        for g, e in zip(d_extras, score_extras, strict=True)
    ]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous(), grads


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, mask_extras, score_extras, seq_len, spec_key, dropout_seed=None):
    grads = [e.new_empty(e.shape) if e.is_floating_point() else e.new_empty(0) for e in score_extras]
    contiguous = torch.contiguous_format  # the real op returns .contiguous() grads (q may be permuted)
    return (torch.empty_like(q, memory_format=contiguous), torch.empty_like(k, memory_format=contiguous),
            torch.empty_like(v, memory_format=contiguous), grads)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask_extras, score_extras, seq_len, spec_key, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *mask_extras, *score_extras,
                          *(() if dropout_seed is None else (dropout_seed,)))
    ctx.n_mask, ctx.n_score = len(mask_extras), len(score_extras)
    ctx.has_seed = dropout_seed is not None
    ctx.seq_len, ctx.spec_key = seq_len, spec_key
    ctx.extra_float = [e.is_floating_point() for e in score_extras]


def with_lse_grad(v: Tensor, out: Tensor, dout: Tensor, dlse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(v, out, dout) with one more column each, so that any flash-style backward also carries ``dlse``.

    The backward needs ``delta = rowsum(dout * out) - dlse`` (``d lse_i / d s_ij = P_ij``). Every
    kernel path computes ``delta`` from ``out`` itself (PyTorch's fused CPU backward does so
    internally), so the shift is fed through the data instead: with ``v' = [v, 1]``,
    ``out' = [out, 0]`` and ``dout' = [dout, dlse]``, ``dP'_ij = dP_ij + dlse_i`` while ``delta``
    is unchanged, which is the same ``dS``; ``dv'``'s first columns are ``dv``. Exact without
    dropout only (the rewrite never reads lse of a site with dropout)."""
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
    out1 = torch.cat([out, out.new_zeros(*out.shape[:-1], 1)], -1)
    dout1 = torch.cat([dout, dlse.to(dout.dtype).unsqueeze(-1)], -1)
    return v1, out1, dout1


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    mask_extras = rest[:ctx.n_mask]
    score_extras = rest[ctx.n_mask:ctx.n_mask + ctx.n_score]
    seed = rest[ctx.n_mask + ctx.n_score] if ctx.has_seed else None
    if dout is None:
        dout = torch.zeros_like(out)
    lse_grad = dlse is not None and not ctx.has_seed
    if lse_grad:  # lse is read by the graph (attention sinks): its gradient joins dS
        v, out, dout = with_lse_grad(v, out, dout, dlse)
    dq, dk, dv, d_extras = ring_attention_backward_op(
        dout.contiguous(), q, k, v, out, lse, list(mask_extras), list(score_extras), ctx.seq_len,
        ctx.spec_key, seed)
    if lse_grad:
        dv = dv[..., :-1]
    d_score = [g if is_float else None for g, is_float in zip(d_extras, ctx.extra_float, strict=True)]
    # one gradient per input actually passed: the dispatcher drops a trailing dropout_seed=None, so
    # the seed's None is returned only when a seed tensor was given
    return (dq, dk, dv, [None] * ctx.n_mask, d_score, None, None) + ((None,) if ctx.has_seed else ())


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)


@dataclasses.dataclass(frozen=True)
class RingCall:
    """The arguments of one ``ring_attention`` call in an FX graph, by name (passes never index args).

    Fields follow the op's schema; ``seq_len`` is an int or a SymInt node, ``spec_key`` the
    registry key of the call's ``AttentionSpec``.
    """

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask_extras: list[Any]
    score_extras: list[Any]
    seq_len: Any
    spec_key: str
    dropout_seed: Any = None

    @classmethod
    def from_node(cls, node: fx.Node) -> RingCall:
        """Read ``node`` (positional or keyword arguments); ValueError if it is not a ring_attention call."""
        if not is_ring_call(node):
            raise ValueError(f"{node.format_node()} is not a call of torch.ops.ringcompile.ring_attention")
        values = {}
        for i, arg in enumerate(_SCHEMA_ARGS):
            if i < len(node.args):
                values[arg.name] = node.args[i]
            elif arg.name in node.kwargs:
                values[arg.name] = node.kwargs[arg.name]
            else:
                values[arg.name] = arg.default_value if arg.has_default_value() else None
        return cls(node=node, **values)

    @property
    def spec(self) -> AttentionSpec:
        return get_spec(self.spec_key)

    def replace_args(self, **changes: Any) -> None:
        """Set the named arguments of the call in the graph (others unchanged), e.g. ``seq_len=n``."""
        unknown = set(changes) - {a.name for a in _SCHEMA_ARGS}
        if unknown:
            raise TypeError(f"ring_attention has no argument(s) {sorted(unknown)}")
        merged = {a.name: changes.get(a.name, getattr(self, a.name)) for a in _SCHEMA_ARGS}
        self.node.args = tuple(merged[a.name] for a in _SCHEMA_ARGS)
        self.node.kwargs = {}


RING_ATTENTION = torch.ops.ringcompile.ring_attention.default
_SCHEMA_ARGS = tuple(RING_ATTENTION._schema.arguments)


def is_ring_call(node: Any) -> bool:
    """Whether ``node`` is a call of the ring_attention op."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is RING_ATTENTION
