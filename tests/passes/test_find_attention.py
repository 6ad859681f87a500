"""Each attention form the backend must find: compiled with backend="ring" vs float64 eager.

Every test checks three things: the compiled function equals the float64 eager function on fresh
random inputs, the backend's graph really holds a ring_attention call (so the result came from
the rewrite), and ``explain()`` describes the site (pattern, mask, GQA groups) correctly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ringcompile
from ringcompile import backend
from ringcompile.runtime import local

B, H, S, D = 2, 4, 24, 8


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(local, "DEFAULT_BLOCK", 8)  # several blocks per sequence
    yield
    torch._dynamo.reset()


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def run_and_check(fn, *args, pattern=None, mask="none", score="none", groups=1, inner="eager",
                  atol=2e-5, sites=1):
    """Compile ``fn`` with the ring backend, compare with float64 eager, and check explain()."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="ring", options={"inner": inner})
    out = compiled(*args)
    entry = backend.HISTORY[-1]
    assert entry.fallback_reason is None, entry.fallback_reason
    assert sum(s.rewritten for s in entry.sites) == sites, (entry.sites, entry.rejected)
    if inner == "eager":
        assert backend.rewritten_op_count(entry.graph) == sites
    ref = fn(*[a.double() if a.is_floating_point() else a for a in args])
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    report = ringcompile.explain(fn, *args)
    assert len(report.sites) == sites, report
    site = report.sites[0]
    assert site.rewritten, report
    if pattern is not None:
        assert site.pattern == pattern, report
    assert site.mask == mask, report
    assert site.score_mod == score, report
    assert site.gqa_groups == groups, report
    return report


# ---------------------------------------------------------------------------- SDPA


def test_sdpa_plain():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)
    run_and_check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, pattern="sdpa")


def test_sdpa_is_causal_and_scale():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)

    run_and_check(fn, q, k, v, pattern="sdpa", mask="causal")


def test_sdpa_enable_gqa():
    q, k, v = _rand(B, 4, S, D), _rand(B, 2, S, D), _rand(B, 2, S, D)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    run_and_check(fn, q, k, v, pattern="sdpa", mask="causal", groups=2)


def test_sdpa_bool_mask():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)
    keep = torch.rand(B, S) > 0.3
    keep[:, 0] = True  # no fully masked rows

    def fn(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])

    report = run_and_check(fn, q, k, v, keep, pattern="sdpa", mask="padding")
    assert report.sites[0].rewritten


def test_sdpa_additive_mask():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)
    bias = _rand(B, H, S, S)

    def fn(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    torch._dynamo.reset()
    out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v, bias)
    torch.testing.assert_close(out.double(), fn(q.double(), k.double(), v.double(), bias.double()),
                               atol=2e-5, rtol=2e-5)
    report = ringcompile.explain(fn, q, k, v, bias)
    assert report.sites[0].rewritten, report
    assert "bias" in report.sites[0].score_mod or "dense" in report.sites[0].mask, report


def test_sdpa_dropout_eval_and_training():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)

    def fn(q, k, v, training: bool = False):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25 if training else 0.0)

    run_and_check(fn, q, k, v, pattern="sdpa")
    report = ringcompile.explain(lambda q, k, v: fn(q, k, v, True), q, k, v)
    assert report.sites[0].rewritten and report.sites[0].dropout_p == 0.25, report


# ---------------------------------------------------------------------------- hand-written


def test_matmul_operator_mul_scale():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)

    def fn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        return s.softmax(-1) @ v

    report = run_and_check(fn, q, k, v, pattern="matmul")
    assert report.sites[0].scale == pytest.approx(D ** -0.5)


