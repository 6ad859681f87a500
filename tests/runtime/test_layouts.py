"""Layouts: chunk tables partition the padded sequence, and shard/unshard round-trip."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ringcompile.errors import OptionError, ShapeMismatchError
from ringcompile.runtime.layouts import (
    global_order,
    local_chunks,
    local_indices,
    padded_length,
    shard_tensor,
    unshard_tensor,
)

layouts = st.sampled_from(["contiguous", "zigzag"])


@given(seq_len=st.integers(0, 200), world=st.integers(1, 8), layout=layouts)
def test_chunks_partition_the_padded_sequence(seq_len, world, layout):
    unit = world * (2 if layout == "zigzag" else 1)
    total = padded_length(seq_len, world, layout)
    assert total % unit == 0 and seq_len <= total < seq_len + unit
    covered = []
    for rank in range(world):
        chunks = local_chunks(total, world, rank, layout)
        assert sum(e - s for s, e in chunks) == total // world
        idx = local_indices(total, world, rank, layout)
        assert idx.tolist() == [i for s, e in chunks for i in range(s, e)]
        covered += idx.tolist()
    assert sorted(covered) == list(range(total))
    every = [c for r in range(world) for c in local_chunks(total, world, r, layout)]
    assert global_order(total, world, layout) == every


def test_zigzag_holds_chunk_r_and_its_mirror():
    assert local_chunks(16, 4, 0, "zigzag") == [(0, 2), (14, 16)]
    assert local_chunks(16, 4, 3, "zigzag") == [(6, 8), (8, 10)]
    assert local_chunks(12, 3, 1, "contiguous") == [(4, 8)]


@given(seq_len=st.integers(1, 40), world=st.integers(1, 6), layout=layouts, dim=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_shard_unshard_round_trip_with_padding(seq_len, world, layout, dim, seed):
    g = torch.Generator().manual_seed(seed)
    shape = [3, 2, 4]
    shape[dim] = seq_len
    x = torch.randn(shape, generator=g)
    shards = [shard_tensor(x, dim, world, r, layout) for r in range(world)]
    total = padded_length(seq_len, world, layout)
    for r, s in enumerate(shards):
        want = torch.cat([x, x.new_zeros([*shape[:dim], total - seq_len, *shape[dim + 1:]])], dim)
        assert torch.equal(s, want.index_select(dim, local_indices(total, world, r, layout)))
    assert torch.equal(unshard_tensor(shards, dim, layout, seq_len), x)


def test_shard_is_differentiable():
    x = torch.randn(2, 10, requires_grad=True)
    w = torch.randn(2, 4)
    (shard_tensor(x, 1, 3, 1, "zigzag") * w).sum().backward()
    want = torch.zeros(2, 12)
    want.index_copy_(1, local_indices(12, 3, 1, "zigzag"), w)
    assert torch.equal(x.grad, want[:, :10])


def test_errors():
    with pytest.raises(OptionError, match="layout"):
        padded_length(10, 2, "striped")
    with pytest.raises(ShapeMismatchError, match="multiple of 4"):
        local_chunks(10, 2, 0, "zigzag")
    with pytest.raises(OptionError, match="rank"):
        local_chunks(8, 2, 2, "contiguous")
    with pytest.raises(ShapeMismatchError, match="rank 1"):
        unshard_tensor([torch.zeros(4), torch.zeros(3)], 0, "contiguous", 7)
