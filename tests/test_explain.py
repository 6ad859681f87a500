"""``ringcompile.explain``: the report's fields, its table, graph counting, and the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ringcompile
from ringcompile.cli import main
from ringcompile.models import build_model


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_report_fields_and_table():
    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)

    def fn(q, k, v):
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        p = torch.softmax(a @ a.transpose(-2, -1), dim=-2)  # attention-like, wrong softmax dim
        return p @ a

    report = ringcompile.explain(fn, q, k, v)
    assert report.graphs == 1 and report.graph_breaks == 0
    assert len(report.sites) == 1
    site = report.sites[0]
    assert (site.pattern, site.mask, site.score_mod, site.gqa_groups, site.rewritten, site.reason) == (
        "sdpa", "causal", "none", 2, True, None)
    assert "test_explain.py" in site.location
    assert len(report.not_rewritten) == 1 and "key dim" in report.not_rewritten[0].reason
    text = str(report)
    for word in ("location", "pattern", "mask", "causal", "sdpa", "yes", "not rewritten", "key dim"):
        assert word in text


def test_graph_breaks_are_counted():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))

    def fn(q, k, v):
        a = F.scaled_dot_product_attention(q, k, v)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(a, k, v, is_causal=True)

    report = ringcompile.explain(fn, q, k, v)
    assert report.graphs == 2 and report.graph_breaks == 1
    assert [s.mask for s in report.sites] == ["none", "causal"]
    assert [s.graph for s in report.sites] == [0, 1]


def test_explain_does_not_change_results_and_accepts_compiled_modules():
    model = build_model("gpt2").eval()
    ids = torch.randint(0, 128, (1, 12))
    compiled = torch.compile(model, backend="ring", options={"inner": "eager"})
    report = ringcompile.explain(compiled, ids)
    assert [s.mask for s in report.sites] == ["causal", "causal"]
    assert all(s.rewritten for s in report.sites)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_unknown_option_in_explain():
    with pytest.raises(ringcompile.OptionError, match="valid options"):
        ringcompile.explain(lambda x: x, torch.randn(2), options={"nope": 1})


def test_cli_explain_prints_report(capsys):
    assert main(["explain", "--model", "llama", "--seq", "32", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 attention site(s), 1 rewritten" in out
    assert "sdpa" in out and "causal" in out and "layers.0.attn" in out
