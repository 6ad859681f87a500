"""The rule registry: rules are asked in order, the first that applies decides, declines name the rule."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ringcompile
from ringcompile.passes.find_attention import find_attention
from ringcompile.passes.rules import RULES, Decline, Match, Rule, register_rule
from ringcompile.passes.rules.ops import SOFTMAX_OPS


def _graph(fn, *args):
    """A pre-dispatch aten graph of ``fn``, the form normalize gives discovery."""
    return make_fx(fn, pre_dispatch=True)(*args)


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v


@pytest.fixture
def saved_rules():
    saved = list(RULES)
    yield
    RULES[:] = saved


def test_builtin_rules_are_registered_in_order():
    names = [r.name for r in RULES][:9]
    # decode / decode-softmax anchor only on attention over a sharded KV cache (passes/rules/decode.py);
    # softmax-row-shift only declines (an unsound max shift), the softmax rules strip the sound ones
    assert names == ["decode", "decode-softmax", "flex", "sdpa", "softmax-row-shift", "softmax-sink",
                     "softmax-head-split", "softmax-lse", "softmax-chain"]


def test_a_rule_registered_from_outside_is_asked_first_and_its_decline_is_named(saved_rules):
    seen = []

    def extract(node, index):
        seen.append(node)
        raise Decline("the test rule declines")

    register_rule(Rule("test-rule", frozenset(SOFTMAX_OPS), extract), before="softmax-sink")
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))
    found = find_attention(_graph(_attention, q, k, v))
    assert len(seen) == 1 and found.sites == []
    (rej,) = found.rejected
    assert rej.rule == "test-rule" and rej.reason == "the test rule declines [rule test-rule]"


def test_a_rule_that_does_not_apply_passes_to_the_next(saved_rules):
    register_rule(Rule("never", frozenset(SOFTMAX_OPS), lambda node, index: None), before="softmax-sink")
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))
    found = find_attention(_graph(_attention, q, k, v))
    assert [s.pattern for s in found.sites] == ["matmul"] and found.rejected == []


def test_discovery_does_not_modify_the_graph():
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))
    gm = _graph(_attention, q, k, v)
    before = [(n.op, n.target, n.args) for n in gm.graph.nodes]
    assert len(find_attention(gm).sites) == 1
    assert [(n.op, n.target, n.args) for n in gm.graph.nodes] == before


def test_explain_names_the_rule_that_declined():
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))

    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-2) @ v

    reasons = [n.reason for n in ringcompile.explain(fn, q, k, v).not_rewritten]
    assert any("not the key dim" in r and r.endswith("[rule softmax-chain]") for r in reasons), reasons


def test_match_is_typed():
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))
    gm = _graph(_attention, q, k, v)
    sm = next(n for n in gm.graph.nodes if n.target in SOFTMAX_OPS)
    rule = next(r for r in RULES if r.name == "softmax-chain")
    match = rule.extract(sm, 0)
    assert isinstance(match, Match) and match.rule == "softmax-chain"
    assert match.site.q.meta["val"].shape == (2, 3, 8, 4) and match.site.scale == 0.5
