"""A parameter first used under ``torch.no_grad()`` and later with grad on keeps its gradient on 2 ranks
(issue 10, hrm_text): the sharding pass must not reuse a conversion (grad_reduce_view, to_local) made in a
no-grad region where grad is on, and a parameter used only under no_grad keeps ``grad is None``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

TOL = 1e-10


@pytest.mark.multirank
def test_no_grad_then_grad_two_ranks():
    from harness import run_cases

    for res in run_cases("grad_mode_cases", ["case_no_grad_then_grad"], world=2, timeout=200)[
            "case_no_grad_then_grad"]:
        assert "error" not in res, res.get("error")
        assert res["sharded"] and res["rewritten"] == 2, res
        assert res["out"] < TOL, res
        assert res["grads"]["only_no_grad.weight"] is None and res["grads"]["only_no_grad.bias"] is None, res
        bad = {k: v for k, v in res["grads"].items() if not k.startswith("only_no_grad") and not v < TOL}
        assert not bad, bad
