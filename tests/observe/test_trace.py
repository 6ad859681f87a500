"""``ringcompile trace``: profiler ranges, the merged multi-rank trace, the timeline and the advice."""

from __future__ import annotations

import builtins
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import ringcompile
from ringcompile.cli import main
from ringcompile.cost_model.planner import plan
from ringcompile.errors import MissingDependencyError, RingCompileError
from ringcompile.observe import advice, chrome, timeline
from ringcompile.observe.collect import collecting

SCRIPT = Path(__file__).with_name("ring_script.py")


def _call(rank: int, phase: str, *, strategy: str = "ring", world: int = 4, seq: int = 4096,
          block: int | None = 8, compute: float = 0.01, wait: float = 0.01, t0: int = 0) -> dict:
    """A recorded call as the collector writes it (seconds -> ns events, two steps)."""
    ns = 1_000_000_000
    c0, c1 = t0, t0 + int(compute * ns)
    w1 = c1 + int(wait * ns)
    return {"strategy": strategy, "phase": phase, "rank": rank, "world_size": world, "site": "layer0.attn",
            "total_s": compute + wait, "compute_s": compute, "wait_s": wait,
            "bubble": wait / (compute + wait), "start_ns": t0,
            "workload": {"seq_len": seq, "batch": 1, "heads": 4, "kv_heads": 4, "head_dim": 32,
                         "dtype": "float32", "causal": True, "block_size": block, "device": "cpu"},
            "steps": [], "events": [["compute", 0, 0, c0, c1], ["wait K/V", 1, 0, c1, w1]]}


def test_profiler_shows_named_ring_ranges():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=gen, requires_grad=True) for _ in range(3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ringcompile.ring_attention(q, k, v, is_causal=True).sum().backward()
    names = {e.key for e in prof.key_averages()}
    ours = [n for n in names if n.startswith("ringcompile/")]
    assert any(n.endswith("/forward/step0/chunk0/compute") for n in ours), ours
    assert any("/backward/" in n for n in ours), ours


def test_chrome_trace_has_a_process_per_rank():
    calls = [_call(r, p, t0=r * 1000) for r in range(4) for p in ("forward", "backward")]
    trace = chrome.chrome_trace(calls)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {0, 1, 2, 3}
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {f"rank {r}" for r in range(4)}
    waits = [e for e in slices if e["name"] == "wait K/V"]
    assert all(e["dur"] > 0 and e["args"]["step"] == 1 for e in waits)
    json.dumps(trace)  # serialisable as is


def test_advice_names_a_larger_block_from_the_plan():
    calls = [_call(r, "forward", block=8, compute=0.01, wait=0.05) for r in range(4)]
    [summary] = advice.summarize(calls, profile="cpu-gloo-loopback")
    [line] = [a for a in summary.advice if a.startswith("bubble")]
    m = re.match(r"bubble (\d+)% > 5%: block (\d+) -> (\d+) tokens, predicted bubble (\d+)%", line)
    assert m, summary.advice
    old, new, predicted = int(m.group(2)), int(m.group(3)), int(m.group(4))
    assert old == 8 and new > old
    same = dict(seq_len=4096, world_size=4, heads=4, kv_heads=4, head_dim=32, dtype="float32", causal=True,
                profile="cpu-gloo-loopback", strategy="ring")
    expected = plan(**same, block_size=new)
    assert predicted == round(expected.bubble * 100)
    assert expected.bubble < plan(**same, block_size=8).bubble


def test_advice_says_when_local_wins_and_why_ulysses_cannot_run():
    calls = [_call(r, "forward", world=3, seq=96, block=None) for r in range(3)]
    [summary] = advice.summarize(calls, profile="cpu-gloo-loopback")
    text = summary.format()
    assert "local attention is predicted" in text, text
    assert "ulysses needs heads (4)" in text, text  # 4 heads over 3 ranks


def test_timeline_png_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    calls = [_call(r, p, t0=r * 10**6) for r in range(2) for p in ("forward", "backward")]
    path = timeline.draw_timeline(calls, tmp_path / "timeline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_timeline_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ringcompile\[plot\]'"):
        timeline.draw_timeline([_call(0, "forward")], tmp_path / "t.png")


def test_no_recorded_calls_is_a_clear_error(tmp_path):
    with pytest.raises(RingCompileError, match="no ring calls were recorded"):
        chrome.load_calls(tmp_path)


def test_collecting_in_process_writes_one_line_per_call(tmp_path):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=gen) for _ in range(3))
    with collecting(tmp_path):
        ringcompile.ring_attention(q, k, v)
        ringcompile.ring_attention(q, k, v, is_causal=True)
    calls = chrome.load_calls(tmp_path)
    assert len(calls) == 2 and all(c["phase"] == "forward" and c["events"] for c in calls)
    assert calls[1]["workload"]["causal"] is True and calls[1]["workload"]["heads"] == 2


@pytest.mark.multirank
def test_trace_command_merges_every_rank(tmp_path, capsys):
    rc = main(["trace", "--output", str(tmp_path), "--", sys.executable, str(SCRIPT)])
    out = capsys.readouterr().out
    assert rc == 0, out
    trace = json.loads((tmp_path / "trace.json").read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {0, 1}
    for rank in (0, 1):
        mine = [e for e in slices if e["pid"] == rank]
        assert {e["name"] for e in mine} >= {"compute", "wait K/V"}
        assert any(e["tid"] == 2 for e in mine)  # backward thread
    summary = (tmp_path / "summary.txt").read_text()
    assert "ring on 2 ranks" in summary and "measured" in summary and "predicted" in summary
    assert "advice:" in summary and "block 8 ->" in summary, summary
    assert "summary:" in out and "trace:" in out
