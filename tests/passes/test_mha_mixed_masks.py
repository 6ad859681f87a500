"""nn.MultiheadAttention with a float causal ``attn_mask`` and a bool ``key_padding_mask``.

Torch's ``F._canonical_mask`` warns ("Support for mismatched key_padding_mask and attn_mask is
deprecated") through ``warnings.warn``, which Dynamo cannot trace: the call graph-breaks and MHA runs
eagerly, outside any graph the backend sees (correct, unsharded). The workarounds are masks of one
dtype (tests/passes/test_mha_masks.py, "float"), or letting Dynamo reorder the warning
(``torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)``): then the one graph's
attention is causal & padding and rewritten. Float64 eager reference, forward and gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ringcompile import backend

E, H, B, S = 16, 2, 2, 12
pytestmark = pytest.mark.usefixtures("fresh_dynamo_small_blocks")


class MixedMasks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, pad):
        s = x.shape[1]
        causal = torch.zeros(s, s, dtype=x.dtype).masked_fill(
            torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
        return self.mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]


def _run(seed: int) -> tuple[list, torch.Tensor, torch.Tensor, list, list]:
    torch.manual_seed(1)
    model = MixedMasks().double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, E, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, S - 3:] = True
    xr = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = model(xr, pad)
        ref.backward(torch.cos(ref))
        want = [p.grad.clone() for p in model.parameters()] + [xr.grad]
        model.zero_grad()
        first = len(backend.HISTORY)
        xc = x.clone().requires_grad_(True)
        out = torch.compile(model, backend="ring", options={"inner": "eager"})(xc, pad)
        out.backward(torch.cos(out))
    got = [p.grad for p in model.parameters()] + [xc.grad]
    sites = [(s.rewritten, s.mask_description) for e in backend.HISTORY[first:] for s in e.sites]
    return sites, out, ref, got, want


def test_mixed_mask_dtypes_graph_break_in_torch_and_run_unsharded():
    sites, out, ref, got, want = _run(0)
    assert sites == [], sites  # no graph with this attention reached the backend
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_reordering_the_warning_gives_one_graph_with_causal_and_padding(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "reorderable_logging_functions",
                        {*torch._dynamo.config.reorderable_logging_functions, warnings.warn})
    sites, out, ref, got, want = _run(1)
    assert sites == [(True, "causal & padding")], sites
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
