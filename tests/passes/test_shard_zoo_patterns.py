"""Zoo patterns on 2 gloo ranks (issue 10), outputs and gradients against float64 eager:

- an in-place add into a slice of a gathered (sequence-sharded) tensor (Gemma 3n's AltUp
  ``corrected[1:] += first``): gather_seq returned a view of its own buffer, and autograd refuses an in-place
  write into a view made inside a custom op ("Output 0 of GeneratedBackwardFor_ringcompile_gather_seq_default
  is a view and is being modified inplace");
- ``torch.concatenate`` on the feature dim before attention (Zamba2): the walk back to the sequence input
  stopped at ``aten.concatenate`` (no sequence rule), so the graph stayed unsharded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

TOL = 1e-10
CASES = ["case_inplace_slice_grad", "case_inplace_slice_no_grad", "case_concatenate"]


@pytest.mark.multirank
def test_zoo_patterns_two_ranks():
    from harness import run_cases

    results = run_cases("zoo_pattern_cases", CASES, world=2, timeout=300)
    for name, per_rank in results.items():
        for res in per_rank:
            assert res is not None and "error" not in res, (name, res and res.get("error"))
            assert res["sharded"] and not res["reasons"], (name, res)
            assert res["out"] < TOL, (name, res)
            assert all(e < TOL for e in res["grads"].values()), (name, res)
