"""Whole-chunk Triton launches (issue 16.7) are correct: the kernel tiles, masks and skips inside
one launch over a chunk, here several interpreter tiles long, at ring offsets, vs float64."""

from __future__ import annotations

import pytest
import torch
from test_triton_support import assert_close, assert_ring_matches_float64, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.runtime import local

simulated = pytest.importorskip("ringcompile.runtime.simulated")
launch = pytest.importorskip("ringcompile.kernels.triton.launch")


@pytest.fixture
def chunk_lengths(monkeypatch):
    """Query/key lengths of every Triton forward call; the CPU block size made tiny, so a call
    longer than it proves the Triton path was handed the whole chunk."""
    monkeypatch.setattr(local, "DEFAULT_BLOCK", 8)
    seen: list[tuple[int, int]] = []
    original = launch.TritonBlocks.forward

    def recording(self, q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2]))
        return original(self, q, k, v, **kw)

    monkeypatch.setattr(launch.TritonBlocks, "forward", recording)
    return seen


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy, mask", [("zigzag", "causal"), ("ring", "causal+padding")])
def test_whole_chunk_launches_match_float64(chunk_lengths, strategy, mask):
    g = torch.Generator().manual_seed(5 if mask == "causal" else 6)
    B = 1 if mask == "causal" else 2
    Hq, Hkv, S, D = 2, 1, 68, 16  # ring: 34-token chunks; zigzag: 17-token pieces (tiles of 16)
    q = torch.randn(B, Hq, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    extras: list[torch.Tensor] = []
    m = mods.causal()
    if mask == "causal+padding":
        lengths = torch.tensor([S - 5, 30])  # batch 1: the second half of the keys is padding
        extras = [torch.arange(S).view(1, -1) < lengths.view(-1, 1)]
        m = mods.and_masks(mods.causal(), mods.key_padding())
    out = simulated.simulated_ring_attention(q, k, v, world_size=2, strategy=strategy, mask=m,
                                             mask_extras=extras, enable_gqa=True, kernel="triton",
                                             timeout=300)
    piece = S // 2 if strategy == "ring" else S // 4
    assert chunk_lengths and all(lq == piece and lk == piece for lq, lk in chunk_lengths), chunk_lengths
    assert_ring_matches_float64(out, q, k, v, g, mask=m, mask_extras=extras)


def test_the_fallback_path_still_works_in_blocks(monkeypatch):
    """A call that cannot run as a kernel falls back to the reference math one FALLBACK_BLOCK pair
    at a time (never one S x S block), with the same result."""
    monkeypatch.setattr(launch, "FALLBACK_BLOCK", 8)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    m = mods.causal()
    kw = dict(scale=8 ** -0.5, q_offset=0, kv_offset=0, seq_len=27, mask=m)
    out, lse = launch.blocked_reference_forward(q, k, v, **kw)
    ref_out, ref_lse = launch.reference.block_forward(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = launch.blocked_reference_backward(q, k, v, out, dout, lse, **kw)
    want = launch.reference.block_backward(q, k, v, ref_out, dout, ref_lse, **kw)
    for a, b in zip(got[:3], want[:3], strict=True):
        torch.testing.assert_close(a, b)
