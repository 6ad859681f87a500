"""The public API in one process (world size 1 -> local), strategy choice and group resolution.
Multi-rank behaviour of the same functions is in tests/runtime/test_multirank.py."""

import types

import pytest
import torch

import ringcompile
from ringcompile import mods, spec
from ringcompile.errors import OptionError, ShapeMismatchError
from ringcompile.kernels.reference import attention_reference
from ringcompile.runtime.dispatch import choose_strategy
from ringcompile.runtime.group import SINGLE, resolve_group


def _qkv(hq=4, hkv=2, S=13, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, S, D, generator=g, dtype=dtype).requires_grad_(True) for h in (hq, hkv, hkv)]


def test_single_process_flex_style_mods_and_gradients():
    q, k, v = _qkv(seed=1)
    slopes = torch.rand(4, dtype=torch.float64)
    out = ringcompile.ring_attention(
        q, k, v, is_causal=True, enable_gqa=True, scale=0.4,
        mask_mod=lambda b, h, qi, kv: qi - kv < 6,
        score_mod=lambda s, b, h, qi, kv: s + slopes[h].to(s.dtype) * (kv - qi))
    ref = attention_reference(q, k, v, scale=0.4, mask=mods.and_masks(mods.causal(), mods.sliding_window(6)),
                              score=mods.alibi(), score_extras=[slopes])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    mine = torch.autograd.grad(out, [q, k, v], dout.float())
    theirs = torch.autograd.grad(ref, [q, k, v], dout)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_gqa_needs_enable_gqa_like_sdpa():
    q, k, v = _qkv()
    with pytest.raises(ShapeMismatchError, match="enable_gqa=True"):
        ringcompile.ring_attention(q, k, v)
    q, k, v = _qkv(hq=3, hkv=2)
    with pytest.raises(ShapeMismatchError, match="multiple"):
        ringcompile.ring_attention(q, k, v, enable_gqa=True)


def test_invalid_options_are_option_errors():
    q, k, v = _qkv(hq=2, hkv=2)
    with pytest.raises(OptionError, match="strategy"):
        ringcompile.ring_attention(q, k, v, strategy="spiral")
    with pytest.raises(OptionError, match="layout"):
        ringcompile.ring_attention(q, k, v, layout="striped")
    with pytest.raises(OptionError, match="group"):
        ringcompile.ring_attention(q, k, v, group="world")


def test_repeated_calls_reuse_one_spec():
    q, k, v = _qkv(hq=2, hkv=2, S=5)

    def window(b, h, qi, kv):
        return (qi - kv).abs() < 3

    ringcompile.ring_attention(q, k, v, mask_mod=window)
    size = len(spec._REGISTRY)
    for _ in range(3):
        ringcompile.ring_attention(q, k, v, mask_mod=window)
        ringcompile.ring_attention(q, k, v, is_causal=True)
    ringcompile.ring_attention(q, k, v, is_causal=True)
    assert len(spec._REGISTRY) <= size + 1


def test_shard_and_gather_without_a_group_are_identity():
    x = torch.randn(2, 9, 3)
    assert torch.equal(ringcompile.shard(x, 1), x)
    assert torch.equal(ringcompile.gather(x, 1), x)
    assert torch.equal(ringcompile.shard(x, 1, "zigzag"), torch.cat([x, x.new_zeros(2, 1, 3)], 1))


def test_group_resolution_without_distributed():
    assert resolve_group(None) == SINGLE
    with pytest.raises(OptionError, match="ProcessGroup"):
        resolve_group(object())


def test_strategy_choice():
    q, k, v = _qkv(hq=4, hkv=2)
    plain = spec.AttentionSpec()
    assert choose_strategy(q, k, v, 100, 1, plain, "contiguous") == "local"
    assert choose_strategy(q, k, v, 100, 4, plain, "zigzag") == "zigzag"
    assert choose_strategy(q, k, v, 100, 4, plain, "contiguous") in ("ring", "allgather", "ulysses")
    assert choose_strategy(q, k, v, 100, 4, plain.replace(strategy="ulysses"), "contiguous") == "ulysses"
    with pytest.raises(OptionError, match="zigzag"):
        choose_strategy(q, k, v, 100, 4, plain.replace(strategy="zigzag"), "contiguous")
    # without a usable planner, short sequences gather K/V, long ones ring
    import ringcompile.runtime.choice as choice

    orig = choice._planner_choice
    try:
        choice._planner_choice = lambda *a, **kw: None
        assert choose_strategy(q, k, v, 1000, 4, plain, "contiguous") == "allgather"
        assert choose_strategy(q, k, v, 100_000, 4, plain, "contiguous") == "ring"
        choice._planner_choice = lambda *a, **kw: "ulysses"  # heads (2 kv) not divisible by 4
        assert choose_strategy(q, k, v, 100_000, 4, plain, "contiguous") == "ring"
    finally:
        choice._planner_choice = orig


def test_auto_on_zigzag_shards_lets_the_planner_pick_ulysses_with_the_spec_profile(monkeypatch):
    """On zigzag shards "auto" ranks zigzag against ulysses (which runs on any layout) with the
    spec's profile; with heads that do not split over N zigzag is the only choice (dropout does not
    exclude ulysses: it hashes global heads)."""
    import ringcompile.cost_model.planner as planner

    seen = []

    def fake(**kw):
        seen.append(kw)
        return types.SimpleNamespace(strategy="ulysses")

    monkeypatch.setattr(planner, "choose_for_call", fake)
    q, k, v = _qkv(hq=8, hkv=4)
    s = spec.AttentionSpec(profile="h100-infiniband")
    assert choose_strategy(q, k, v, 100, 4, s, "zigzag") == "ulysses"
    assert seen[-1]["strategies"] == ("zigzag", "ulysses") and seen[-1]["profile"] == "h100-infiniband"
    assert choose_strategy(q, k, v, 100, 4, s, "contiguous") == "ulysses"
    assert seen[-1]["strategies"] == ("ring", "allgather", "ulysses")
    calls = len(seen)
    q3, k3, v3 = _qkv(hq=6, hkv=3)
    assert choose_strategy(q3, k3, v3, 100, 4, s, "zigzag") == "zigzag"          # 3 kv heads over 4 ranks
    assert len(seen) == calls                                                   # one candidate: no planning
    assert choose_strategy(q, k, v, 100, 4, s.replace(dropout_p=0.1), "zigzag") == "ulysses"
    assert seen[-1]["strategies"] == ("zigzag", "ulysses")


def test_options_profile_reaches_the_spec():
    """The backend's ``profile`` option is what the run-time planner of every rewritten site uses."""
    from ringcompile.options import Options
    from ringcompile.passes.rewrite import spec_for

    site = types.SimpleNamespace(scale=None, mask=None, score=None, dropout_p=0.0, location="x", name="x",
                                 dead_rows=None)
    assert spec_for(site, Options(profile="a100-nvlink")).profile == "a100-nvlink"
    assert spec_for(site, Options()).profile is None


def test_record_timing_in_spec_keeps_records():
    from ringcompile.runtime import timing

    timing.clear()
    q, k, v = _qkv(hq=2, hkv=2)
    ringcompile.ring_attention(q, k, v, is_causal=True, record_timing=True).sum().backward()
    assert [r.phase for r in timing.RECORDS] == ["forward", "backward"]
    assert all(r.strategy == "local" and r.world_size == 1 for r in timing.RECORDS)
    timing.clear()
