"""Nystromformer through the zoo on 2 gloo ranks: its attention output is written in place afterwards
(``context += conv(v)``), which crashed backward before the rewrite copied such outputs (issue 10)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = pytest.mark.multirank


def test_nystromformer_eager_matches_one_process():
    pytest.importorskip("transformers")
    import zoo

    (rec,) = zoo.run_group([("nystromformer", "eager")], timeout=120)
    assert rec["status"] == "ok", rec  # fully sharded, outputs and grads within the zoo's tolerances
    assert rec["rewritten"] == rec["expected_sites"] > 0, rec
