"""nn.MultiheadAttention (need_weights=False) masks are read as structure, not as dense S x S tensors.

MHA merges ``key_padding_mask`` (B, S) into the (B*H, 1, S) mask it hands SDPA and views it back to
(B, H, 1, S): the index lift's round-trip rule turns ``(b*H + h) // H`` back into ``b``, so the
key padding is the (b, kv_idx) ``padding`` mask. With a causal ``attn_mask`` it is causal & padding;
BERT's additive ``(1 - mask) * -10000`` stays an exact padding bias. One process, float64 eager
reference; the 2-rank runs are in tests/models/test_training_setups.py.
"""

from __future__ import annotations

import pytest
import torch

from ringcompile import backend

E, H, B, S = 16, 2, 2, 12
pytestmark = pytest.mark.usefixtures("fresh_dynamo_small_blocks")


class MHA(torch.nn.Module):
    """MultiheadAttention with the masks a user builds: ``causal`` None / "bool" / "float"; key padding
    as the bool (B, S) mask, or its float -inf form built in the graph when the causal mask is float."""

    def __init__(self, causal: str | None) -> None:
        super().__init__()
        self.causal = causal
        self.mha = torch.nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, pad):
        s = x.shape[1]
        mask = None
        if self.causal is not None:
            mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), 1)
        if self.causal == "float":
            mask = torch.zeros(s, s, dtype=x.dtype).masked_fill(mask, float("-inf"))
            pad = torch.zeros(pad.shape, dtype=x.dtype).masked_fill(pad, float("-inf"))
        return self.mha(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=False)[0]


class BertStyle(torch.nn.Module):
    """Hand-written attention with BERT's old additive padding: (1 - mask) * -10000."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(E, 3 * E)

    def forward(self, x, pad):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, -1).permute(2, 0, 3, 1, 4)
        keep = (~pad).to(x.dtype)
        scores = q @ k.transpose(-1, -2) / (E // H) ** 0.5 + (1.0 - keep[:, None, None, :]) * -10000.0
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, E)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, E, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, S - 1 - int(torch.randint(0, 4, (1,), generator=g)):] = True  # padding at the end of one row
    return x, pad


CASES = [("none", "padding", "none"), ("bool", "causal & padding", "none"),
         ("float", "causal & padding", "none"), ("bert", "none", "padding bias")]


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = BertStyle() if kind == "bert" else MHA(None if kind == "none" else kind)
    return model.double().train()


@pytest.mark.parametrize(("kind", "mask", "score"), CASES)
def test_mha_masks_are_structure_and_match_float64(kind, mask, score):
    model = build(kind)
    x, pad = inputs()
    xr = x.clone().requires_grad_(True)
    ref = model(xr, pad)
    ref.backward(torch.cos(ref))
    ref_grads = [p.grad.clone() for p in model.parameters()] + [xr.grad]
    model.zero_grad()
    xc = x.clone().requires_grad_(True)
    out = torch.compile(model, backend="ring", options={"inner": "eager"})(xc, pad)
    out.backward(torch.cos(out))
    site = backend.HISTORY[-1].sites
    assert [s.rewritten for s in site] == [True]
    assert (site[0].mask_description, site[0].score_description) == (mask, score)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for got, want in zip([p.grad for p in model.parameters()] + [xc.grad], ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
