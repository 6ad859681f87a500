"""Global-index dropout: the hash, its invariance to blocking, and dropout in the block kernels."""

from __future__ import annotations

import pytest
import torch
from blockwise import blockwise_attention
from hypothesis import given
from hypothesis import strategies as st

from ringcompile import mods
from ringcompile.errors import RingCompileError
from ringcompile.kernels import cpu, dropout, reference

M32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """The documented lowbias32, in plain Python ints (an independent implementation)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _keep_int(seed: int, b: int, h: int, q: int, kv: int, p: float) -> bool:
    seed32 = (seed ^ (seed >> 32)) & M32
    row = _mix32_int(_mix32_int(_mix32_int(_mix32_int(seed32 ^ 0x9E3779B9) ^ b) ^ h) ^ q)
    col = _mix32_int(kv ^ 0x85EBCA6B)
    return (_mix32_int(row ^ col) >> 8) >= min(1 << 24, round(p * (1 << 24)))


@given(seed=st.integers(0, 2**63 - 1), b=st.integers(0, 7), h=st.integers(0, 63),
       q=st.integers(0, 2**31 - 1), kv=st.integers(0, 2**31 - 1), p=st.floats(0.0, 0.99))
def test_keep_mask_matches_the_documented_hash(seed, b, h, q, kv, p):
    """The int64 tensor version equals the uint32 arithmetic the Triton kernels implement."""
    t = [torch.tensor([x]) for x in (b, h, q, kv)]
    assert bool(dropout.keep_mask(seed, *t, p)[0]) == _keep_int(seed, b, h, q, kv, p)


@given(x=st.integers(0, 2**32 - 1))
def test_unmix32_inverts_mix32(x):
    assert dropout.unmix32(_mix32_int(x)) == x and _mix32_int(dropout.unmix32(x)) == x


@given(seed=st.integers(0, 2**63 - 1), b=st.integers(0, 2**31 - 1), h=st.integers(0, 63),
       q=st.integers(0, 2**31 - 1), kv=st.integers(0, 2**31 - 1))
def test_a_batch_row_seed_hashes_batch_zero_as_the_original_row(seed, b, h, q, kv):
    """``batch_row_seed(seed, b)`` keeps entries of batch 0 exactly where ``seed`` keeps batch ``b``
    (against the documented hash), as an int and as the op's one-element tensor seed alike."""
    s = dropout.batch_row_seed(seed, b)
    s_tensor = dropout.batch_row_seed(torch.tensor([seed]), b)
    assert int(s_tensor.reshape(())) == s
    for p in (0.3, 0.7):
        assert _keep_int(s, 0, h, q, kv, p) == _keep_int(seed, b, h, q, kv, p)


def test_keep_mask_is_blocking_invariant_and_has_the_right_rate():
    B, H, S = 2, 3, 96
    full = dropout.keep_mask(1234, *mods.index_grid(B, H, 0, S, 0, S), 0.3)
    assert full.shape == (B, H, S, S)
    for q0, k0, n in ((0, 0, 17), (40, 7, 33), (90, 60, 6)):
        part = dropout.keep_mask(1234, *mods.index_grid(B, H, q0, n, k0, n), 0.3)
        assert torch.equal(part, full[:, :, q0:q0 + n, k0:k0 + n])
    rate = full.float().mean().item()
    assert abs(rate - 0.7) < 0.01, rate  # 55k Bernoulli draws: sd ~ 0.002
    other = dropout.keep_mask(1235, *mods.index_grid(B, H, 0, S, 0, S), 0.3)
    assert 0.3 < (full != other).float().mean().item() < 0.5  # independent seeds: 2 * 0.3 * 0.7 = 0.42
    assert not torch.equal(full[0], full[1]) and not torch.equal(full[:, 0], full[:, 1])


def test_dropout_arguments_are_checked():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RingCompileError, match="dropout_seed"):
        cpu.block_forward(q, q, q, scale=0.3, dropout_p=0.1)
    with pytest.raises(RingCompileError, match=r"\[0, 1\)"):
        cpu.block_forward(q, q, q, scale=0.3, dropout_p=1.0, dropout_seed=1)


