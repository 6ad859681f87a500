"""The sharding collectives pass ``torch.library.opcheck`` (their schemas declare no aliasing, so no
output may alias an input; fake impls, autograd and AOT dispatch agree with the real op) and none returns
a view: ``to_local`` / ``slice_seq`` returned a reshape of their ``index_select`` buffer, so an in-place
write into a sharded input (``x.add_(1)`` under grad) raised "Output 0 of
GeneratedBackwardFor_ringcompile_to_local_default is a view and is being modified inplace"."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))


@pytest.mark.multirank
def test_collectives_pass_opcheck_and_return_no_views():
    from harness import run_cases

    results = run_cases("opcheck_cases", ["case_opcheck"], world=2, timeout=300)["case_opcheck"]
    for rank, res in enumerate(results):
        assert "error" not in res, (rank, res.get("error"))
        bad = {k: v for k, v in res["opcheck"].items() if v != "ok"}
        assert not bad, (rank, bad)
        views = [k for k, v in res["views"].items() if v]
        assert not views, (rank, f"outputs that are views: {views}")
