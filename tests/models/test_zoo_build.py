"""benchmarks/zoo.py's generic tiny configs, one process, no ranks: families whose configs need more
than field-by-field shrinking build and run one eager forward, and the skipped ones say why."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.fixture(scope="module")
def zoo():
    pytest.importorskip("transformers")
    import zoo

    return zoo


@pytest.mark.parametrize("family", [
    "zamba",    # a derived field (attention_hidden_size = 2 * hidden_size) follows the shrunk hidden size
    "zamba2",   # a derived fixed-length layer pattern is cut to the shrunk layer count
    "t5gemma",  # a composite config (encoder, decoder) shrunk part by part
    "dots1",    # defaults leave n_routed_experts None: filled on the retry
    "xmod",     # default_language None: the first of its languages
    "neomme",   # 2-D RoPE on a quarter of the head: the retry with heads of 16
])
def test_tiny_config_builds_and_runs(zoo, family):
    if family not in zoo.families():
        pytest.skip(f"{family} is not in this transformers")
    rec = zoo.build_check(family)
    assert rec["status"] == "runs", rec
    model, _ = zoo.build(family, "eager")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # tiny, not the default sizes


def test_shrunk_derived_field_follows(zoo):
    from transformers import ZambaConfig

    cfg = zoo.shrink_config(ZambaConfig, "eager")
    assert cfg.hidden_size == 32 and cfg.attention_hidden_size == 2 * cfg.hidden_size


@pytest.mark.parametrize("family,words", [
    ("gpt-sw3", "same model class and config class as family gpt2"),
    ("gemma3", "multimodal"),
])
def test_skips_say_why(zoo, family, words):
    if family not in zoo.families():
        pytest.skip(f"{family} is not in this transformers")
    rec = zoo.build_check(family)
    assert rec["status"] == "skipped" and words in rec["reason"], rec


def test_canonical_twin_is_not_skipped(zoo):
    assert zoo.duplicate_of("gpt2") is None
