"""Numerics of the generated kernels that only show at scale or on a GPU, checked here under the
Triton interpreter: 64-bit memory offsets, and the compiled kernel's bf16 rounding of P and dS."""

from __future__ import annotations

import re

import torch
from test_triton_support import assert_close, compare_block, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.kernels import reference
from ringcompile.kernels.triton import show, triton_block_kernels
from ringcompile.spec import AttentionSpec

# names the template may multiply by a stride: int64 values, or head-dim lanes (< D_PAD)
INT64_OR_SMALL = {"b", "h", "kv_h", "rows64", "cols64", "offs_d", "offs_dv"}


def test_generated_source_multiplies_strides_by_int64_values_only():
    src = show(AttentionSpec(mask=mods.and_masks(mods.causal(), mods.key_padding()), score=mods.alibi()),
               head_dim=64, groups=2)
    products = re.findall(r"(\w+)(?:\[[^\]]*\])? \* stride_\w+", src)
    assert len(products) > 40  # every q/k/v/do/out/lse/grad address in the three kernels
    assert set(products) <= INT64_OR_SMALL, set(products) - INT64_OR_SMALL
    for name in ("b", "h"):
        assert re.search(rf"\b{name} = \(bh [/%]+ n_heads\)\.to\(tl\.int64\)", src)
    assert "rows64 = offs_m.to(tl.int64)" in src and "cols64 = cols.to(tl.int64)" in src


def test_offsets_beyond_2_31_elements_address_the_right_memory():
    """Batch 2 starts 2**31 + 128 elements into q's storage, with every stride below 2**31 (so Triton
    passes them as int32): a 32-bit ``b * stride_qb`` wraps. The 4 GiB storage is virtual, only
    the viewed rows are touched."""
    B, S, D = 3, 12, 16
    stride_b = 2**30 + 64
    storage = torch.empty(2 * stride_b + S * D, dtype=torch.float16)
    g = torch.Generator().manual_seed(31)
    for b in range(B):
        storage[b * stride_b: b * stride_b + S * D] = torch.randn(S * D, generator=g).half()
    q = storage.as_strided((B, 1, S, D), (stride_b, S * D, D, 1))
    assert q.storage_offset() + 2 * stride_b > 2**31
    k = torch.randn(B, 1, S, D, generator=g).half()
    v = torch.randn(B, 1, S, D, generator=g).half()
    kernels = triton_block_kernels(AttentionSpec(mask=mods.causal(), kernel="triton"), forced=True)
    compare_block(kernels, q, k, v, tol=1e-2, scale=D ** -0.5, q_offset=0, kv_offset=0, seq_len=S,
                  mask=mods.causal())


def test_bf16_rounding_of_p_and_ds_is_emulated_and_within_bf16_tolerance():
    """Under the interpreter bf16 tiles are computed in fp32 (numpy has no bf16 dot), but P and dS
    are still rounded through bf16 before their dots, as the compiled kernel does: the result
    differs from all-fp32 math on the same bf16 inputs by bf16 rounding, and stays within bf16
    tolerance of float64."""
    src = show(AttentionSpec(mask=mods.causal()), head_dim=32, dtype=torch.bfloat16)
    assert "p_v.to(tl.bfloat16)" in src and "ds.to(tl.bfloat16)" in src
    g = torch.Generator().manual_seed(5)
    B, H, S, D = 1, 2, 24, 32
    q, k, v = (torch.randn(B, H, S, D, generator=g).bfloat16() for _ in range(3))
    kernels = triton_block_kernels(AttentionSpec(mask=mods.causal(), kernel="triton"), forced=True)
    kw = dict(scale=D ** -0.5, q_offset=0, kv_offset=0, seq_len=S, mask=mods.causal())
    out, lse = kernels.forward(q, k, v, **kw)
    ref_out, ref_lse = reference.block_forward(q.double(), k.double(), v.double(), **kw)
    assert_close(out, ref_out, 2e-2, "out")
    assert_close(lse, ref_lse, 1e-4, "lse")  # lse never passes through bf16
    fp32_out, _ = reference.block_forward(q.float(), k.float(), v.float(), **kw)
    rounding = (out - fp32_out).abs().max().item()
    assert 1e-4 < rounding < 2e-2, f"P is not rounded through bf16 (diff to fp32 math {rounding:.3g})"
    dout = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    dq, dk, dv, _ = kernels.backward(q, k, v, ref_out.bfloat16(), dout.bfloat16(), ref_lse.float(), **kw)
    rq, rk, rv, _ = reference.block_backward(q.double(), k.double(), v.double(), ref_out.bfloat16().double(),
                                             dout.bfloat16().double(), ref_lse, **kw)
    for got, want, name in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        assert_close(got, want, 3e-2, name)
