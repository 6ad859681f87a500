"""1-D convolutions around attention on 2 gloo ranks (``conv_cases``), outputs and gradients against float64
eager: kernel-1 projections (SqueezeBERT) pass the sequence; a kernel-3 conv falls back with its reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

TOL = 1e-10
CASES = ["case_k1_causal", "case_k1_padded", "case_k1_dynamic",
         "case_k3_projections", "case_conv_after_attention"]


def _check_right(name: str, res: dict) -> None:
    assert res is not None and "error" not in res, (name, res and res.get("error"))
    assert res["out"] < TOL, (name, res)
    assert res["grads"] and all(e < TOL for e in res["grads"].values()), (name, res)


@pytest.fixture(scope="module")
def results():
    from harness import run_cases

    return run_cases("conv_cases", CASES, world=2, timeout=300)


@pytest.mark.multirank
@pytest.mark.parametrize("case", ["case_k1_causal", "case_k1_padded"])
def test_kernel1_conv_projections_are_sharded(results, case):
    for res in results[case]:
        _check_right(case, res)
        assert res["sharded"] and not res["reasons"], (case, res)
        assert not res["gather_reasons"], (case, res)  # nothing gathered: the convs run on the shard


@pytest.mark.multirank
def test_kernel3_conv_projections_fall_back_with_the_reason(results):
    for res in results["case_k3_projections"]:
        _check_right("case_k3_projections", res)
        assert not res["sharded"], res
        reason = " ".join(res["reasons"])
        assert "convolution with kernel 3" in reason and "neighbouring positions" in reason, reason
        assert "compile the layers it feeds" in reason, reason


@pytest.mark.multirank
def test_kernel3_conv_after_attention_is_gathered_with_the_reason(results):
    for res in results["case_conv_after_attention"]:
        _check_right("case_conv_after_attention", res)
        assert res["sharded"] and not res["reasons"], res
        assert any("convolution with kernel 3" in w and "halo" in w for w in res["gather_reasons"]), res
        assert res["gathered_in_decisions"] == res["gather_reasons"], res


@pytest.mark.multirank
def test_kernel1_conv_projections_sharded_under_dynamic_shapes(results):
    for res in results["case_k1_dynamic"]:
        assert res is not None and "error" not in res, res and res.get("error")
        assert all(e < TOL for e in res["errs"].values()), res
        assert True in res["dynamic"] and not res["reasons"], res  # a symbolic-length graph, sharded
        assert not any(res["gathers"]), res


def test_conv_projections_in_one_process():
    """World 1 (no ranks): the rewritten attention gets SqueezeBERT's strided head dim straight from the
    convs; the CPU kernel returned wrong values for it (see test_cpu_kernels' strided case)."""
    import copy

    import torch
    from conv_cases import B, ConvProjections, E

    torch.manual_seed(0)
    model = ConvProjections(kernel=1, causal=True).double()
    ref = copy.deepcopy(model)
    x = torch.randn(B, 8, E, dtype=torch.float64)
    torch._dynamo.reset()
    out = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})(x)
    r_out = ref(x)
    assert ((out - r_out).abs().max() / r_out.abs().max()).item() < TOL
