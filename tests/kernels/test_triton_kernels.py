"""Generated Triton block kernels (run by the Triton interpreter on CPU) against float64 block math.

Shapes are tiny: the interpreter runs every tile in numpy. Tiles are 16x16 there, so the
lengths below (20, 37, ...) are deliberately not multiples of the tile.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_support import assert_close, compare_block, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.kernels import reference
from ringcompile.kernels.triton import triton_block_kernels
from ringcompile.spec import AttentionSpec


def kernels_for(mask=None, score=None):
    k = triton_block_kernels(AttentionSpec(mask=mask, score=score, kernel="triton"), forced=True)
    assert k is not None and k.name == "triton"
    return k


def qkv(B, Hq, Hkv, Sq, Sk, D, seed, dtype=torch.float32, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv or D, generator=g).to(dtype)
    return q, k, v, g


# name: (mask, score, extras builder, Hq, Hkv, D, Sq, Sk, q_offset, kv_offset, seq_len)
CASES = {
    "no_mask_d32": (None, None, None, 2, 2, 32, 20, 37, 0, 0, 37),
    "causal_diagonal_d64": (mods.causal(), None, None, 2, 2, 64, 24, 24, 24, 24, 48),
    "causal_ring_step_gqa4": (mods.causal(), None, None, 4, 1, 32, 19, 21, 40, 13, 61),
    "causal_block_fully_masked": (mods.causal(), None, None, 2, 1, 32, 17, 17, 0, 17, 34),
    "sliding_window_d128": (mods.sliding_window(5), None, None, 2, 2, 128, 18, 21, 30, 20, 41),
    "sliding_window_two_sided": (mods.sliding_window(6, is_causal=False), None, None,
                                 2, 2, 32, 17, 33, 8, 0, 33),
    "key_padding_tail": (mods.key_padding(), None, "padding", 2, 2, 32, 18, 20, 0, 30, 45),
    "alibi_gqa4": (None, mods.alibi(), "alibi", 4, 1, 32, 20, 23, 23, 0, 43),
    "softcap_causal_mqa": (mods.causal(), mods.softcap(2.0), None, 4, 1, 64, 20, 20, 5, 0, 25),
    "padding_causal_alibi_softcap": (mods.and_masks(mods.causal(), mods.key_padding()),
                                     mods.compose_scores(mods.alibi(), mods.softcap(3.0)), "padding+alibi",
                                     4, 2, 40, 20, 37, 30, 5, 40),
}


def extras_for(kind, B, Hq, total, g):
    me, se = [], []
    if kind and "padding" in kind:
        keep = torch.rand(B, total, generator=g) > 0.3
        me.append(keep)
    if kind and "alibi" in kind:
        se.append(torch.rand(Hq, generator=g) + 0.1)
    return me, se


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_matches_float64_reference(name):
    mask, score, extras, Hq, Hkv, D, Sq, Sk, q_off, kv_off, seq_len = CASES[name]
    q, k, v, g = qkv(1, Hq, Hkv, Sq, Sk, D, seed=len(name))
    me, se = extras_for(extras, 1, Hq, max(q_off + Sq, kv_off + Sk), g)
    compare_block(kernels_for(mask, score), q, k, v, tol=2e-5, scale=D ** -0.5, q_offset=q_off,
                  kv_offset=kv_off, seq_len=seq_len, mask=mask, score=score, mask_extras=me, score_extras=se)


def test_fully_masked_block_gives_zero_and_minus_inf():
    q, k, v, _ = qkv(1, 2, 1, 17, 17, 32, seed=3)
    out, lse = kernels_for(mods.causal()).forward(q, k, v, scale=0.2, q_offset=0, kv_offset=17, seq_len=34,
                                                  mask=mods.causal())
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_bfloat16_inputs_and_value_head_dim():
    mask = mods.causal()
    q, k, v, _ = qkv(2, 2, 2, 20, 20, 32, seed=5, dtype=torch.bfloat16, Dv=16)
    compare_block(kernels_for(mask), q, k, v, tol=3e-2, scale=32 ** -0.5, q_offset=10, kv_offset=0,
                  seq_len=30, mask=mask)


def test_float64_inputs_keep_float64():
    q, k, v, _ = qkv(1, 2, 1, 9, 11, 16, seed=6, dtype=torch.float64)
    out, lse = kernels_for().forward(q, k, v, scale=0.3, seq_len=11)
    ref_out, ref_lse = reference.block_forward(q, k, v, scale=0.3, seq_len=11)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close(out, ref_out, 1e-10, "out")
    assert_close(lse, ref_lse, 1e-10, "lse")


def test_ring_of_blocks_equals_full_attention_and_its_gradients():
    """Two 'ranks' x two kv blocks merged by lse, then the block backward with the final out/lse,
    equal float64 eager attention on the whole sequence and autograd's gradients."""
    mask = mods.and_masks(mods.causal(), mods.key_padding())
    score = mods.softcap(4.0)
    B, Hq, Hkv, S, D = 1, 4, 2, 30, 32
    q, k, v, g = qkv(B, Hq, Hkv, S, S, D, seed=11)
    key_mask = torch.rand(B, S, generator=g) > 0.25
    key_mask[:, 0] = True
    kern = kernels_for(mask, score)
    chunks = [(0, 13), (13, S)]
    kw = dict(scale=0.2, seq_len=S, mask=mask, score=score, mask_extras=[key_mask])
    finals = []
    for qs, qe in chunks:
        out = lse = None
        for ks, ke in chunks:
            o, l_ = kern.forward(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], q_offset=qs, kv_offset=ks,
                                 **kw)
            out, lse = reference.merge_partials(out, lse, o, l_)
        finals.append((out, lse))
    out = torch.cat([o for o, _ in finals], dim=2)
    lse = torch.cat([l_ for _, l_ in finals], dim=2)

    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = reference.attention_reference(q64, k64, v64, scale=0.2, mask=mask, score=score,
                                        mask_extras=[key_mask])
    assert_close(out, ref.detach(), 2e-5, "out")
    dout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), dout)

    dq, dk, dv = torch.zeros_like(rq), torch.zeros_like(rk), torch.zeros_like(rv)
    for qs, qe in chunks:
        for ks, ke in chunks:
            gq, gk, gv, _ = kern.backward(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], out[:, :, qs:qe],
                                          dout[:, :, qs:qe].float(), lse[:, :, qs:qe], q_offset=qs,
                                          kv_offset=ks, **kw)
            dq[:, :, qs:qe] += gq
            dk[:, :, ks:ke] += gk
            dv[:, :, ks:ke] += gv
    assert_close(dq, rq, 5e-5, "dq")
    assert_close(dk, rk, 5e-5, "dk")
    assert_close(dv, rv, 5e-5, "dv")


