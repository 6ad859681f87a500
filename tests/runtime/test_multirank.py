"""Spawned gloo ranks (N = 2 and 4): every strategy x mask x {MHA, GQA} x {fp32, bf16}, forward and
backward, against float64 attention on the full sequence; plus DeviceMesh / ProcessGroup groups,
fail-fast shape checks, the Ulysses head error, timing records, and a rank killed mid-ring."""

import multirank_bodies as bodies
import pytest
from ring_harness import run_ranks

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("world, seq_len", [(2, 11), (4, 19)])
def test_all_strategies_masks_and_dtypes(world, seq_len):
    # seq_len divides neither N nor 2N: shards are padded and the padding masked
    results = run_ranks(bodies.combinations_body, world, 420.0, seq_len)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures[:40])


def test_device_mesh_dimension_and_explicit_group():
    results = run_ranks(bodies.mesh_and_group_body, 4, 180.0, 10)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


def test_killed_rank_raises_communication_error_within_timeout():
    timeout = 5.0
    results = run_ranks(bodies.killed_rank_body, 3, 120.0, timeout, allow_missing=(2,))
    assert results[2] is None  # the victim died without reporting
    for rank, r in enumerate(results[:2]):
        assert r["raised"] == "CommunicationError", (rank, r)
        assert f"rank {rank} of 3" in r["message"] and "ring step" in r["message"], r["message"]
        assert r["seconds"] < 3 * timeout + 5, r
