"""sym_sizes on its own: the size nodes it writes compute the right lengths for every sequence length."""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from ringcompile.errors import UnsupportedPatternError
from ringcompile.passes.sym_sizes import SymSizes


def _symbolic_graph(example_len: int):
    """A graph over x (2, S, 3) with S symbolic; returns (gm, S as the graph knows it)."""
    gm = make_fx(lambda x: x * 2, tracing_mode="symbolic")(torch.randn(2, example_len, 3))
    (x,) = gm.graph.find_nodes(op="placeholder")
    return gm, x.meta["val"].shape[1]


def _outputs(gm, sizes):
    """Make the graph return the emitted sizes next to its result."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0], *sizes),)
    gm.recompile()


@settings(max_examples=15)
@given(example=st.integers(4, 40), world=st.integers(1, 4), layout=st.sampled_from(["contiguous", "zigzag"]),
       shift=st.integers(0, 3), lengths=st.lists(st.integers(4, 50), min_size=1, max_size=4))
def test_padded_local_and_shifted_lengths_follow_the_input(example, world, layout, shift, lengths):
    gm, seq = _symbolic_graph(example)
    sizes = SymSizes(gm, seq, world, layout)
    shifted = sizes.length(example - shift)  # "the sequence length minus shift", as x[:, :-shift] has
    offset = sizes.offset(seq - shift)
    _outputs(gm, [sizes.seq, sizes.padded, sizes.local, shifted])
    assert offset == shift
    unit = world * (2 if layout == "zigzag" else 1)
    for n in lengths:
        _, got_seq, padded, local, got_shifted = gm(torch.randn(2, n, 3))
        want_padded = -(-n // unit) * unit
        assert (got_seq, padded, local, got_shifted) == (n, want_padded, want_padded // world, n - shift)


def test_local_size_of_a_flattened_dim():
    gm, seq = _symbolic_graph(6)
    sizes = SymSizes(gm, seq, world=2, layout="contiguous")
    local = sizes.local_size(2 * seq, 6)  # a (B*S) dim: B times the local length
    _outputs(gm, [local])
    for n in (6, 7, 11):
        assert gm(torch.randn(2, n, 3))[1] == 2 * (-(-n // 2) * 2 // 2)
    with pytest.raises(UnsupportedPatternError):
        sizes.local_size(seq * seq, 6)  # not a multiple of the length
    with pytest.raises(UnsupportedPatternError):
        sizes.emit(sympy.Symbol("unknown"))  # no input carries it


def test_a_composite_sequence_expression_is_refused():
    gm, seq = _symbolic_graph(6)
    with pytest.raises(UnsupportedPatternError, match="not one size symbol"):
        SymSizes(gm, seq + 1, world=2, layout="contiguous")