def test_torch_matmul_div_sqrt():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)

    def fn(q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        return torch.matmul(F.softmax(s, dim=-1), v)

    run_and_check(fn, q, k, v, pattern="matmul")


def test_prescaled_q_and_no_scale():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)

    def prescaled(q, k, v):
        q = q * D ** -0.5
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    def unscaled(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    assert run_and_check(prescaled, q, k, v).sites[0].scale == pytest.approx(1.0)
    assert run_and_check(unscaled, q, k, v).sites[0].scale == pytest.approx(1.0)


def test_bmm_3d():
    q, k, v = _rand(B * H, S, D), _rand(B * H, S, D), _rand(B * H, S, D)

    def fn(q, k, v):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.25
        return torch.bmm(torch.softmax(s, -1), v)

    report = run_and_check(fn, q, k, v, pattern="bmm")
    assert report.sites[0].layout == "3d"


def test_einsum_both_products():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)

    def fn(q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(D)
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)

    run_and_check(fn, q, k, v, pattern="einsum")


def test_einsum_bshd_layout():
    q, k, v = _rand(B, S, H, D), _rand(B, S, H, D), _rand(B, S, H, D)

    def fn(q, k, v):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    report = run_and_check(fn, q, k, v, pattern="einsum")
    assert report.sites[0].layout == "bshd"


def test_baddbmm_with_bias():
    q, k, v = _rand(B * H, S, D), _rand(B * H, S, D), _rand(B * H, S, D)
    bias = _rand(B * H, S, S)

    def fn(q, k, v, bias):
        s = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=D ** -0.5)
        return torch.bmm(torch.softmax(s, -1), v)

    torch._dynamo.reset()
    out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v, bias)
    torch.testing.assert_close(out.double(), fn(q.double(), k.double(), v.double(), bias.double()),
                               atol=2e-5, rtol=2e-5)
    report = ringcompile.explain(fn, q, k, v, bias)
    assert report.sites[0].pattern == "baddbmm" and report.sites[0].rewritten, report
    assert report.sites[0].scale == pytest.approx(D ** -0.5)


def test_bloom_style_head_split_views():
    """3-D baddbmm scores viewed to (B, H, S, S) for a causal mask, merged back for the bmm with v."""
    q, k, v = _rand(B * H, S, D), _rand(B * H, S, D), _rand(B * H, S, D)
    alibi = _rand(B * H, 1, S)

    def fn(q, k, v, alibi):
        s = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=D ** -0.5).view(B, H, S, S)
        s = s.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), torch.finfo(s.dtype).min)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype).view(B * H, S, S)
        return torch.bmm(p, v)

    torch._dynamo.reset()
    out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v, alibi)
    assert backend.rewritten_op_count(backend.HISTORY[-1].graph) == 1
    torch.testing.assert_close(out.double(), fn(q.double(), k.double(), v.double(), alibi.double()),
                               atol=2e-5, rtol=2e-5)
    report = ringcompile.explain(fn, q, k, v, alibi)
    site = report.sites[0]
    assert site.rewritten and site.pattern == "baddbmm+view" and site.mask == "causal", report
    assert site.score_mod != "none" and site.scale == pytest.approx(D ** -0.5), report


# ---------------------------------------------------------------------------- softmax spellings, dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_float_type_as(dtype):
    q, k, v = _rand(B, H, S, D, dtype=dtype), _rand(B, H, S, D, dtype=dtype), _rand(B, H, S, D, dtype=dtype)

    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        return s.float().softmax(-1).type_as(q) @ v

    atol = 2e-5 if dtype == torch.float32 else 3e-2
    report = run_and_check(fn, q, k, v, atol=atol)
    assert report.sites[0].softmax_dtype == "float32"


def test_softmax_with_dtype_argument():
    q, k, v = (_rand(B, H, S, D, dtype=torch.bfloat16) for _ in range(3))

    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.3
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    run_and_check(fn, q, k, v, atol=3e-2)


def test_dropout_eval_is_found_without_dropout():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)
    drop = torch.nn.Dropout(0.3).eval()

    def fn(q, k, v):
        return drop(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1)) @ v

    report = run_and_check(fn, q, k, v)
    assert report.sites[0].dropout_p == 0.0


