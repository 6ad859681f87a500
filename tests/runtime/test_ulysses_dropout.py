"""Attention dropout under strategy "ulysses" (and the flat strategies beside it): after the
all-to-all rank r holds query heads [r * H/N, (r+1) * H/N), and its kernels shift the dropout hash by
that offset, so the simulated world drops exactly what one process, the ring, allgather, zigzag and a
float64 reference with the same keep mask drop; then the same on spawned gloo ranks."""

import pytest
import torch

from ringcompile import mods
from ringcompile.kernels import dropout
from ringcompile.runtime.simulated import simulated_ring_attention
from ringcompile.runtime.user_spec import build_spec

P = 0.3


def _qkv(hq: int, hkv: int, S: int, seed: int, B: int = 2, D: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g, dtype=torch.float64).requires_grad_(True)
            for h in (hq, hkv, hkv)]


def dropout_attention64(q, k, v, causal: bool, seed: int, p: float):
    """Eager float64 attention on the unsharded input with the keep mask of ``kernels.dropout``
    computed on the full (B, Hq, S, S) grid of global indices."""
    B, hq, S, D = q.shape
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-2, -1) * D ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    keep = dropout.keep_mask(seed, *mods.index_grid(B, hq, 0, S, 0, S), p)
    return (torch.softmax(scores, -1) * keep.double() / (1 - p)) @ v


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("heads", [(4, 4), (8, 4)], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask", ["none", "causal"])
def test_ulysses_dropout_equals_world_one_the_ring_and_float64(world, heads, mask):
    """Ulysses, and every flat strategy beside it (ring, allgather, zigzag when causal), drop exactly
    the entries one process and float64 with the keep mask on the full grid drop; gradients too."""
    causal = mask == "causal"
    layout = "zigzag" if causal else "contiguous"
    S = 4 * world + 3  # not divisible: the padded tail is masked
    q, k, v = _qkv(*heads, S, seed=world * 10 + heads[0] + causal)
    kw = dict(is_causal=causal, enable_gqa=True, dropout_p=P, dropout_seed=2468)
    out = simulated_ring_attention(q, k, v, world_size=world, strategy="ulysses", layout=layout, **kw)
    one = simulated_ring_attention(q, k, v, world_size=1, strategy="local", **kw)
    flat = [simulated_ring_attention(q, k, v, world_size=world, strategy=name, layout=layout, **kw)
            for name in ("ring", "allgather", *(("zigzag",) if causal else ()))]
    ref = dropout_attention64(q, k, v, causal, 2468, P)
    plain = simulated_ring_attention(q, k, v, world_size=world, strategy="ulysses", layout=layout,
                                     is_causal=causal, enable_gqa=True)
    assert not torch.allclose(out, plain)  # dropout did something
    for other in (one, *flat, ref):
        torch.testing.assert_close(out, other, atol=1e-9, rtol=1e-9)
    dout = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(world))
    got = torch.autograd.grad(out, [q, k, v], dout)
    for other in (one, *flat, ref):
        for a, b in zip(got, torch.autograd.grad(other, [q, k, v], dout), strict=True):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_ulysses_dropout_with_another_seed_drops_other_entries():
    q, k, v = _qkv(4, 2, 12, seed=5)
    a, b = (simulated_ring_attention(q, k, v, world_size=2, strategy="ulysses", is_causal=True,
                                     layout="zigzag", enable_gqa=True, dropout_p=P, dropout_seed=seed)
            for seed in (1, 2))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, dropout_attention64(q, k, v, True, 2, P), atol=1e-9, rtol=1e-9)


def test_ulysses_dropout_with_mods_on_global_heads():
    """ALiBi (per-head slopes, learnable) and dropout together: both see global heads."""
    from attention_cases import attention_case

    from ringcompile.kernels.reference import attention_reference

    (q, k, v), m, s, me, se = attention_case("alibi", 1, 4, 2, 11, 4, 3)
    kw = dict(mask=m, score=s, mask_extras=me, score_extras=se, dropout_p=P, dropout_seed=7)
    out = simulated_ring_attention(q, k, v, world_size=2, strategy="ulysses", layout="zigzag",
                                   enable_gqa=True, **kw)
    ref = attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    wrt = [q, k, v, *se]
    dout = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(ref, wrt, dout), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_auto_ranks_ulysses_under_dropout(monkeypatch):
    """Dropout no longer takes ulysses out of "auto"'s candidates (heads must still divide by N)."""
    import ringcompile.cost_model.planner as planner
    from ringcompile.runtime.choice import choose_strategy

    seen = []

    def fake(**kw):
        seen.append(kw["strategies"])
        return type("Plan", (), {"strategy": "ulysses"})()

    monkeypatch.setattr(planner, "choose_for_call", fake)
    q, k, v = (torch.randn(1, h, 8, 4) for h in (8, 4, 4))
    spec = build_spec(is_causal=True).replace(dropout_p=0.1)
    assert choose_strategy(q, k, v, 32, 4, spec, "zigzag") == "ulysses"
    assert seen[-1] == ("zigzag", "ulysses")
    q3, k3, v3 = (torch.randn(1, h, 8, 4) for h in (6, 3, 3))
    assert choose_strategy(q3, k3, v3, 32, 4, spec, "zigzag") == "zigzag"


def test_auto_offers_head_group_strategies_under_dropout_on_cuda():
    """Every kernel set (Triton's included) hashes a head group's global heads, so dropout no longer takes
    ulysses and hybrid out of "auto"'s candidates on CUDA; heads must still divide."""
    import types

    from ringcompile.runtime.choice import _auto_candidates

    def cands(device, spec, hq=8):
        q, k = (types.SimpleNamespace(shape=(1, h, 8, 4), device=torch.device(device)) for h in (hq, 4))
        return _auto_candidates(q, k, 4, spec, "zigzag", (2, 2))

    drop = build_spec(is_causal=True).replace(dropout_p=0.1)
    for device in ("cuda", "cpu"):
        assert cands(device, drop) == ("zigzag", "ulysses", "hybrid-2x2")
        assert cands(device, drop.replace(dropout_p=0.0)) == ("zigzag", "ulysses", "hybrid-2x2")
    assert cands("cuda", drop, hq=6) == ("zigzag", "hybrid-2x2")  # 6 heads split over a node of 2, not 4


@pytest.mark.multirank
def test_gloo_ranks_drop_what_one_process_drops_under_ring_ulysses_allgather_and_hybrid():
    """One spawn of 4 gloo ranks, through the op with a seed (as the backend calls it), fwd+bwd, against
    float64 with the same keep mask and each other: two 2-rank groups run ring, ulysses and allgather
    (MHA, GQA); the 2 x 2 DeviceMesh runs hybrid, ulysses and ring (MHA, GQA); causal on zigzag shards
    and none on contiguous ones."""
    import dropout_bodies
    from ring_harness import run_ranks

    results = run_ranks(dropout_bodies.dropout_body, 4, 150.0, 11)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:40])
