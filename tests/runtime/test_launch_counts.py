"""The Triton kernels get whole chunks: O(1) launches per ring step (issue 16.7).

Counted on the stand-in GPU of ``test_host_syncs`` (meta tensors, the compiled module replaced
by a recorder), so an 8K-token chunk costs nothing to "run". Correctness of whole-chunk launches
is checked under the interpreter in ``tests/kernels/test_triton_whole_chunks.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fake_gpu import GPU

from ringcompile import mods
from ringcompile.kernels.select import BlockKernels
from ringcompile.runtime.strategies import STRATEGIES
from ringcompile.runtime.strategies.common import (
    RingContext,
    chunk_pieces,
    compute_block,
    empty_outputs,
    forward_pairs,
)
from ringcompile.spec import AttentionSpec

MASKS = {
    "none": (None, 0),
    "causal": (mods.causal(), 0),
    "causal+padding": (mods.and_masks(mods.causal(), mods.key_padding()), 1),
    "sliding_window": (mods.sliding_window(1024), 0),
}


def _launches_by_kernel(launches) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, _ in launches:
        out[name] = out.get(name, 0) + 1
    return out


@pytest.mark.parametrize("mask", list(MASKS))
def test_one_local_forward_and_backward_over_8k_tokens_is_three_launches(triton_on_fake_gpu, mask):
    kernels, launches = triton_on_fake_gpu
    m, n_extras = MASKS[mask]
    S = 8192
    spec = AttentionSpec(mask=m, dropout_p=0.1)
    q, k, v, dout = (torch.randn(1, 8, S, 64, device=GPU) for _ in range(4))
    extras = [torch.ones(1, S, dtype=torch.bool, device=GPU)] * n_extras
    ctx = RingContext(SimpleNamespace(rank=0, world_size=1), spec, "local", S, "contiguous", extras, [],
                      kernels, 1234)
    out, lse = STRATEGIES["local"].forward(ctx, q, k, v)
    assert _launches_by_kernel(launches) == {"block_fwd": 1}
    STRATEGIES["local"].backward(ctx, dout, q, k, v, out, lse)
    assert _launches_by_kernel(launches) == {"block_fwd": 1, "block_bwd_dkdv": 1, "block_bwd_dq": 1}
    grid_m = launches[0][1]
    assert grid_m[1] == 8 and grid_m[0] >= S // 256  # one grid over the whole chunk


def test_a_zigzag_ring_step_is_at_most_one_launch_per_piece_pair(triton_on_fake_gpu):
    """Rank 0 of 2 (zigzag) holds two 2K pieces; against its own K/V: 3 non-empty causal pairs."""
    kernels, launches = triton_on_fake_gpu
    S, quarter = 8192, 2048
    spec = AttentionSpec(mask=mods.causal())
    ctx = RingContext(SimpleNamespace(rank=0, world_size=2), spec, "zigzag", S, "zigzag", [], [], kernels)
    pieces = chunk_pieces([(0, quarter), (3 * quarter, S)], S)
    q, k, v = (torch.randn(1, 8, 2 * quarter, 64, device=GPU) for _ in range(3))
    out, lse = empty_outputs(q, v)
    forward_pairs(ctx, q, pieces, k, v, pieces, out, lse)
    assert len(launches) == 3  # (0,0) and (1,1) diagonal, (1,0) full; (0,1) skipped by index arithmetic


def test_only_tiling_kernels_get_whole_chunks():
    triton = BlockKernels("triton", None, None)
    cpu = BlockKernels("cpu", None, None, preferred_block=16384)
    padded = AttentionSpec(mask=mods.and_masks(mods.causal(), mods.key_padding()))
    assert compute_block(padded, triton) > 1 << 40
    assert compute_block(padded, cpu) == 512  # the CPU kernels keep their blocking
