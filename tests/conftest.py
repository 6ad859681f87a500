"""Shared test settings: deterministic hypothesis profile sized for a 2-core CI machine.

Environment: ``RING_HYPOTHESIS_EXAMPLES`` sets the example count of every hypothesis test that does not
set its own (20); ``RING_REWRITE_EXAMPLES`` sets the rewriting property's
(``tests/passes/test_find_attention_hypothesis.py``: 500 per CI run, 10000 for a long run).
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=int(os.environ.get("RING_HYPOTHESIS_EXAMPLES", "20")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture
def fresh_dynamo_small_blocks(monkeypatch):
    """A clean Dynamo cache around each test, and 8-token CPU blocks so tiny shapes still cut into pairs."""
    import torch

    from ringcompile.runtime import local

    torch._dynamo.reset()
    monkeypatch.setattr(local, "DEFAULT_BLOCK", 8)
    yield
    torch._dynamo.reset()
