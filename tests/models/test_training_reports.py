"""No silent fallback in training setups, on 2 gloo ranks (issue 15 items 2, 5, 7): ``cond`` with attention
in a branch is listed in explain() with the reason; a graph leaving attention unsharded logs exactly one
WARNING naming the site and reason; ``require_sharded=True`` raises UnshardedAttentionError; MHA key padding
(+ causal) and BERT's additive padding are structure and shard, against float64 in one process. The cases
live in test_training_setups.py; these ranks are spawned apart so each module's fixture stays short.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import run_cases  # noqa: E402
from test_training_setups import (  # noqa: E402, F401  (the ranks look the cases up on this module)
    _ok,
    case_cond_attention,
    case_mha_masks,
    case_require_sharded,
    case_rewrite_declined,
    case_unsharded_warning,
)

pytestmark = pytest.mark.multirank
CASES = ["case_cond_attention", "case_unsharded_warning", "case_require_sharded", "case_mha_masks",
         "case_rewrite_declined"]


@pytest.fixture(scope="module")
def results():
    return run_cases("test_training_reports", CASES, world=2, timeout=500)


def test_cond_with_attention_is_listed_with_the_reason(results):
    for out in _ok(results, "case_cond_attention"):
        assert out["err"] <= 1e-12 and not out["fallbacks"]
        assert [p for p, _ in out["rejected"]] == ["cond"] and "control flow" in out["rejected"][0][1]
        assert out["explain"] and out["explain"][0][0] == "cond" and "control flow" in out["explain"][0][1]


@pytest.mark.parametrize(("name", "where", "why"), [
    ("case_cond_attention", "(attend) [cond]", "control flow"),
    ("case_unsharded_warning", "(_unmatched_model) [softmax]", "not the key dim")])
def test_unsharded_attention_warns_once_naming_site_and_reason(results, name, where, why):
    for out in _ok(results, name):
        warnings = [m for level, m in out["logs"] if level == "WARNING"]
        assert len(warnings) == 1, out["logs"]
        assert "unsharded on 2 ranks" in warnings[0] and where in warnings[0] and why in warnings[0]
        assert warnings[0].count(where.split(" ")[0]) == 1, "the site is named once"
        assert out["graphs"] == [(0, False)] or out["graphs"] == [[0, False]]


def test_rewrite_declined_site_warns_once(results):
    for out in _ok(results, "case_rewrite_declined"):
        assert out["err"] <= 1e-12 and out["sites"] and not out["sites"][0][1]
        levels = [(level, m) for level, m in out["logs"] if "declined for the test" in m]
        assert [level for level, _ in levels] == ["INFO", "WARNING"], out["logs"]
        assert "unsharded on 2 ranks" in levels[1][1]


def test_require_sharded_raises(results):
    for out in _ok(results, "case_require_sharded"):
        for name, where in (("cond", "[cond]"), ("unmatched", "[softmax]")):
            assert out[name].startswith("require_sharded=True") and where in out[name], out[name]
        assert out["sharded_err"] <= 1e-12


@pytest.mark.parametrize(("kind", "mask", "score"), [("none", "padding", "none"),
                                                     ("bool", "causal & padding", "none"),
                                                     ("float", "causal & padding", "none"),
                                                     ("bert", "none", "padding bias")])
def test_mha_masks_sharded(results, kind, mask, score):
    for out in _ok(results, "case_mha_masks"):
        got = out[kind]
        assert got["masks"] == [(mask, score)] or got["masks"] == [[mask, score]], got["masks"]
        assert got["graphs"] and all(sharded for n, sharded in got["graphs"] if n), got["graphs"]
        assert not got["fallbacks"] and got["err"] <= 1e-10, got