def test_non_contiguous_inputs_use_their_strides():
    mask = mods.sliding_window(4)
    g = torch.Generator().manual_seed(8)
    # (B, S, H, D) storage viewed as (B, H, S, D): the "bshd" layout
    q = torch.randn(1, 18, 2, 32, generator=g).transpose(1, 2)
    k = torch.randn(1, 19, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(1, 19, 2, 32, generator=g).transpose(1, 2)
    compare_block(kernels_for(mask), q, k, v, tol=2e-5, scale=0.18, q_offset=3, kv_offset=0, seq_len=19,
                  mask=mask)


def test_dropout_drops_the_same_entries_as_the_cpu_hash():
    """Dropout in the kernels uses the global-index hash of kernels/dropout.py: the same entries are
    dropped as in the float64 block path, forward and backward (a different mask is an O(1) error)."""
    mask, score = mods.causal(), mods.alibi()
    q, k, v, g = qkv(2, 4, 2, 20, 23, 16, seed=12)
    slopes = torch.rand(4, generator=g)
    kernels = kernels_for(mask, score)
    for seed in (3, 2**40 + 12345):
        kw = dict(scale=0.3, q_offset=17, kv_offset=5, seq_len=40, mask=mask, score=score, dropout_p=0.3,
                  dropout_seed=torch.tensor([seed]))
        out, lse = kernels.forward(q, k, v, score_extras=[slopes], **kw)
        ref_out, ref_lse = reference.block_forward(q.double(), k.double(), v.double(),
                                                   score_extras=[slopes.double()], **kw)
        assert_close(out, ref_out, 2e-5, "out")
        assert_close(lse, ref_lse, 2e-5, "lse")
        dout = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
        grads = kernels.backward(q, k, v, ref_out.float(), dout.float(), ref_lse.float(),
                                 score_extras=[slopes], **kw)
        ref = reference.block_backward(q.double(), k.double(), v.double(), ref_out, dout, ref_lse,
                                       score_extras=[slopes.double()], **kw)
        for got, want, name in zip(grads[:3], ref[:3], ("dq", "dk", "dv"), strict=True):
            assert_close(got, want, 2e-5, name)
        assert_close(grads[3][0], ref[3][0], 2e-4, "d_slopes")


def test_mod_graph_from_discovery_is_used_when_present():
    """A Mod's ``graph`` (what mod extraction attaches) is lowered instead of tracing ``fn``: here
    ``fn`` branches on data, so only its graph can be lowered."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ringcompile.kernels.triton.lower_mods import example_grid

    def fn(b, h, q, kv, key_mask):
        return (kv <= q) & key_mask[b, kv] if bool((q >= 0).all()) else kv > q

    graph = make_fx(lambda b, h, q, kv, m: (kv <= q) & m[b, kv], tracing_mode="fake")(
        *example_grid(), torch.ones(2, 8, dtype=torch.bool))
    mask = mods.Mod(fn, True, "custom", n_extras=1, description="traced elsewhere", graph=graph)
    q, k, v, g = qkv(2, 2, 1, 18, 21, 16, seed=14)
    key_mask = torch.rand(2, 40, generator=g) > 0.3
    compare_block(kernels_for(mask), q, k, v, tol=2e-5, scale=0.25, q_offset=19, kv_offset=0, seq_len=21,
                  mask=mask, mask_extras=[key_mask])


def test_loop_invariant_extra_gradients_are_added_once_after_the_kv_loop():
    """The dQ kernel sums the gradient of an extra looked up by head (ALiBi slopes) or by query (a
    per-query bias) over its kv tiles in registers and adds it once per program (an atomic per kv
    tile cost the fp32 kernel every spill-free tile); gradients still equal float64 autograd over
    several kv tiles (37 keys = 3 interpreter tiles), and an extra indexed by kv keeps its per-tile add.
    fp32 only: 16-bit kernels keep per-tile adds."""
    def qbias(score, b, h, q, kv, bias):
        return score + bias[h, q]

    def kbias(score, b, h, q, kv, bias):
        return score + bias[h, kv]

    q_mod = mods.Mod(qbias, False, "custom", n_extras=1, description="per-query bias")
    k_mod = mods.Mod(kbias, False, "custom", n_extras=1, description="per-key bias")
    for score, extra, hoisted in ((q_mod, lambda g: torch.randn(2, 64, generator=g), True),
                                  (k_mod, lambda g: torch.randn(2, 64, generator=g), False),
                                  (mods.alibi(), lambda g: torch.rand(2, generator=g), True)):
        q, k, v, g = qkv(2, 2, 1, 20, 37, 16, seed=21)
        se = [extra(g)]
        compare_block(kernels_for(mods.causal(), score), q, k, v, tol=5e-5, scale=0.3, q_offset=30,
                      kv_offset=0, seq_len=37, mask=mods.causal(), score=score, score_extras=se)
        assert dq_atomic_adds(score, se, torch.float32) == ((0, 1) if hoisted else (1, 0)), score.description
        # 16-bit tiles keep the per-tile add (codegen.hoist_extra_grads: measured to fit better there)
        assert dq_atomic_adds(score, se, torch.bfloat16) == (1, 0), score.description


def dq_atomic_adds(score, score_extras, dtype) -> tuple[int, int]:
    """(atomic adds inside the dQ kernel's kv loop, after it) in the generated source."""
    from ringcompile.kernels.triton.codegen import specialise

    src = specialise(mods.causal(), score, head_dim=16, v_head_dim=16, dtype=dtype, groups=2,
                     mask_extras=[], score_extras=score_extras).source
    dq = src[src.index("def block_bwd_dq"):]
    lines = dq.split("    for start_n in range(kv_start")[1].split("dq * sm_scale")[0].splitlines()
    return (sum(ln.startswith("        tl.atomic_add(") for ln in lines),
            sum(ln.startswith("    tl.atomic_add(") for ln in lines))
