"""A CI-sized slice of benchmarks/zoo.py: a few families, generic tiny configs, 2 gloo ranks vs one process.

No run may be wrong or crash, and every run that is not fully sharded must say why.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = pytest.mark.multirank

# families wrong today because of a bug another change is fixing: {family: reason} (xfail strict, so the
# test flips when it is fixed). T5's 2x bias gradient (issue 10 item 1a) was fixed on main.
KNOWN_WRONG: dict[str, str] = {}
# longcat_flash: under transformers 5.24 its MoE graph-broke each layer frame, compiled once and run per layer
# (5.25 compiles every layer: rewritten == expected), so the ring calls executed, not the sites compiled,
# must cover the eager attentions
RUNS = [("llama", "sdpa"), ("gpt2", "eager"), ("bert", "sdpa"), ("qwen2", "eager"), ("t5", "eager"),
        ("longcat_flash", "sdpa")]


@pytest.fixture(scope="module")
def records():
    pytest.importorskip("transformers")
    import zoo

    return {(r["family"], r["impl"]): r for r in zoo.run_group(RUNS, timeout=120)}


@pytest.mark.parametrize("family,impl", [
    pytest.param(f, i, marks=pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[f])) if f in KNOWN_WRONG
    else (f, i) for f, i in RUNS])
def test_zoo_family(records, family, impl):
    rec = records[(family, impl)]
    if family == "longcat_flash":
        assert rec["status"] == "ok" and rec["ring_calls"] >= rec["expected_sites"], rec
    assert rec["status"] in ("ok", "unsharded-reason"), rec
    if rec["status"] == "unsharded-reason":
        assert rec["reasons"], rec