def _dropout_attention64(q, k, v, scale, mask, seed, p):
    """Plain float64 attention with the keep mask applied to softmax(scores): the oracle."""
    B, Hq, S, _ = q.shape
    groups = Hq // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-2, -1) * scale
    grid = mods.index_grid(B, Hq, 0, S, 0, k.shape[2])
    if mask is not None:
        s = s.masked_fill(~mask.fn(*grid), float("-inf"))
    probs = torch.softmax(s, -1) * dropout.keep_mask(seed, *grid, p).double() / (1 - p)
    return probs @ v


@pytest.mark.parametrize("kernels", [cpu, reference], ids=["cpu", "reference"])
@pytest.mark.parametrize("masked", [False, True])
def test_block_dropout_matches_float64(kernels, masked):
    gen = torch.Generator().manual_seed(11 + masked)
    B, Hq, hkv, S, D, p, seed = 2, 4, 2, 24, 8, 0.25, 987654321
    q = torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64)
    mask = mods.causal() if masked else None
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    expected = _dropout_attention64(qr, kr, vr, 0.4, mask, seed, p)
    dout = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    expected.backward(dout)
    lib = reference.attention_reference(q, k, v, scale=0.4, mask=mask, dropout_p=p, dropout_seed=seed)
    torch.testing.assert_close(lib, expected.detach())

    q32, k32, v32, do32 = (t.float() for t in (q, k, v, dout))
    kw = dict(scale=0.4, seq_len=S, mask=mask, dropout_p=p, dropout_seed=torch.tensor([seed]))
    cuts = [(0, 10), (10, S)]
    out, lse, *grads = blockwise_attention(kernels.block_forward, kernels.block_backward, q32, k32, v32, do32,
                                           cuts, **kw)
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=2e-5)
    no_drop = reference.attention_reference(q, k, v, scale=0.4, mask=mask)
    assert not torch.allclose(out.double(), no_drop, atol=1e-3)  # dropout really happened

    for got, ref in zip(grads, (qr.grad, kr.grad, vr.grad), strict=True):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("strategy", "layout", "world_size", "block"),
                         [("local", "contiguous", 1, 5), ("local", "contiguous", 1, 64),
                          ("ring", "contiguous", 3, None), ("zigzag", "zigzag", 2, 4)])
def test_dropout_is_the_same_under_every_layout_block_and_rank_count(strategy, layout, world_size, block):
    """Through the runtime (simulated ranks, real strategies): output and grads equal the oracle."""
    from ringcompile.runtime.execute import run_backward, run_forward
    from ringcompile.runtime.layouts import shard_tensor, unshard_tensor
    from ringcompile.runtime.simulated import simulate
    from ringcompile.spec import AttentionSpec

    gen = torch.Generator().manual_seed(world_size * 100 + (block or 0))
    B, Hq, hkv, S, D, p, seed = 1, 2, 1, 24, 8, 0.3, 4242
    q = torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, hkv, S, D, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, Hq, S, D, generator=gen, dtype=torch.float64)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    expected = _dropout_attention64(qr, kr, vr, D ** -0.5, mods.causal(), seed, p)
    expected.backward(dout)

    spec = AttentionSpec(mask=mods.causal(), dropout_p=p, strategy=strategy, layout=layout, block_size=block)
    seed_t = torch.tensor([seed])
    shards = [[shard_tensor(t.float(), 2, world_size, r, layout, S) for r in range(world_size)]
              for t in (q, k, v, dout)]

    def rank(comm):
        r = comm.rank
        qs, ks, vs, ds = (s[r] for s in shards)
        out, lse = run_forward(comm, qs, ks, vs, [], [], S, spec, strategy, layout, seed_t)
        grads = run_backward(comm, ds, qs, ks, vs, out, lse, [], [], S, spec, strategy, layout, seed_t)
        return out, grads

    results = simulate(rank, world_size)
    out = unshard_tensor([o for o, _ in results], 2, layout, S)
    torch.testing.assert_close(out.double(), expected.detach(), atol=2e-5, rtol=2e-5)
    for i, ref in enumerate((qr.grad, kr.grad, vr.grad)):
        got = unshard_tensor([g[i] for _, g in results], 2, layout, S)
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_a_head_offset_seed_hashes_global_heads():
    """``HeadOffsetSeed(s, h0)`` on a tensor's heads 0.. is seed s on global heads h0..; the Triton launcher
    passes h0 to the kernels as their head offset (0 for a plain seed)."""
    from ringcompile.kernels.triton.launch import _dropout_args

    b, h, q, kv = mods.index_grid(2, 3, 5, 7, 0, 9)
    seed = dropout.HeadOffsetSeed(99, 4)
    assert int(seed) == 99 and dropout.seed_to_int(seed).head_offset == 4
    shifted = dropout.keep_mask(seed, b, h, q, kv, 0.4)
    assert torch.equal(shifted, dropout.keep_mask(99, b, h + 4, q, kv, 0.4))
    assert not torch.equal(shifted, dropout.keep_mask(99, b, h, q, kv, 0.4))
    plain = _dropout_args(0.4, 99, torch.device("cpu"))
    offset = _dropout_args(0.4, seed, torch.device("cpu"))
    assert plain[1] == 0 and offset[1] == 4
    assert torch.equal(offset[0], plain[0]) and offset[2:] == plain[2:]


