"""Triton dropout on a head group: ``HeadOffsetSeed(seed, h0)`` makes the kernels hash GLOBAL heads.

A ulysses or hybrid rank holds heads [h0, h0 + H/N) after its all-to-all; its keep mask must be the
one-process mask of those global heads. Run by the Triton interpreter on CPU with tiny shapes.
"""

from __future__ import annotations

import torch
from test_triton_support import assert_close, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.kernels import dropout, reference
from ringcompile.kernels.triton import triton_block_kernels
from ringcompile.spec import AttentionSpec

P = 0.4


def _kernels(mask=None, score=None):
    k = triton_block_kernels(AttentionSpec(mask=mask, score=score, kernel="triton"), forced=True)
    assert k is not None and k.name == "triton"
    return k


def test_the_triton_keep_mask_is_the_reference_mask_of_the_global_heads():
    """v = identity over the keys makes out[b, h, q, j] = P[q, j] * keep / (1 - p) (softmax P > 0 with no
    mask), so ``out != 0`` is the kernel's keep mask: bit for bit the hash of heads h0.., not of 0.."""
    B, H, Sq, Sk, h0, q_off, kv_off, seq = 2, 3, 18, 32, 5, 40, 7, 80
    g = torch.Generator().manual_seed(21)
    q = torch.randn(B, H, Sq, 16, generator=g)
    k = torch.randn(B, H, Sk, 16, generator=g)
    v = torch.eye(Sk).expand(B, H, Sk, Sk).contiguous()
    seed = dropout.HeadOffsetSeed(2**33 + 77, h0)
    out, _ = _kernels().forward(q, k, v, scale=0.2, q_offset=q_off, kv_offset=kv_off, seq_len=seq,
                                dropout_p=P, dropout_seed=seed)
    b, h, qi, kvi = mods.index_grid(B, H, q_off, Sq, kv_off, Sk)
    want = dropout.keep_mask(int(seed), b, h + h0, qi, kvi, P)
    assert torch.equal(out != 0, want.expand(B, H, Sq, Sk))
    assert not torch.equal(want, dropout.keep_mask(int(seed), b, h, qi, kvi, P))  # the offset matters


def test_a_head_group_gets_the_full_heads_result_sliced_at_h0_forward_and_backward():
    """GQA 4:2 under causal + ALiBi: the group (q heads 2..3, kv head 1) with HeadOffsetSeed(s, 2) gives
    bit for bit the full-heads Triton result at those heads, forward and all three gradients, and both
    equal float64 block math with the same global-head mask (the dK/dV and dQ kernels drop the same)."""
    mask, score = mods.causal(), mods.alibi()
    B, Hq, Hkv, Sq, Sk, D, h0 = 1, 4, 2, 20, 23, 16, 2
    g = torch.Generator().manual_seed(22)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    slopes = torch.rand(Hq, generator=g)
    dout = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    kernels = _kernels(mask, score)
    kw = dict(scale=0.3, q_offset=17, kv_offset=5, seq_len=40, mask=mask, score=score, dropout_p=P)
    group = (slice(None), slice(h0, Hq))
    kv_group = (slice(None), slice(h0 // 2, Hkv))

    def run(q, k, v, slopes, dout, seed):
        out, lse = kernels.forward(q, k, v, score_extras=[slopes], dropout_seed=seed, **kw)
        ref_out, ref_lse = reference.block_forward(q.double(), k.double(), v.double(), dropout_seed=seed,
                                                   score_extras=[slopes.double()], **kw)
        assert_close(out, ref_out, 2e-5, "out")
        assert_close(lse, ref_lse, 2e-5, "lse")
        grads = kernels.backward(q, k, v, ref_out.float(), dout.float(), ref_lse.float(),
                                 score_extras=[slopes], dropout_seed=seed, **kw)
        ref = reference.block_backward(q.double(), k.double(), v.double(), ref_out, dout, ref_lse,
                                       score_extras=[slopes.double()], dropout_seed=seed, **kw)
        for got, want, name in zip(grads[:3], ref[:3], ("dq", "dk", "dv"), strict=True):
            assert_close(got, want, 2e-5, name)
        return out, grads[:3]

    seed = 2**40 + 9
    full_out, (fdq, fdk, fdv) = run(q, k, v, slopes, dout, seed)
    out, (dq, dk, dv) = run(q[group].contiguous(), k[kv_group].contiguous(), v[kv_group].contiguous(),
                            slopes[h0:], dout[group].contiguous(), dropout.HeadOffsetSeed(seed, h0))
    assert torch.equal(out, full_out[group])
    assert torch.equal(dq, fdq[group]) and torch.equal(dk, fdk[kv_group]) and torch.equal(dv, fdv[kv_group])
    # negative control: the same group hashed as heads 0.. drops other entries
    plain, _ = kernels.forward(q[group].contiguous(), k[kv_group].contiguous(), v[kv_group].contiguous(),
                               score_extras=[slopes[h0:]], dropout_seed=seed, **kw)
    assert (plain - full_out[group]).abs().max() > 1e-2
