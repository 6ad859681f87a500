"""Generated Triton kernels compiled for and run on a real GPU (skipped without CUDA).

Run by ``benchmarks/gpu_check.sh``: the block kernels against SDPA (forward and backward, bf16 and
fp32, D 64/128/256, causal or not, GQA), and the simulated ring with ``kernel="triton"`` on CUDA
against SDPA on the whole sequence.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and compiled (not interpreted) Triton")


def _sdpa(q, k, v, causal, dout):
    qg, kg, vg = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    kk, vv = kg.repeat_interleave(groups, 1), vg.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(qg, kk, vv, is_causal=causal)
    out.backward(dout.double())
    return out, qg.grad, kg.grad, vg.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_block_kernels_match_sdpa_on_cuda(dtype, D, causal):
    from ringcompile import mods
    from ringcompile.kernels.triton import triton_block_kernels
    from ringcompile.spec import AttentionSpec

    g = torch.Generator(device="cuda").manual_seed(D + causal)
    B, Hq, Hkv, S = 2, 4, 2, 1000  # S not a multiple of any tile
    q = torch.randn(B, Hq, S, D, device="cuda", generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device="cuda", generator=g, dtype=dtype)
    dout = torch.randn(B, Hq, S, D, device="cuda", generator=g, dtype=dtype)
    mask = mods.causal() if causal else None
    kernels = triton_block_kernels(AttentionSpec(mask=mask, kernel="triton"), forced=True)
    kw = dict(scale=D ** -0.5, seq_len=S, mask=mask)
    out, lse = kernels.forward(q, k, v, **kw)
    ref, rq, rk, rv = _sdpa(q, k, v, causal, dout)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # fp32 runs TF32 dots
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    dq, dk, dv, _ = kernels.backward(q, k, v, out.to(dtype), dout, lse, **kw)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got.double(), want, atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_simulated_ring_with_triton_kernels_on_cuda(strategy):
    from ringcompile.runtime.simulated import simulated_ring_attention

    g = torch.Generator(device="cuda").manual_seed(7)
    B, H, S, D = 1, 4, 2048, 64
    q, k, v = (torch.randn(B, H, S, D, device="cuda", generator=g, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", generator=g, dtype=torch.bfloat16)
    out = simulated_ring_attention(q, k, v, world_size=4, strategy=strategy, is_causal=True, kernel="triton")
    out.backward(dout)
    ref, rq, rk, rv = _sdpa(q, k, v, True, dout)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for got, want in ((q.grad, rq), (k.grad, rk), (v.grad, rv)):
        torch.testing.assert_close(got.double(), want, atol=8e-2, rtol=8e-2)
