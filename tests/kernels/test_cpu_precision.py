"""bfloat16 error of the (simulated) ring against float64 must not grow with the number of ranks."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "precision.py"


def _precision_module():
    spec = importlib.util.spec_from_file_location("ringcompile_benchmark_precision", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("strategy", ["ring", "zigzag"])
def test_bf16_error_does_not_grow_with_world_size(strategy):
    rows = _precision_module().measure(world_sizes=(1, 8), strategies=(strategy,), seq=256, heads=4,
                                       kv_heads=2, dim=32, seed=3)
    one, eight = rows
    assert (one["world_size"], eight["world_size"]) == (1, 8)
    for key in ("out_rel_rms", "dq_rel_rms", "dk_rel_rms", "dv_rel_rms"):
        assert one[key] < 1e-2, (key, one[key])  # a bf16 result, not garbage
        assert eight[key] <= 1.5 * one[key] + 1e-4, (key, one[key], eight[key])
