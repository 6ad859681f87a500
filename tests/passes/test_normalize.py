"""normalize on its own: a Dynamo graph becomes an aten graph with the same inputs, sources and values."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringcompile.errors import UnsupportedPatternError
from ringcompile.passes.aten import EXAMPLE_KEY, SOURCE_KEY
from ringcompile.passes.normalize import _is_module_state, fake_mode_of, normalize


class _Block(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.register_buffer("bias", torch.randn(dim))

    def forward(self, x, scale: float):
        return torch.softmax(self.proj(x) * scale + self.bias, dim=-1).transpose(-2, -1)


def _dynamo_graph(model, *args, dynamic=False):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, dynamic=dynamic)(*args)
    torch._dynamo.reset()
    (captured,) = graphs
    return captured


@settings(max_examples=4)
@given(seq=st.integers(2, 9), dim=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
def test_aten_graph_computes_what_the_model_does(seq, dim, seed):
    torch.manual_seed(seed)
    model, x = _Block(dim), torch.randn(2, seq, dim)
    gm, inputs = _dynamo_graph(model, x, 0.5)
    aten_gm = normalize(gm)
    old, new = (list(g.graph.find_nodes(op="placeholder")) for g in (gm, aten_gm))
    assert [p.meta["ringcompile_dynamo_name"] for p in new] == [p.name for p in old]
    for p in new:  # only module state may carry a real value
        assert EXAMPLE_KEY not in p.meta or _is_module_state(p.meta[SOURCE_KEY])
    targets = {n.target for n in aten_gm.graph.nodes if n.op == "call_function"}
    assert all(isinstance(t, torch._ops.OpOverload) or t is operator.getitem for t in targets), targets
    assert fake_mode_of(aten_gm) is not None
    out = aten_gm(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out.double(), model.double()(x.double(), 0.5), atol=1e-6, rtol=1e-6)


def test_module_state_names():
    assert _is_module_state("L['self']._modules['proj']._parameters['weight']")
    assert _is_module_state("L['self']._buffers['bias']")
    assert not _is_module_state("L['x']") and not _is_module_state(None)


def test_a_graph_without_example_values_is_refused():
    gm = torch.fx.symbolic_trace(lambda x: x.softmax(-1))
    with pytest.raises(UnsupportedPatternError, match="no example value"):
        normalize(gm)
