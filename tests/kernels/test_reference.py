"""The block-math contract: blockwise forward/backward with merging equals full float64 attention."""

import torch
from blockwise import blockwise_attention
from hypothesis import given
from hypothesis import strategies as st

from ringcompile import mods
from ringcompile.kernels.reference import attention_reference, block_backward, block_forward

MASKS = {
    "none": lambda: (None, None),
    "causal": lambda: (mods.causal(), None),
    "window": lambda: (mods.sliding_window(3), None),
    "padding": lambda: (mods.key_padding(), None),
    "alibi": lambda: (None, mods.alibi()),
    "softcap": lambda: (mods.causal(), mods.softcap(1.5)),
}


@given(S=st.integers(2, 20), blocks=st.integers(1, 4), groups=st.sampled_from([1, 2]),
       kind=st.sampled_from(sorted(MASKS)), seed=st.integers(0, 2**16))
def test_blockwise_equals_full(S, blocks, groups, kind, seed):
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D = 2, 2, 4
    Hq = Hkv * groups
    q = torch.randn(B, Hq, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    mask, score = MASKS[kind]()
    key_mask = torch.rand(B, S, generator=g) > 0.3
    key_mask[:, 0] = True  # every query keeps at least key 0 (fully masked rows are a separate contract)
    slopes = torch.rand(Hq, generator=g, dtype=torch.float64)
    me = (key_mask,) if kind == "padding" else ()
    se = (slopes,) if kind == "alibi" else ()
    scale = 0.7
    ref = attention_reference(q, k, v, scale=scale, mask=mask, score=score, mask_extras=me, score_extras=se)
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)

    size = -(-S // blocks)
    cuts = [(s, min(s + size, S)) for s in range(0, S, size)]
    kw = dict(scale=scale, seq_len=S, mask=mask, score=score, mask_extras=me, score_extras=se)
    out, lse, dq, dk, dv = blockwise_attention(block_forward, block_backward, q, k, v, dout, cuts, **kw)
    torch.testing.assert_close(out, ref.detach(), atol=1e-10, rtol=1e-10)
    for mine, theirs in zip((dq, dk, dv), ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-9, rtol=1e-9)


def test_padding_keys_past_seq_len_are_ignored():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    out, _ = block_forward(q, k, v, scale=0.5, seq_len=5)
    ref = attention_reference(q, k[:, :, :5], v[:, :, :5], scale=0.5)
    torch.testing.assert_close(out, ref)


def test_fully_masked_rows_give_zero_and_neg_inf_lse():
    q, k, v = (torch.randn(1, 1, 3, 4) for _ in range(3))
    out, lse = block_forward(q, k, v, scale=1.0, q_offset=0, kv_offset=10, mask=mods.causal())
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
