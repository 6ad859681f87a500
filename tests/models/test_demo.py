"""Smoke test of ``ringcompile demo``: tiny settings, 2 spawned CPU ranks, must report PASS."""

from __future__ import annotations

import json

import pytest

from ringcompile.cli import main

pytestmark = pytest.mark.multirank


def test_demo_tiny_llama_passes(capsys, tmp_path):
    rc = main(["demo", "--seq", "48", "--dim", "32", "--layers", "1", "--vocab", "64", "--dtype", "float64",
               "--timeout", "240", "--trace", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS: loss and gradients match one process" in out
    assert "WARNING" not in out, out
    for rank in (0, 1):
        assert f"[rank {rank}]" in out
    assert out.count("attention layers.0.attn") == 2  # the plan line, once per rank
    assert "measured bubble" in out and "activations saved for backward" in out
    assert "layout zigzag" in out  # causal model: balanced layout
    # --trace: one merged trace with both ranks, and the summary with its advice, printed too
    assert f"trace: {tmp_path / 'trace.json'}" in out and f"summary: {tmp_path / 'summary.txt'}" in out
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"} == {0, 1}
    assert "advice:" in (tmp_path / "summary.txt").read_text()


def test_demo_rejects_unknown_model():
    with pytest.raises(SystemExit):
        main(["demo", "--model", "no-such-model"])
