"""passes/aliases.py reads which values share storage from the aten graph: views and in-place results
alias their input; ``to`` / ``contiguous`` alias only when they return their input (same dtype, device,
strides), else they copy, so a write into the copy does not reach (nor copy back into) the input."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ringcompile.passes.aliases import Aliases


def _graph(fn, *args):
    gm = make_fx(fn, pre_dispatch=True)(*args)
    return gm, {n.name: n for n in gm.graph.nodes}


def test_views_and_inplace_results_alias_copies_do_not():
    def f(x):
        y = x.to(torch.float32)          # a copy: another dtype
        y.mul_(2.0)
        t = x.transpose(0, 1).contiguous()  # a copy: another layout
        v = x.view(-1)
        v.add_(1.0)
        return y, t, x.sum()

    gm, by = _graph(f, torch.randn(3, 4, dtype=torch.float64))
    al = Aliases(gm.graph)
    x = by["x_1"]
    assert al.chain(by["add_"]) == [by["add_"], by["view"], x]
    assert al.chain(by["mul_"]) == [by["mul_"], by["to"]]      # the float32 copy owns its storage
    assert by["contiguous"] not in al.members(x) and by["to"] not in al.members(x)
    assert {by["view"], by["add_"], by["transpose"]} <= al.members(x)
    assert al.read_after(x, by["add_"])            # the sum reads x after the write through its view
    assert not al.read_after(by["view"], by["add_"])


def test_to_of_the_same_dtype_is_the_input_itself():
    def f(x):
        y = x.to(torch.float64)
        y.mul_(2.0)
        return x * 1.0

    gm, by = _graph(f, torch.randn(3, 4, dtype=torch.float64))
    al = Aliases(gm.graph)
    writes = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mul_.Tensor]
    assert al.chain(writes[0])[-1] is by["x_1"]
