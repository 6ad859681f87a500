"""In-place writes into sharded graph inputs and into values derived from the shard, on 2 gloo ranks vs the
same model in one process (float64, outputs, the inputs after the call, parameter and input gradients).

Before: an input written in place (``x.add_(1)``) kept its old values for the caller (only each rank's
``to_local`` copy was written) and, when it required grad, autograd refused the write ("Output 0 of
GeneratedBackwardFor_ringcompile_to_local_default is a view and is being modified inplace"); a write into
``h[:, :2]`` reached the whole local shard; writes into ``h[:, 3:]``, ``h[:, 3]``, ``h[:, -1:]`` landed in a
halo / gathered-rows copy and were lost; a value gathered before a write through a view of it was reused
after the write. Now the written input is copied back from its gathered shards, the conversions taken before
a write are taken again after it, and writes the shards cannot carry make the graph run unsharded, with the
reason (``passes/aliases.py``, ``_Sharder.after_write``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

from inplace_cases import SHARDED, UNSHARDED  # noqa: E402

TOL = 1e-10


def _check(results: dict) -> None:
    problems = []
    for rank, per_rank in enumerate(results):
        assert "error" not in per_rank, per_rank["error"]
        for key, res in per_rank.items():
            pattern = key.split("/")[0]
            if "crash" in res:
                problems.append(f"rank {rank} {key}: crashed\n{res['crash']}")
                continue
            errs = {"out": res["out"], "x_after": res["x_after"], **res["grads"]}
            bad = {k: v for k, v in errs.items() if not v < TOL}
            if bad or res["pad_after"]:
                problems.append(f"rank {rank} {key}: differs from one process: {bad} pad {res['pad_after']}")
            if pattern in SHARDED and not (res["sharded"] and not res["reasons"]):
                problems.append(f"rank {rank} {key}: not sharded: {res['reasons']}")
            if pattern in UNSHARDED:
                said = " ".join(res["reasons"])
                if res["sharded"] or UNSHARDED[pattern] not in said:
                    problems.append(f"rank {rank} {key}: expected unsharded because '{UNSHARDED[pattern]}', "
                                    f"got sharded={res['sharded']} reasons {res['reasons']}")
    assert not problems, "\n".join(problems)


@pytest.mark.multirank
def test_inplace_writes_on_sharded_values_match_one_process():
    from harness import run_cases

    _check(run_cases("inplace_cases", ["case_eager"], world=2, timeout=900)["case_eager"])


@pytest.mark.multirank
def test_inplace_writes_under_inductor_match_one_process():
    from harness import run_cases

    _check(run_cases("inplace_cases", ["case_inductor"], world=2, timeout=900)["case_inductor"])
