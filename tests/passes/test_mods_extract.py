"""Mask/score extraction on traced graphs: every mask form of issue 2 point 4, plus negatives.

Each case traces an attention function, extracts scale/mask/score mods, checks the
classification, and (via ``_mods_harness``) compares against the original function in
float64: full attention output, and keep mask + modified scores on sub-blocks at global
(q_offset, kv_offset) offsets.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _mods_harness import chain_ends, check_attn_mask, check_chain, trace

from ringcompile.errors import UnsupportedPatternError
from ringcompile.passes.mods import extract_score_chain

B, H, S, D = 2, 3, 13, 4
f64 = torch.float64


def qkv(b=B, h=H, s=S, d=D):
    return tuple(torch.randn(b, h, s, d, dtype=f64) for _ in range(3))


def padding_mask(b=B, s=S, dtype=torch.long):
    m = (torch.rand(b, s) > 0.3).to(dtype)
    m[:, 0] = 1  # every query keeps at least key 0 under causal masks
    return m


# ---------------------------------------------------------------------------- causal forms


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_causal_by_triu_ones_masked_fill(mode):
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        m = torch.triu(torch.ones(q.size(2), k.size(2), dtype=torch.bool), 1)
        return s.masked_fill(m, float("-inf")).softmax(-1) @ v

    ex = check_chain(fn, qkv(), mask="causal", mode=mode)
    assert ex.scale == pytest.approx(0.5) and ex.mask.kind == "causal" and ex.mask_extras == []
    assert ex.mask.graph is not None


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_causal_by_tril_buffer_and_finfo_min_where(mode):
    """GPT-2 / nanoGPT: a (1,1,T,T) tril buffer sliced to the sequence, where(mask, s, finfo.min)."""
    bias = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)

    def fn(q, k, v, bias):
        T = q.size(-2)
        s = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        s = torch.where(bias[:, :, :T, :T].bool(), s, torch.finfo(s.dtype).min)
        return F.softmax(s, dim=-1, dtype=torch.float32).type_as(q) @ v

    ex = check_chain(fn, (*qkv(), bias), mask="causal", mode=mode, buffers={3: bias}, atol=1e-6)
    assert ex.mask_extras == []  # the buffer is recognised, not passed
    assert any("assumed constant" in n for n in ex.notes)
    assert any("finfo.min" in n for n in ex.notes)


def test_nanogpt_masked_fill_on_buffer_equal_zero():
    bias = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)

    def fn(q, k, v, bias):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v

    check_chain(fn, (*qkv(), bias), mask="causal", buffers={3: bias})


def test_non_tril_buffer_stays_an_extra():
    """A buffer that is not a band pattern is looked up at the lifted indices (dense)."""
    bias = (torch.rand(1, 1, 16, 16) > 0.3).float()
    bias[..., 0] = 1

    def fn(q, k, v, bias):
        T = q.size(-2)
        att = q @ k.transpose(-2, -1)
        att = att.masked_fill(bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v

    ex = check_chain(fn, (*qkv(), bias), mask="dense", buffers={3: bias})
    assert len(ex.mask_extras) == 1 and ex.scale is None


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_causal_by_arange_comparison_additive(mode):
    """Hugging Face style: kv_idx <= q_idx from aranges, turned into a 0/finfo.min additive mask."""
    def fn(q, k, v):
        qi = torch.arange(q.size(2))
        ki = torch.arange(k.size(2))
        keep = ki[None, :] <= qi[:, None]
        add = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        s = torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5 + add[None, None]
        return s.softmax(-1) @ v

    ex = check_chain(fn, qkv(), mask="causal", mode=mode)
    assert ex.score is None and ex.scale == pytest.approx(0.5)


def test_causal_by_full_min_triu_additive():
    """Llama (transformers 4.3x): full((S,S), min).triu(1) added to the scores."""
    def fn(q, k, v):
        m = torch.full((q.size(2), k.size(2)), torch.finfo(q.dtype).min, dtype=q.dtype)
        m = torch.triu(m, diagonal=1)[None, None].expand(q.size(0), 1, -1, -1)
        s = q @ k.transpose(2, 3) / math.sqrt(D) + m
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    check_chain(fn, qkv(), mask="causal", atol=1e-6)


def test_strictly_causal_is_custom_not_causal():
    """kv < q is not 'causal' (kv <= q): it must not be claimed for block skipping."""
    def fn(q, k, v):
        qi = torch.arange(q.size(2))
        s = q @ k.transpose(-2, -1)
        s = s.masked_fill(~(qi[None, :] < qi[:, None]) & (qi[:, None] > 0), float("-inf"))
        return s.softmax(-1) @ v

    gm = trace(fn, *qkv())
    ex = extract_score_chain(*chain_ends(gm), dims=("b", "h", "q", "kv"))
    assert "causal" not in ex.mask.kind.split("+")


# ---------------------------------------------------------------------------- windows, padding


@pytest.mark.parametrize("w", [1, 3, 5])
def test_sliding_window(w):
    def fn(q, k, v):
        qi = torch.arange(q.size(2))[:, None]
        ki = torch.arange(k.size(2))[None, :]
        keep = (qi - ki < w) & (ki <= qi)
        s = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v

    ex = check_chain(fn, qkv(), mask=f"sliding_window({w})")
    assert ex.mask.kind == "sliding_window" and ex.mask.params["window"] == w
    assert ex.mask.params["causal"] is True


def test_sliding_window_spelled_with_tril_triu():
    """tril(ones) & triu(ones, -(w-1)) is a window of w keys."""
    def fn(q, k, v):
        ones = torch.ones(q.size(2), k.size(2), dtype=torch.bool)
        keep = torch.tril(ones) & torch.triu(ones, -3)
        s = (q @ k.transpose(-2, -1)).masked_fill(keep.logical_not(), float("-inf"))
        return s.softmax(-1) @ v

    check_chain(fn, qkv(), mask="sliding_window(4)")


def test_key_padding_masked_fill():
    def fn(q, k, v, am):
        s = q @ k.transpose(-2, -1) * 0.3
        s = s.masked_fill(am[:, None, None, :] == 0, float("-inf"))
        return s.softmax(-1) @ v

    ex = check_chain(fn, (*qkv(), padding_mask()), mask="padding")
    assert ex.mask.kind == "padding" and len(ex.mask_extras) == 1 and ex.scale == pytest.approx(0.3)


def test_key_padding_hf_additive_one_minus_mask():
    """(1 - m) * finfo.min (HF BERT style) is a mask, not a bias."""
    def fn(q, k, v, am):
        ext = am[:, None, None, :].to(q.dtype)
        ext = (1.0 - ext) * torch.finfo(q.dtype).min
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + ext
        return s.softmax(-1) @ v

    ex = check_chain(fn, (*qkv(), padding_mask()), mask="padding")
    assert ex.score is None


def test_causal_and_padding_hf_inverted_mask():
    """HF 4.x _prepare_4d: causal & padding expanded, inverted, masked_fill(inv.bool(), min)."""
    def fn(q, k, v, am):
        qi = torch.arange(q.size(2))
        causal = (qi[None, :] <= qi[:, None])[None, None]
        expanded = am[:, None, None, :].expand(q.size(0), 1, q.size(2), k.size(2)).to(q.dtype)
        expanded = expanded * causal.to(q.dtype)
        inverted = 1.0 - expanded
        add = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(q.dtype).min)
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D) + add
        return s.softmax(-1) @ v

    ex = check_chain(fn, (*qkv(), padding_mask()), mask="causal & padding")
    assert ex.mask.kind == "causal+padding"


def test_bool_padding_and_causal_where():
    def fn(q, k, v, am):
        qi = torch.arange(q.size(2))
        keep = (qi[None, :] <= qi[:, None]) & am[:, None, None, :]
        s = torch.where(keep, q @ k.transpose(-2, -1), float("-inf"))
        return s.softmax(-1) @ v

    ex = check_chain(fn, (*qkv(), padding_mask(dtype=torch.bool)), mask="causal & padding")
    assert len(ex.mask_extras) == 1


# ---------------------------------------------------------------------------- biases and scores


def test_arbitrary_additive_bias_tensor():
    def fn(q, k, v, bias):
        return (q @ k.transpose(-2, -1) * 0.5 + bias).softmax(-1) @ v

    bias = torch.randn(B, H, S, S, dtype=f64)
    ex = check_chain(fn, (*qkv(), bias), mask="none", score="dense bias")
    assert ex.score.kind == "bias" and ex.score_extras and ex.mask is None


def test_broadcast_bias_per_head():
    def fn(q, k, v, bias):
        return (q @ k.transpose(-2, -1) + bias[None]).softmax(-1) @ v

    check_chain(fn, (*qkv(), torch.randn(H, S, S, dtype=f64)), mask="none", score="dense bias")


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_alibi_from_slopes_and_positions(mode):
    def fn(q, k, v, slopes):
        pos = torch.arange(k.size(2))
        rel = pos[None, :] - pos[:, None]                 # kv - q
        bias = slopes[:, None, None] * rel[None].to(q.dtype)
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias[None]
        causal = torch.triu(torch.ones(q.size(2), k.size(2), dtype=torch.bool), 1)
        return s.masked_fill(causal, float("-inf")).softmax(-1) @ v

    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], dtype=f64)
    ex = check_chain(fn, (*qkv(), slopes), mask="causal", score="alibi", mode=mode)
    assert ex.score.kind == "alibi" and len(ex.score_extras) == 1


def test_softcap_before_causal_mask():
    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * D ** -0.5
        s = s / 2.5
        s = torch.tanh(s)
        s = s * 2.5
        causal = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
        return s.masked_fill(causal, float("-inf")).softmax(-1) @ v

    ex = check_chain(fn, qkv(), mask="causal", score="softcap(2.5)")
    assert ex.score.kind == "softcap" and ex.score.params["cap"] == 2.5
    assert ex.scale == pytest.approx(D ** -0.5)


def test_softcap_after_bias_then_additive_mask():
    def fn(q, k, v, bias):
        s = q @ k.transpose(-2, -1) * 0.5 + bias
        s = torch.tanh(s / 3.0) * 3.0
        m = torch.full((S, S), float("-inf"), dtype=q.dtype).triu(1)
        return (s + m).softmax(-1) @ v

    ex = check_chain(fn, (*qkv(), torch.randn(1, H, S, S, dtype=f64)), mask="causal",
                     score="dense bias then softcap(3)")
    assert ex.score.kind == "bias+softcap"


def test_three_d_bmm_with_causal_mask():
    """(B*H, S, D) attention through bmm: dims (b, q, kv) with b the flattened index."""
    def fn(q, k, v):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.25
        m = torch.ones(q.size(1), k.size(1), dtype=torch.bool).tril()
        s = s.masked_fill(~m[None], float("-inf"))
        return torch.bmm(s.softmax(-1), v)

    q, k, v = (torch.randn(B * H, S, D, dtype=f64) for _ in range(3))
    check_chain(fn, (q, k, v), mask="causal", dims=("b", "q", "kv"), to4d=lambda t: t.unsqueeze(1))


def test_baddbmm_bias_passed_as_additive():
    bias = torch.randn(B * H, S, S, dtype=f64)

    def fn(q, k, v, bias):
        s = torch.baddbmm(bias, q, k.transpose(1, 2))
        return torch.bmm(s.softmax(-1), v)

    q, k, v = (torch.randn(B * H, S, D, dtype=f64) for _ in range(3))
    gm = trace(fn, q, k, v, bias)
    bad = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.baddbmm.default)
    bias_node = bad.args[0]
    ex = extract_score_chain(bad, bad, dims=("b", "q", "kv"), additive=[bias_node])
    assert ex.score.describe() == "dense bias" and ex.score_extras == [bias_node]
    raw = torch.bmm(q, k.transpose(1, 2))
    got = ex.score(raw.unsqueeze(1), *_grid3(B * H, S), bias)
    torch.testing.assert_close(got.squeeze(1), raw + bias)


def _grid3(n, s):
    from ringcompile.mods import index_grid

    return index_grid(n, 1, 0, s, 0, s)


# ---------------------------------------------------------------------------- SDPA attn_mask


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_sdpa_bool_mask_causal_and_padding(mode):
    def mask_fn(am, anchor):
        qi = torch.arange(anchor.size(-1))
        return (qi[None, :] <= qi[:, None])[None, None] & am[:, None, None, :].bool()

    ex = check_attn_mask(mask_fn, (padding_mask(), torch.zeros(S)), B, H, S, mask="causal & padding",
                         mode=mode)
    assert len(ex.mask_extras) == 1


def test_sdpa_additive_causal_mask():
    def mask_fn(anchor):
        m = torch.full((anchor.size(-1), anchor.size(-1)), float("-inf"), dtype=f64)
        return torch.triu(m, 1)[None, None]

    check_attn_mask(mask_fn, (torch.zeros(S),), B, H, S, mask="causal")


def test_sdpa_additive_float_bias_is_a_score_mod():
    ex = check_attn_mask(lambda bias: bias * 1.0, (torch.randn(B, 1, S, S, dtype=f64),), B, H, S,
                         mask="none", score="dense bias")
    assert len(ex.score_extras) == 1 and ex.mask is None


def test_sdpa_additive_mask_plus_alibi():
    """A float mask that sums a 0/-inf causal part and an ALiBi bias splits into both mods."""
    def mask_fn(slopes, anchor):
        n = anchor.size(-1)
        pos = torch.arange(n)
        alibi = slopes[:, None, None] * (pos[None, :] - pos[:, None]).to(f64)[None]
        causal = torch.zeros(n, n, dtype=f64).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        return alibi[None] + causal

    slopes = torch.rand(H, dtype=f64)
    check_attn_mask(mask_fn, (slopes, torch.zeros(S)), B, H, S, mask="causal", score="alibi")


# ---------------------------------------------------------------------------- negatives


def test_reshape_merging_sequence_dim_is_dense_with_reason():
    def fn(q, k, v):
        n = q.size(2)
        keep = (torch.arange(n * n) % 3 != 1).view(n, n)  # not a function of (q, kv) we can lift
        keep = keep | torch.eye(n, dtype=torch.bool)
        s = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v

    ex = check_chain(fn, qkv(), mask="dense")
    assert any("reshape" in n for n in ex.notes), ex.notes
    assert len(ex.mask_extras) == 1


def test_non_pointwise_chain_op_is_unsupported():
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1)
        s = torch.cumsum(s, -1)
        return s.softmax(-1) @ v

    gm = trace(fn, *qkv())
    with pytest.raises(UnsupportedPatternError, match="not a pointwise op"):
        extract_score_chain(*chain_ends(gm), dims=("b", "h", "q", "kv"))


def test_score_used_twice_is_unsupported():
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1)
        s = s - s.amax(-1, keepdim=True)
        return s.softmax(-1) @ v

    gm = trace(fn, *qkv())
    with pytest.raises(UnsupportedPatternError):
        extract_score_chain(*chain_ends(gm), dims=("b", "h", "q", "kv"))


def test_nonlinear_op_after_mask_is_unsupported():
    """tanh after -inf masking turns masked scores into -1: cannot split into mask + score mod."""
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1)
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        return torch.tanh(s).softmax(-1) @ v

    gm = trace(fn, *qkv())
    with pytest.raises(UnsupportedPatternError, match="after masking"):
        extract_score_chain(*chain_ends(gm), dims=("b", "h", "q", "kv"))


def test_bad_dims_rejected():
    gm = trace(lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v, *qkv())
    with pytest.raises(UnsupportedPatternError):
        extract_score_chain(*chain_ends(gm), dims=("b", "kv", "q"))


def test_plain_chain_has_no_mods():
    def fn(q, k, v):
        return (q @ k.transpose(-2, -1)).float().softmax(-1).type_as(q) @ v

    ex = check_chain(fn, qkv(), mask="none", atol=1e-5)  # .float() rounds the original to fp32
    assert ex.scale is None and ex.mask is None and ex.score is None


def test_consumed_is_what_the_rewrite_makes_dead():
    """Mask nodes used only by this chain are consumed; a mask shared with another attention is not."""
    def fn(q, k, v):
        m = torch.triu(torch.ones(q.size(2), k.size(2), dtype=torch.bool), 1)
        a = (q @ k.transpose(-2, -1)).masked_fill(m, float("-inf")).softmax(-1) @ v
        own = torch.ones(q.size(2), k.size(2), dtype=torch.bool).tril()
        b = (a @ k.transpose(-2, -1)).masked_fill(m, float("-inf")).masked_fill(~own, float("-inf"))
        return b.softmax(-1) @ v

    gm = trace(fn, *qkv())
    sms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.softmax.int]
    mms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.matmul.default]
    ex = extract_score_chain(mms[2], sms[1].args[0], dims=("b", "h", "q", "kv"))
    assert ex.mask.describe() == "causal"
    names = {n.target.__name__.split(".")[0] for n in ex.consumed}
    shared = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.triu.default)
    assert shared not in ex.consumed                      # also used by the first attention
    assert {"tril", "bitwise_not", "masked_fill"} <= names  # this chain's own mask and chain nodes
    assert sms[1].args[0] in ex.consumed


def test_relative_position_bias_lookup_through_index():
    """A bias table indexed by clamped relative positions (T5-like) is lifted through aten.index."""
    table = torch.randn(9, H, dtype=f64)

    def fn(q, k, v, table):
        pos = torch.arange(q.size(2))
        rel = (pos[None, :] - pos[:, None]).clamp(-4, 4) + 4
        bias = table[rel].permute(2, 0, 1)  # (H, S, S)
        return (q @ k.transpose(-2, -1) + bias[None]).softmax(-1) @ v

    ex = check_chain(fn, (*qkv(), table), mask="none", score="dense bias")
    assert ex.score_extras[0].op == "placeholder"  # the (9, H) table, not an S x S tensor


def test_trainable_scalar_parameter_is_not_baked_in():
    """A 0-dim parameter scaling the scores stays a runtime input (its value changes in training)."""
    temp = torch.nn.Parameter(torch.tensor(0.7, dtype=f64))

    def fn(q, k, v, t):
        return ((q @ k.transpose(-2, -1)) * t).softmax(-1) @ v

    gm = trace(fn, *qkv(), temp.detach(), buffers={3: temp})
    ex = extract_score_chain(*chain_ends(gm), dims=("b", "h", "q", "kv"))
    assert ex.scale is None and ex.score is not None and len(ex.score_extras) == 1


def test_batch_head_split_reshape_is_lifted():
    """Falcon/Bloom-style ALiBi: a (B*H, 1, S) tensor viewed as (B, H, 1, S) is indexed, not dense."""
    def fn(q, k, v, alibi_flat):
        s = q @ k.transpose(-2, -1) + alibi_flat.view(q.size(0), q.size(1), 1, -1)
        return s.softmax(-1) @ v

    alibi_flat = torch.randn(B * H, 1, S, dtype=f64)
    ex = check_chain(fn, (*qkv(), alibi_flat), mask="none", score="custom bias")
    assert ex.score_extras[0].op == "placeholder" and not any("dense" in n for n in ex.notes)


def test_three_d_mask_merged_from_four_d():
    """A (B, H, S, S) mask reshaped to (B*H, S, S) for a 3-D bmm attention."""
    def fn(q, k, v, am):
        n = q.size(1)
        qi = torch.arange(n)
        keep = (qi[None, :] <= qi[:, None])[None, None] & am[:, None, None, :].bool()
        keep = keep.expand(B, H, n, n).reshape(B * H, n, n)
        s = torch.bmm(q, k.transpose(1, 2)).masked_fill(~keep, float("-inf"))
        return torch.bmm(s.softmax(-1), v)

    q, k, v = (torch.randn(B * H, S, D, dtype=f64) for _ in range(3))
    ex = check_chain(fn, (q, k, v, padding_mask()), mask="causal & padding", dims=("b", "q", "kv"),
                     to4d=lambda t: t.unsqueeze(1))
    assert len(ex.mask_extras) == 1


def test_chain_through_batch_head_view_bloom_style():
    """baddbmm on (B*H, S, S), viewed to (B, H, S, S), + a 4-D additive causal mask, softmax."""
    def fn(q, k, v, alibi, am):
        n = q.size(1)
        s = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.5)
        s = s.view(B, H, n, n)
        qi = torch.arange(n)
        keep = (qi[None, :] <= qi[:, None])[None, None] & am[:, None, None, :].bool()
        s = s + torch.zeros(B, 1, n, n, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        p = F.softmax(s, dim=-1).view(B * H, n, n)
        return torch.bmm(p, v)

    q, k, v = (torch.randn(B * H, S, D, dtype=f64) for _ in range(3))
    alibi = torch.randn(B * H, 1, S, dtype=f64)
    args = (q, k, v, alibi, padding_mask())
    gm = trace(fn, *args)
    bad = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.baddbmm.default)
    sm = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.softmax.int)
    # discovery's view: the raw score is the baddbmm (alpha 0.5 is the op's scale), the bias additive
    ex = extract_score_chain(bad, sm.args[0], dims=("b", "q", "kv"), additive=[bad.args[0]])
    assert ex.mask.describe() == "causal & padding" and ex.score.describe() == "custom bias"
    from _mods_harness import node_values

    vals = node_values(gm, args, [sm.args[0], *ex.mask_extras, *ex.score_extras])
    raw = (torch.bmm(q, k.transpose(1, 2)) * 0.5).unsqueeze(1)
    from ringcompile.mods import evaluate_mask, index_grid

    grid = index_grid(B * H, 1, 0, S, 0, S)
    keep = evaluate_mask(ex.mask, grid, [vals[n] for n in ex.mask_extras]).expand(B * H, 1, S, S)
    orig = vals[sm.args[0]].reshape(B * H, 1, S, S)
    assert torch.equal(keep, orig > -1e4)
    got = ex.score(raw, *grid, *[vals[n] for n in ex.score_extras])
    torch.testing.assert_close(got[keep], orig[keep])


def test_lookups_tolerate_padded_positions():
    """A runtime that pads S evaluates mods at q/kv >= S: lookups must not fail there, and
    in-range values are unchanged."""
    def fn(q, k, v, am, bias):
        s = (q @ k.transpose(-2, -1) + bias).masked_fill(am[:, None, None, :] == 0, float("-inf"))
        return s.softmax(-1) @ v

    bias = torch.randn(B, H, S, S, dtype=f64)
    am = padding_mask()
    ex = check_chain(fn, (*qkv(), am, bias), mask="padding", score="dense bias")
    from ringcompile.mods import evaluate_mask, index_grid

    grid = index_grid(B, H, S - 3, 6, S - 4, 8)  # runs past the end on both axes
    keep = evaluate_mask(ex.mask, grid, [am]).expand(B, H, 6, 8)
    assert torch.equal(keep[:, :, :, :4], (am[:, None, None, S - 4:] != 0).expand(B, H, 6, 4))
    s = torch.randn(B, H, 6, 8, dtype=f64)
    got = ex.score(s, *grid, bias)
    torch.testing.assert_close(got[:, :, :3, :4], s[:, :, :3, :4] + bias[:, :, S - 3:, S - 4:])


def test_additive_that_does_not_broadcast_to_the_score_is_rejected():
    """A (B*H, 1, S) baddbmm bias passed against a (B, H, S, S) score would be mis-indexed."""
    def fn(q, k, v, alibi):
        s = torch.baddbmm(alibi, q, k.transpose(1, 2)).view(B, H, S, S)
        return torch.bmm(s.softmax(-1).view(B * H, S, S), v)

    q, k, v = (torch.randn(B * H, S, D, dtype=f64) for _ in range(3))
    gm = trace(fn, q, k, v, torch.randn(B * H, 1, S, dtype=f64))
    bad = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.baddbmm.default)
    view = next(iter(bad.users))
    with pytest.raises(UnsupportedPatternError, match="does not broadcast"):
        extract_score_chain(view, view, dims=("b", "h", "q", "kv"), additive=[bad.args[0]])


def test_where_mixing_a_bool_constant_and_numbers_keeps_numeric_meaning():
    """where(c, True, int_tensor) promotes to int in PyTorch; it must not become c | (~c & x)."""
    def fn(q, k, v, pos_bias):
        n = q.size(2)
        qi = torch.arange(n)
        ones = torch.ones(n, n, dtype=torch.bool)
        b = torch.where(qi[:, None] > qi[None, :], ones, pos_bias)  # True -> 1 where q > kv
        return (q @ k.transpose(-2, -1) + b.to(q.dtype)).softmax(-1) @ v

    pos_bias = torch.randint(2, 6, (S, S))
    check_chain(fn, (*qkv(), pos_bias), mask="none", score="custom bias")
