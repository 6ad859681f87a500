"""DeBERTa-v2's disentangled relative-position bias on merged-head scores is a site (issue 10).

The c2p / p2c terms are ``bmm(q, pos_k^T)`` / ``bmm(k, pos_q^T)`` gathered over a relative-position
index and added to the (B*H, S, S) scores before their (B, H, S, S) view: the chain is lifted from the
matmul at (b*H + h, q, kv), the gathers become lookups of the (B*H, S, 2*span) products at
(q_idx, kv_idx)-dependent positions (score extras, all-gathered along the sequence on 2 ranks). Logits
and every gradient (the relative embeddings' included: reduced once) against the same model in one
process, at world 1 and on 2 gloo ranks. Also Falcon's ALiBi path in float64 (a float64 finfo.min
where-mask lifted into the mod, in-place scaling) on 2 ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "models"))

TOL = 1e-10
# transformers >= 5.25 runs Falcon's eager softmax in float32 (``softmax(..., dtype=torch.float32)``) even in
# a float64 model, so the one-process reference rounds its probabilities to float32 (~1e-8 apart from the
# ring, which computes in the inputs' float64)
FALCON_TOL = 1e-6


def _check(res: dict, world: int, pattern: str | None, tol: float = TOL) -> None:
    assert "error" not in res, res.get("error")
    assert not res["fallbacks"], res["fallbacks"]
    assert res["sites"] and all(ok for _, ok, _ in res["sites"]), res["sites"]
    assert pattern is None or all(p == pattern for p, _, _ in res["sites"]), res["sites"]
    assert world == 1 or any(res["sharded"]), "the graph was not sequence-sharded"
    assert res["out"] < tol, res["out"]
    bad = {k: v for k, v in res["grads"].items() if not v < tol}
    assert not bad, bad


def test_relative_bias_world1_c2p_unpadded():
    pytest.importorskip("transformers")
    import merged_head_cases as cases

    res = cases.compare("v2-c2p", pad=False)
    _check(res, 1, "bmm+view")
    assert "deberta.encoder.rel_embeddings.weight" in res["grads"]


@pytest.fixture(scope="module")
def two_ranks():
    pytest.importorskip("transformers")
    from harness import run_cases

    return run_cases("merged_head_cases", ["case_v3_padded", "case_falcon_alibi"], world=2, timeout=400)


@pytest.mark.multirank
def test_relative_bias_two_ranks_bucketed_c2p_p2c_padded(two_ranks):
    for res in two_ranks["case_v3_padded"]:
        _check(res, 2, "bmm+view")
        assert "deberta.encoder.rel_embeddings.weight" in res["grads"]
        assert any("every key masked" in n for n in res["notes"]), res["notes"]


@pytest.mark.multirank
def test_falcon_alibi_float64_finfo_min_mask_two_ranks(two_ranks):
    # the lifted where(causal, 0.0, finfo(float64).min) overflowed float32 inside the mod and raised
    for res in two_ranks["case_falcon_alibi"]:
        _check(res, 2, None, tol=FALCON_TOL)
