"""The differential guarantee: backend="ring" computes what backend="aot_eager" computes, or falls back
with a reason, on small random transformer-like models (tests/diff_models.py).

The models draw from the ops real models use around attention: RoPE (rotate_half, interleaved, complex
view_as_complex / view_as_real), type_as / to(dtype), in-place arithmetic on activations and scores,
in-place writes into the inputs (the sharded ids, the labels) and through a view of the embedded shard, a
custom autograd.Function with its own backward, learned relative-position and ALiBi biases, DeBERTa's
content->position bias (a gather of q @ pos_k^T over relative positions, on merged-head (B*H, S, S)
scores before their 4-D view in the bmm spelling), causal /
padding / sliding-window masks (bool or finfo.min additive), GQA through repeat_interleave, expand or
SDPA's enable_gqa, SDPA vs matmul / bmm (merged heads) / einsum spellings, attention sinks, and K/V
caches (an empty past, a learned prefix). Logits, the loss, every parameter gradient and the inputs as the
call leaves them must agree
(float64; float32-accurate where the model runs its softmax in float32). A model the backend does not
shard must say why; and most examples must be sharded, so the comparison is not vacuous.

World size 1 runs under hypothesis (a failure shrinks to a minimal spec); world size 2 replays specs
drawn from a seeded generator in one spawned pair of gloo ranks. RING_DIFF_EXAMPLES=N (world 1) and
RING_DIFF_EXAMPLES_WORLD2=N raise the counts; RING_DIFF_SEED picks other world-2 specs and makes the
world-1 search random instead of derandomised. A world-2 failure prints its Spec; minimise it by hand
(dataclasses.replace one field at a time) with ``case_world2_<i>`` on a one-spec RING_DIFF_SPECS_FILE, or
replay it at world size 1 with ``diff_models.run_example(spec, 1)``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
from diff_models import Spec, draw_spec, run_example, verdict  # noqa: E402

EXAMPLES_1 = int(os.environ.get("RING_DIFF_EXAMPLES", "8"))
EXAMPLES_2 = int(os.environ.get("RING_DIFF_EXAMPLES_WORLD2", "6"))
SEED = os.environ.get("RING_DIFF_SEED")
MIN_SHARDED = 0.5  # share of examples that must actually be sharded (not fallen back)


def _summary(recs: list[dict]) -> str:
    lines = []
    for r in recs:
        what = "sharded" if r["sharded"] else f"fallback ({'; '.join(r['reasons'])[:300]})"
        lines.append(f"  {r['errs']} {what}: {Spec.from_dict(r['spec'])}")
    return "\n".join(lines)


def test_ring_equals_aot_eager_world_size_1():
    recs: list[dict] = []

    @settings(max_examples=EXAMPLES_1, derandomize=SEED is None, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def check(data):
        spec = draw_spec(lambda name, options: data.draw(st.sampled_from(list(options)), label=name))
        rec = run_example(spec, world=1)
        recs.append(rec)
        problem = verdict(rec)
        assert problem is None, f"{problem}\n{spec}\nreasons: {rec['reasons']}"

    check()
    sharded = sum(r["sharded"] for r in recs)
    assert sharded >= MIN_SHARDED * len(recs), f"only {sharded}/{len(recs)} sharded:\n{_summary(recs)}"


# ---------------------------------------------------------------------------- world size 2


def world2_specs(n: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    return [draw_spec(lambda name, options: rng.choice(list(options))) for _ in range(n)]


def _world2_case(index: int):
    def case(rank: int, world: int) -> dict:
        """Spec ``index`` of $RING_DIFF_SPECS_FILE on this rank (both ranks run it in lockstep)."""
        import logging

        logging.getLogger("ringcompile").setLevel(logging.ERROR)
        specs = json.loads(Path(os.environ["RING_DIFF_SPECS_FILE"]).read_text())
        spec = Spec.from_dict(specs[index])
        try:
            return run_example(spec, world)
        except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported by the parent
            return {"spec": spec.as_dict(), "crash": f"{type(exc).__name__}: {exc}"[:1500]}
    return case


def __getattr__(name: str):
    """case_world2_<i>: one case per spec, so a slow or hung example costs only itself (the harness
    imports the cases by name in the spawned ranks)."""
    if name.startswith("case_world2_"):
        return _world2_case(int(name.rsplit("_", 1)[1]))
    raise AttributeError(name)


@pytest.mark.multirank
def test_ring_equals_aot_eager_world_size_2(monkeypatch):
    from harness import run_cases

    specs = world2_specs(EXAMPLES_2, int(SEED or 0))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([s.as_dict() for s in specs], f)
    monkeypatch.setenv("RING_DIFF_SPECS_FILE", f.name)
    names = [f"case_world2_{i}" for i in range(len(specs))]
    try:
        results = run_cases("test_differential", names, world=2, timeout=120 + 90 * len(specs))
    finally:
        os.unlink(f.name)
    problems, recs = [], []
    for name, spec in zip(names, specs, strict=True):
        for rank, rec in enumerate(results[name]):
            problem = rec.get("error") or rec.get("crash") or verdict(rec)
            if problem:
                problems.append(f"rank {rank}: {problem}\n  {spec}")
        recs.append(results[name][0])
    assert not problems, "\n".join(problems)
    sharded = sum(r["sharded"] for r in recs)
    assert sharded >= MIN_SHARDED * len(recs), f"only {sharded}/{len(recs)} sharded:\n{_summary(recs)}"