def test_dropout_training_is_recorded_and_unbiased():
    """Training dropout cannot match eager bit for bit; check it is applied, varies, and is unbiased."""
    q, k, v = _rand(1, 2, 16, D), _rand(1, 2, 16, D), _rand(1, 2, 16, D)

    def fn(q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1), 0.5, training=True) @ v

    report = ringcompile.explain(fn, q, k, v)
    assert report.sites[0].rewritten and report.sites[0].dropout_p == 0.5, report
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="ring", options={"inner": "eager"})
    n = 100
    outs = torch.stack([compiled(q, k, v) for _ in range(n)]).double()
    assert backend.rewritten_op_count(backend.HISTORY[-1].graph) == 1
    ref = torch.softmax(q.double() @ k.double().transpose(-2, -1) * 0.25, -1) @ v.double()
    assert not torch.allclose(outs[0], outs[1])  # a fresh seed per call
    assert not torch.allclose(outs[0], ref, atol=1e-3)  # dropout really applied
    # the sample mean is unbiased: within 6 standard errors of the no-dropout output everywhere
    stderr = outs.std(0) / n ** 0.5
    assert bool(((outs.mean(0) - ref).abs() <= 6 * stderr + 1e-6).all())


# ---------------------------------------------------------------------------- layouts and GQA


def test_bshd_with_transposes_and_permute():
    q, k, v = _rand(B, S, H, D), _rand(B, S, H, D), _rand(B, S, H, D)

    def fn(q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        p = torch.softmax(qt @ kt / math.sqrt(D), dim=-1)
        return (p @ vt).transpose(1, 2).reshape(B, S, H * D)

    report = run_and_check(fn, q, k, v, pattern="matmul")
    assert report.sites[0].layout == "bshd"


def _repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


@pytest.mark.parametrize("how", ["repeat_kv", "repeat_interleave"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_gqa_repeat_recognised(how, kv_heads):
    q, k, v = _rand(B, 4, S, D), _rand(B, kv_heads, S, D), _rand(B, kv_heads, S, D)
    n = 4 // kv_heads

    def fn(q, k, v):
        if how == "repeat_kv":
            k, v = _repeat_kv(k, n), _repeat_kv(v, n)
        else:
            k, v = k.repeat_interleave(n, dim=1), torch.repeat_interleave(v, n, dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, -1) @ v

    run_and_check(fn, q, k, v, groups=n)
    # k and v enter the op un-repeated
    graph = backend.HISTORY[-1].graph
    call = next(n for n in graph.graph.nodes if n.target is torch.ops.ringcompile.ring_attention.default)
    assert call.args[1].meta["val"].shape[1] == kv_heads
    assert call.args[2].meta["val"].shape[1] == kv_heads


def test_gqa_into_sdpa_through_repeat_kv():
    q, k, v = _rand(B, 4, S, D), _rand(B, 2, S, D), _rand(B, 2, S, D)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2), is_causal=True)

    run_and_check(fn, q, k, v, pattern="sdpa", mask="causal", groups=2)


def test_tile_repeat_is_not_gqa_but_still_correct():
    """x.repeat(1, n, 1, 1) tiles heads (h -> h % Hkv), which is not GQA order: keep the repeat."""
    q, k, v = _rand(B, 4, S, D), _rand(B, 2, S, D), _rand(B, 2, S, D)

    def fn(q, k, v):
        k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
        return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, -1) @ v

    run_and_check(fn, q, k, v, groups=1)


def test_inductor_inner_compiler():
    q, k, v = _rand(B, 4, S, D), _rand(B, 2, S, D), _rand(B, 2, S, D)

    def fn(q, k, v):
        k, v = _repeat_kv(k, 2), _repeat_kv(v, 2)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1) @ v

    run_and_check(fn, q, k, v, groups=2, inner="inductor", atol=1e-4)


def test_two_sites_in_one_graph():
    q, k, v = _rand(B, H, S, D), _rand(B, H, S, D), _rand(B, H, S, D)

    def fn(q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(a @ k.transpose(-2, -1) * 0.2, -1) @ v

    run_and_check(fn, q, k, v, sites=2)
