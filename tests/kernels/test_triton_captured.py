"""Mods that close over tensors (FlexAttention's usual form: ``lengths[b]``, ``slopes[h]``,
``doc_ids[b, kv_idx]``) lowered with the tensors as extra kernel arguments (issue 15 item 4),
forward and backward under the Triton interpreter against float64 block math."""

from __future__ import annotations

import pytest
import torch
from test_triton_support import compare_block, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.errors import KernelError
from ringcompile.kernels.triton import show, triton_block_kernels
from ringcompile.kernels.triton.lower_mods import check_lowerable
from ringcompile.spec import AttentionSpec


def kernels_for(mask=None, score=None):
    k = triton_block_kernels(AttentionSpec(mask=mask, score=score, kernel="triton"), forced=True)
    assert k is not None and k.name == "triton"
    return k


def qkv(B, Hq, Hkv, Sq, Sk, D, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Sq, D, generator=g), torch.randn(B, Hkv, Sk, D, generator=g),
            torch.randn(B, Hkv, Sk, D, generator=g), g)


def test_padding_lengths_per_batch_captured():
    q, k, v, g = qkv(2, 2, 2, 19, 21, 16, seed=1)
    lengths = torch.tensor([23, 35])  # global key positions: this block holds keys 17..37
    mask = mods.from_callable(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], True)
    assert check_lowerable(mask) is None
    compare_block(kernels_for(mask=mask), q, k, v, tol=2e-5, scale=0.25, q_offset=20, kv_offset=17,
                  seq_len=38, mask=mask, seed=3)


def test_alibi_slopes_per_head_captured_with_causal_gqa():
    q, k, v, g = qkv(1, 4, 2, 18, 20, 16, seed=2)
    slopes = torch.rand(4, generator=g, dtype=torch.float64).float() + 0.1

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    score = mods.from_callable(alibi, False)
    mask = mods.causal()
    kern = kernels_for(mask=mask, score=score)
    compare_block(kern, q, k, v, tol=2e-5, scale=0.3, q_offset=30, kv_offset=20, seq_len=50, mask=mask,
                  score=score, seed=4)


def test_document_ids_per_batch_and_key_captured():
    q, k, v, g = qkv(2, 2, 1, 20, 22, 16, seed=3)
    doc_ids = torch.sort(torch.randint(0, 4, (2, 48), generator=g), dim=1).values  # (batch, global position)

    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

    mask = mods.from_callable(document_causal, True)
    compare_block(kernels_for(mask=mask), q, k, v, tol=2e-5, scale=0.25, q_offset=24, kv_offset=10,
                  seq_len=48, mask=mask, seed=5)


def test_captured_tensors_combine_with_extras_and_are_passed_after_them():
    q, k, v, g = qkv(2, 2, 2, 17, 17, 16, seed=4)
    lengths = torch.tensor([12, 17])
    bias = torch.randn(2, 17, generator=g)
    mask = mods.and_masks(mods.key_padding(), mods.from_callable(lambda b, h, qi, kv: kv < lengths[b], True))
    score = mods.from_callable(lambda s, b, h, qi, kv: s + 0.5 * bias[b, kv], False)
    key_mask = torch.rand(2, 17, generator=g) > 0.2
    key_mask[:, 0] = True
    src = show(AttentionSpec(mask=mask, score=score), head_dim=16, mask_extras=[key_mask])
    assert "mask_x0_ptr" in src and "mask_c0_ptr" in src and "score_c0_ptr" in src
    assert "score_c0_grad_ptr" not in src  # a captured tensor is a constant of the op: no gradient
    compare_block(kernels_for(mask=mask, score=score), q, k, v, tol=2e-5, scale=0.25, q_offset=0,
                  kv_offset=0, seq_len=17, mask=mask, score=score, mask_extras=[key_mask], seed=6)


def test_rebinding_a_captured_name_is_seen_at_the_next_call():
    q, k, v, g = qkv(2, 1, 1, 16, 16, 16, seed=5)
    lengths = torch.tensor([5, 9])

    def padded(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    mask = mods.from_callable(padded, True)
    kern = kernels_for(mask=mask)
    kw = dict(tol=2e-5, scale=0.25, q_offset=0, kv_offset=0, seq_len=16, mask=mask, backward=False)
    compare_block(kern, q, k, v, **kw)
    lengths = torch.tensor([12, 3])  # noqa: F841 - read by `padded` through its closure
    compare_block(kern, q, k, v, **kw)
    lengths = torch.tensor([[1, 2]])  # a different rank: not what the kernel was generated for
    with pytest.raises(KernelError, match="captured by the mod changed from 1-D"):
        kern.forward(q, k, v, scale=0.25, mask=mask, seq_len=16)


@pytest.mark.timeout(300)
def test_ring_of_two_with_captured_document_ids_and_slopes_matches_full_attention():
    """Through the ring runtime (virtual ranks): each step's block sees global indices, so the
    captured tensors are indexed at the right positions on every rank and step."""
    from test_triton_support import assert_ring_matches_float64

    from ringcompile.runtime import simulated

    g = torch.Generator().manual_seed(31)
    B, H, S, D = 1, 2, 20, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g, requires_grad=True) for _ in range(3))
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4])
    slopes = torch.tensor([0.25, 0.5])
    mask = mods.from_callable(lambda b, h, qi, kv: (doc_ids[b, qi] == doc_ids[b, kv]) & (kv <= qi), True)
    score = mods.from_callable(lambda s, b, h, qi, kv: s + slopes[h] * (kv - qi), False)
    out = simulated.simulated_ring_attention(q, k, v, world_size=2, strategy="ring", mask=mask, score=score,
                                             kernel="triton", timeout=120)
    assert_ring_matches_float64(out, q, k, v, g, mask=mask, score=score)