def test_a_head_offset_seed_holds_a_tensor_seed_without_reading_it():
    """``with_head_offset`` on the op's seed tensor keeps the tensor (the Triton launcher passes that very
    tensor to the kernels, with the offset as an int); reading it once gives the int seed with the same
    offset, and its keep mask is the int seed's on the shifted heads, bit for bit."""
    from ringcompile.kernels.triton.launch import _dropout_args

    tensor = torch.tensor([2**35 + 12345], dtype=torch.int64)
    seed = dropout.with_head_offset(tensor, 3)
    assert seed.seed is tensor and seed.head_offset == 3 and dropout.seed_on_device(seed)
    assert dropout.with_head_offset(seed, 2).head_offset == 5  # a group inside a group
    read = dropout.seed_to_int(seed)
    assert read.seed == 2**35 + 12345 and read.head_offset == 3 and not dropout.seed_on_device(read)
    b, h, q, kv = mods.index_grid(2, 3, 5, 7, 0, 9)
    want = dropout.keep_mask(2**35 + 12345, b, h + 3, q, kv, 0.4)
    assert torch.equal(dropout.keep_mask(seed, b, h, q, kv, 0.4), want)
    assert torch.equal(dropout.keep_mask(read, b, h, q, kv, 0.4), want)
    args = _dropout_args(0.4, seed, torch.device("cpu"))
    assert args[0].data_ptr() == tensor.data_ptr() and args[1] == 3
    assert dropout.with_head_offset(None, 3) is None


def test_every_pytorch_kernel_set_hashes_a_head_group_seed_tensor_like_the_full_heads():
    """The CPU, generic and reference kernels given ``HeadOffsetSeed(seed tensor, h0)`` on heads h0..
    (what ulysses / hybrid pass) return bit for bit the full-heads result at those heads, forward and
    backward; the same group hashed as heads 0.. differs (the offset is used)."""
    from ringcompile.kernels import cpu, generic, reference

    g = torch.Generator().manual_seed(17)
    B, H, S, D, h0 = 1, 4, 12, 8, 2
    q, k, v, dout = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(4))
    seed = torch.tensor([2**33 + 5], dtype=torch.int64)
    kw = dict(scale=0.3, q_offset=4, kv_offset=0, seq_len=16, mask=mods.causal(), dropout_p=0.4)
    group = (slice(None), slice(h0, H))
    for forward, backward in ((cpu.block_forward, cpu.block_backward),
                              (generic.block_forward, generic.block_backward),
                              (reference.block_forward, reference.block_backward)):
        full_out, full_lse = forward(q, k, v, dropout_seed=seed, **kw)
        full_grads = backward(q, k, v, full_out, dout, full_lse, dropout_seed=seed, **kw)
        part = [t[group].contiguous() for t in (q, k, v, dout)]
        shifted = dropout.with_head_offset(seed, h0)
        out, lse = forward(*part[:3], dropout_seed=shifted, **kw)
        grads = backward(*part[:3], out, part[3], lse, dropout_seed=shifted, **kw)
        assert torch.equal(out, full_out[group]) and torch.equal(lse, full_lse[group])
        for got, want in zip(grads[:3], full_grads[:3], strict=True):
            assert torch.equal(got, want[group])
        plain, _ = forward(*part[:3], dropout_seed=seed, **kw)
        assert not torch.equal(plain, out)
