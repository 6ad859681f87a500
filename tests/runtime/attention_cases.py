"""Random attention cases with every kind of mod, and the simulated-ring check against float64 eager
attention on the unsharded input (forward and gradients), shared by the runtime tests."""

import torch

from ringcompile import mods
from ringcompile.kernels.reference import attention_reference
from ringcompile.runtime.simulated import simulated_ring_attention

MASKS = ("none", "causal", "sliding", "padding", "alibi", "softcap_causal", "document")


def attention_case(mask: str, B: int, hq: int, hkv: int, S: int, D: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=dtype).requires_grad_(True) for h in (hq, hkv, hkv))
    m, s, me, se = None, None, [], []
    if mask == "causal":
        m = mods.causal()
    elif mask == "sliding":
        m = mods.sliding_window(3, is_causal=bool(seed % 2))
    elif mask == "padding":
        key_mask = torch.rand(B, S, generator=g) > 0.4
        key_mask[:, 0] = True
        m, me = mods.key_padding(), [key_mask]
    elif mask == "alibi":  # learnable slopes: their gradient is all-reduced over ranks
        m, s = mods.causal(), mods.alibi()
        se = [torch.rand(hq, generator=g, dtype=dtype).requires_grad_(True)]
    elif mask == "softcap_causal":
        m, s = mods.causal(), mods.softcap(2.0)
    elif mask == "document":  # a mask no fast path knows: documents of random lengths
        doc = torch.cumsum(torch.rand(S, generator=g) < 0.2, 0)
        m = mods.from_callable(lambda b, h, qi, kv: doc[qi] == doc[kv], is_mask=True)
    return (q, k, v), m, s, me, se


def check_simulated(strategy, world, mask, B, hq, hkv, S, D, seed, block_size=None, tol=1e-9, layout=None):
    (q, k, v), m, s, me, se = attention_case(mask, B, hq, hkv, S, D, seed)
    out = simulated_ring_attention(q, k, v, world_size=world, strategy=strategy, mask=m, score=s,
                                   mask_extras=me, score_extras=se, enable_gqa=True, block_size=block_size,
                                   layout=layout)
    ref = attention_reference(q, k, v, mask=m, score=s, mask_extras=me, score_extras=se)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    dout = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(seed + 1))
    wrt = [q, k, v, *se]
    for a, b in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(ref, wrt, dout), strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
