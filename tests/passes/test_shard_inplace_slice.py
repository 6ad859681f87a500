"""An in-place add into a slice of a gathered (sequence-sharded) tensor on 2 gloo ranks (zoo, Gemma 3n's
AltUp ``corrected[1:] += first``): gather_seq returned a view of its own buffer, and autograd refuses an
in-place write into a view made inside a custom op ("Output 0 of GeneratedBackwardFor_ringcompile_
gather_seq_default is a view and is being modified inplace"). Outputs and gradients against float64 eager."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

TOL = 1e-10


@pytest.mark.multirank
def test_inplace_add_into_slice_of_gathered_two_ranks():
    from harness import run_cases

    results = run_cases("inplace_slice_cases", ["case_grad", "case_no_grad"], world=2, timeout=300)
    for name, per_rank in results.items():
        for res in per_rank:
            assert res is not None and "error" not in res, (name, res and res.get("error"))
            assert res["sharded"] and not res["reasons"], (name, res)
            assert res["out"] < TOL, (name, res)
            assert all(e < TOL for e in res["grads"].values()), (name, res)
