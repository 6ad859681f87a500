"""The convolution placement rule (``passes.convolution``, ``placements._convolution``) on every spelling the
pre-dispatch graph holds: kernel 1, stride 1, padding 0 along a spatial dim links it to the same output dim;
anything else along it gets no link and a reason that names the kernel, stride and padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from ringcompile.passes.convolution import conv_args, why_not_local
from ringcompile.passes.placements import links_for


def _conv_node(fn, *args):
    gm = make_fx(fn, pre_dispatch=True)(*args)
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 1, gm.graph
    return convs[0]


def _linked(node) -> set[tuple[int, int]]:
    """(input dim, output dim) links of the conv's input (argument 0)."""
    return {(lk.in_dim, lk.out_dim) for lk in links_for(node).links if lk.arg == (0,)}


x1, w1 = torch.randn(2, 4, 6), torch.randn(8, 2, 1)
CASES = [  # (name, fn, args, linked (in, out) dims of the input)
    ("conv1d k=1 groups=2", lambda x, w: F.conv1d(x, w, torch.ones(8), groups=2), (x1, w1), {(0, 0), (2, 2)}),
    ("conv1d k=1 'same'", lambda x, w: F.conv1d(x, w, padding="same", groups=2), (x1, w1), {(0, 0), (2, 2)}),
    ("conv1d k=1 dilation 3", lambda x, w: F.conv1d(x, w, dilation=3, groups=2), (x1, w1), {(0, 0), (2, 2)}),
    ("unbatched conv1d k=1", lambda x, w: F.conv1d(x, w, groups=2), (x1[0], w1), {(1, 1)}),
    ("conv1d k=1 stride 2", lambda x, w: F.conv1d(x, w, stride=2, groups=2), (x1, w1), {(0, 0)}),
    ("conv1d k=1 padding 1", lambda x, w: F.conv1d(x, w, padding=1, groups=2), (x1, w1), {(0, 0)}),
    ("conv1d k=3 padding 1", lambda x, w: F.conv1d(x, w, padding=1), (x1, torch.randn(8, 4, 3)), {(0, 0)}),
    ("conv2d k=(3, 1)", lambda x, w: F.conv2d(x, w, padding=(1, 0)),
     (torch.randn(2, 4, 5, 6), torch.randn(8, 4, 3, 1)), {(0, 0), (3, 3)}),
    ("conv_transpose1d k=1", lambda x, w: F.conv_transpose1d(x, w), (x1, torch.randn(4, 8, 1)),
     {(0, 0), (2, 2)}),
    ("convolution k=1", lambda x, w: torch.ops.aten.convolution(x, w, None, [1], [0], [1], False, [0], 1),
     (x1, torch.randn(8, 4, 1)), {(0, 0), (2, 2)}),
]


@pytest.mark.parametrize("name,fn,args,linked", CASES, ids=[c[0] for c in CASES])
def test_conv_links_only_position_local_dims(name, fn, args, linked):
    node = _conv_node(fn, *args)
    assert _linked(node) == linked, (name, node.format_node())
    rule = links_for(node)
    assert all(lk.arg == (0,) for lk in rule.links), "weight and bias get no link (replicated, grads summed)"
    spatial = range(conv_args(node).first_spatial, len(args[0].shape))
    for d in spatial:
        if (d, d) not in linked:
            assert "convolution with kernel" in rule.why_unlinked[((0,), d)], rule.why_unlinked


def test_reason_names_what_breaks_the_sequence():
    node = _conv_node(lambda x, w: F.conv1d(x, w, stride=2, padding=1), x1, torch.randn(8, 4, 3))
    why = why_not_local(conv_args(node))
    assert "kernel 3, stride 2, padding 1, dilation 1 along dim 2" in why, why
    assert "neighbouring positions" in why and "(6 -> 3)" in why and "compile the layers it feeds" in why, why
    node = _conv_node(lambda x, w: F.conv1d(x, w, stride=2), x1, torch.randn(8, 4, 1))
    why = why_not_local(conv_args(node))
    assert "neighbouring" not in why and "changes the sequence length (6 -> 3)" in why, why
