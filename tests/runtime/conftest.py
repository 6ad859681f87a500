"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest
from fake_gpu import recording_triton_kernels


@pytest.fixture
def triton_on_fake_gpu(monkeypatch):
    """Triton block kernels on the stand-in GPU whose launches are recorded instead of run."""
    return recording_triton_kernels(monkeypatch)
