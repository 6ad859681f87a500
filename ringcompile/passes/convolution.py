"""Convolutions as the sequence passes see them: which spatial dims are position-local.

A convolution's output position ``t`` reads input positions ``t * stride - padding + j * dilation`` for
``j < kernel``. Along a spatial dim with kernel 1, stride 1 and padding 0 (SqueezeBERT's ``Conv1d(k=1)``
projections over a (B, C, S) layout, any groups, any dilation) that is position ``t`` alone, so a
sequence-sharded input gives the output sharded on the same dim. A larger kernel reads neighbouring
positions (across a shard boundary: a halo) and a stride or padding changes the length; those dims get no
sequence rule, and ``why_not_local`` says why and what to do.

One parser (``conv_args``) reads every spelling the normalised graph holds: ``conv{1,2,3}d`` (``.default``
and ``.padding`` with ``"same"``/``"valid"``), ``conv_transpose{1,2,3}d.input``, ``convolution`` and
``_convolution``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from .aten import hint_shape, sym_shape

aten = torch.ops.aten

# op -> (stride, padding, dilation, output_padding) argument positions (None: the op has no such argument)
# and the position of ``transposed`` (an int position, or a constant bool)
_CONV = (3, 4, 5, None)
_TRANSPOSE = (3, 4, 7, 5)
_GENERIC = (3, 4, 5, 7)
CONV_ARGS: dict[Any, tuple[tuple[int | None, ...], int | bool]] = {
    **{op: (_CONV, False) for op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                                     aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)},
    **{op: (_TRANSPOSE, True) for op in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                                         aten.conv_transpose3d.input)},
    aten.convolution.default: (_GENERIC, 6),
    aten._convolution.default: (_GENERIC, 6),
}
_NAMES = ("stride", "padding", "dilation", "output_padding")
_DEFAULTS = (1, 0, 1, 0)


@dataclasses.dataclass(frozen=True)
class ConvArgs:
    """A convolution's geometry, one entry per spatial dim (``padding`` may be ``"same"``/``"valid"``).
    ``first_spatial``: the input (and output) dim of spatial dim 0 (2 batched, 1 unbatched)."""

    kernel: tuple[int, ...]
    stride: tuple[Any, ...]
    padding: tuple[Any, ...] | str
    dilation: tuple[Any, ...]
    output_padding: tuple[Any, ...]
    transposed: bool
    first_spatial: int
    lengths: tuple[tuple[int, int], ...]  # (input, output) length of each spatial dim (example values)

    def local(self, i: int) -> bool:
        """Whether spatial dim ``i`` maps each output position to the same input position alone."""
        pad = 0 if isinstance(self.padding, str) else self.padding[i]
        return self.kernel[i] == 1 and self.stride[i] == 1 and pad == 0 and self.output_padding[i] == 0


def _arg(node: fx.Node, pos: int | None, name: str, default: Any) -> Any:
    if pos is None:
        return default
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _per_dim(value: Any, n: int) -> tuple[Any, ...]:
    """An int or int list argument as one entry per spatial dim (aten expands a single entry)."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    return tuple(vals * n) if len(vals) == 1 else tuple(vals)


def conv_args(node: fx.Node) -> ConvArgs | None:
    """The geometry of convolution ``node``; None for another op or an input/weight without a static shape."""
    spec = CONV_ARGS.get(node.target) if node.op == "call_function" else None
    x, w = (hint_shape(node.args[0]), hint_shape(node.args[1])) if spec is not None else (None, None)
    out = hint_shape(node) if spec is not None else None
    if x is None or w is None or out is None or len(w) < 3 or len(out) != len(x):
        return None
    positions, transposed = spec
    if not isinstance(transposed, bool):
        transposed = bool(_arg(node, transposed, "transposed", False))
    n = len(w) - 2
    vals = [_arg(node, p, name, d) for p, name, d in zip(positions, _NAMES, _DEFAULTS, strict=True)]
    stride, padding, dilation, output_padding = vals
    padding = padding if isinstance(padding, str) else _per_dim(padding, n)
    first = len(x) - n
    return ConvArgs(tuple(w[2:]), _per_dim(stride, n), padding, _per_dim(dilation, n),
                    _per_dim(output_padding, n), transposed, first,
                    tuple((x[d], out[d]) for d in range(first, len(x))))


def local_dims(node: fx.Node, args: ConvArgs) -> list[int]:
    """The input dims (= output dims) along which ``node`` is position-local, length included."""
    x, out = sym_shape(node.args[0]), sym_shape(node)
    if x is None or out is None or len(x) != len(out):
        return []
    dims = [args.first_spatial + i for i in range(len(args.kernel)) if args.local(i)]
    return [d for d in dims if x[d] == out[d]]


def why_not_local(args: ConvArgs, dim: int | None = None) -> str:
    """Why a convolution has no sequence rule along input dim ``dim`` (None: its first non-local one)."""
    spatial = [i for i in range(len(args.kernel)) if not args.local(i)]
    i = dim - args.first_spatial if dim is not None else (spatial[0] if spatial else None)
    if i is None or not 0 <= i < len(args.kernel):
        return ("a convolution mixes the channels along this dim (it is not a spatial dim): the sequence "
                "cannot pass through it")
    pad = args.padding if isinstance(args.padding, str) else args.padding[i]
    what = (f"{'transposed ' if args.transposed else ''}convolution with kernel {args.kernel[i]}, stride "
            f"{args.stride[i]}, padding {pad!r}, dilation {args.dilation[i]} along dim "
            f"{args.first_spatial + i}")
    why = []
    if args.kernel[i] != 1:
        why.append("each output reads neighbouring positions, across a shard boundary (a halo this pass "
                   "does not exchange)")
    n_in, n_out = args.lengths[i]
    if n_in != n_out:
        why.append(f"its stride or padding changes the sequence length ({n_in} -> {n_out})")
    return (f"{what}: {' and '.join(why) or 'its padding moves the positions'}; only kernel 1, "
            "stride 1, padding 0 passes the sequence. To shard the layers after it, keep the convolution "
            "out of the compiled region (compile the layers it feeds, so its output enters the graph as "
            "an input)")
