"""The validation benchmark's arithmetic: MAPE and the planner's regret, on hand-made rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cost_model_validation.py"


def _module():
    spec = importlib.util.spec_from_file_location("cost_model_validation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(strategy, measured, predicted, choice, n=2, s=2048):
    return dict(strategy=strategy, seq_len=s, world_size=n, causal=True, backward=False, measured=measured,
                predicted=predicted, planner_choice=choice)


def test_mape_and_regret():
    mod = _module()
    rows = [_row("ring", 1.0, 1.1, "zigzag"), _row("zigzag", 0.8, 0.7, "zigzag"),
            _row("ring", 2.0, 1.0, "ring", n=4), _row("allgather", 1.6, 1.6, "ring", n=4)]
    summary = mod.summarize(rows)
    assert summary["mape"] == pytest.approx((0.1 + 0.125 + 0.5 + 0.0) / 4)
    regrets = {(g["world_size"]): g["regret"] for g in summary["regrets"]}
    assert regrets[2] == pytest.approx(0.0)           # zigzag chosen and best
    assert regrets[4] == pytest.approx(2.0 / 1.6 - 1)  # ring chosen, allgather best
    assert "MAPE" in mod.markdown(rows, summary)


def test_grid_has_at_least_12_configurations_over_two_world_sizes():
    mod = _module()
    per_n = mod.grid(quick=False)
    assert 2 * len(per_n) >= 12
    assert {c["strategy"] for c in per_n} == set(mod.STRATEGIES)


def test_local_baseline_is_a_candidate_in_every_world_size_group():
    """A one-process local row competes in each N group: plan()'s pick of local is judged against
    the distributed rows, and a faster local makes a distributed pick regret it."""
    mod = _module()
    local = dict(strategy="local", seq_len=2048, world_size=1, causal=True, backward=False, measured=1.5,
                 predicted=1.4, candidate_for=[2, 4])
    rows = [dict(_row("zigzag", 1.0, 1.0, "zigzag"), plan_choice="zigzag"),
            dict(_row("ring", 2.0, 2.1, "ring", n=4), plan_choice="local"), local]
    summary = mod.summarize(rows)
    by_n = {g["world_size"]: g for g in summary["regrets"]}
    assert by_n[2]["best"] == "zigzag" and by_n[2]["regret"] == pytest.approx(0.0)
    assert by_n[4]["chosen"] == "local" and by_n[4]["runtime_choice"] == "ring"
    assert by_n[4]["best"] == "local" and by_n[4]["regret"] == pytest.approx(0.0)
    assert summary["n_configs"] == 3                    # the local row counts once in the MAPE
