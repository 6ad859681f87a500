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
    "reformer",  # axial position widths (64, 192) must sum to the shrunk hidden size
    "musicgen",  # the decoder reads num_codebooks rows of ids per sequence
    "perceiver",  # main input ``inputs`` also taken as input_ids; d_latents and per-block counts (retry)
    "dots3_note_text",  # per-layer overrides (sliding layers with 64 heads of their own) shrunk too
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


def test_hidden_splits_follow(zoo):
    from transformers import ReformerConfig

    cfg = zoo.shrink_config(ReformerConfig, "eager")
    assert sum(cfg.axial_pos_embds_dim) == cfg.hidden_size == 32


def test_layer_overrides_shrink_consistently(zoo):
    """Dots3's sliding layers override heads, K/V rank and widths: shrunk like the global fields, and
    their head_dim stays qk_nope_head_dim + qk_rope_head_dim (the config refuses it otherwise)."""
    cls = zoo.config_class("dots3_note_text") if "dots3_note_text" in zoo.families() else None
    if cls is None:
        pytest.skip("dots3_note_text is not in this transformers")
    cfg = zoo.shrink_config(cls, "eager", broad=True)
    for i, kind in enumerate(cfg.layer_types):
        layer = cfg.per_layer_config[i]
        assert layer.num_attention_heads == layer.num_key_value_heads == 4, (i, kind)
        assert layer.kv_lora_rank == 8
        if kind == "sliding_attention":
            assert layer.head_dim == layer.qk_nope_head_dim + layer.qk_rope_head_dim


def test_codebook_inputs(zoo):
    if "musicgen" not in zoo.families():
        pytest.skip("musicgen is not in this transformers")
    model, inputs = zoo.build("musicgen", "eager")
    assert inputs["input_ids"].shape == (zoo.B * model.config.num_codebooks, zoo.S)


def test_broad_rules_only_on_retry(zoo):
    """The retry-only spellings leave a config that builds without them as it was (the running zoo's
    table stays valid): Funnel's d_inner keeps its default on the first attempt."""
    from transformers import FunnelConfig, PerceiverConfig

    assert zoo.shrink_config(FunnelConfig, "eager").d_inner == FunnelConfig().d_inner
    assert zoo.shrink_config(PerceiverConfig, "eager").d_latents == PerceiverConfig().d_latents
    assert zoo.shrink_config(PerceiverConfig, "eager", broad=True).d_latents == 32


@pytest.mark.parametrize("family,words", [
    ("gpt-sw3", "same model class and config class as family gpt2"),
    ("gemma3", "multimodal"),
    ("gemma4_assistant", "the default config does not build"),  # its validator refuses its defaults
    ("voxtral_realtime", "no text family to run instead: input_ids alone fail"),
    ("gemma4_unified_assistant", "needs shared_kv_states"),  # a draft model: its target's K/V states
])
def test_skips_say_why(zoo, family, words):
    if family not in zoo.families():
        pytest.skip(f"{family} is not in this transformers")
    rec = zoo.build_check(family)
    assert rec["status"] == "skipped" and words in rec["reason"], rec


def test_canonical_twin_is_not_skipped(zoo):
    assert zoo.duplicate_of("gpt2") is None


@pytest.mark.parametrize("family", ["deepseek_v32", "kolibri1_1"])
def test_sparse_indexer_selects_at_the_test_length(zoo, family):
    """A sparse-attention indexer's counts (index_topk keys per query, Kolibri's pool, local and sink
    tokens) at their defaults keep every key of an S-long input, so the zoo never ran the selection:
    they shrink below S (and stay consistent: the pool a multiple of the block it averages)."""
    if family not in zoo.families():
        pytest.skip(f"{family} is not in this transformers")
    cfg = zoo.shrink_config(zoo.config_class(family), "eager")
    counts = {k: v for k, v in vars(cfg).items() if k.startswith("index_") and type(v) is int
              and "heads" not in k and "dim" not in k}
    assert counts and all(v < zoo.S for v in counts.values()), counts
    if "index_pool_size" in counts:
        assert counts["index_pool_size"] % counts["index_compression"] == 0, counts
        assert counts["index_topk"] + counts["index_num_local_tokens"] + counts["index_num_sink_tokens"] \
            < zoo.S, counts  # the per-query budget: queries seeing more keys than it select


def test_kolibri_indexer_drops_keys(zoo):
    """The tiny Kolibri 1.1 really attends to fewer keys than causal attention keeps (so its zoo rows
    cover the data-dependent selection mask, not a causal mask under another name)."""
    if "kolibri1_1" not in zoo.families():
        pytest.skip("kolibri1_1 is not in this transformers")
    import torch

    model, inputs = zoo.build("kolibri1_1", "sdpa")
    model = model.float()
    kept: list[int] = []
    for mod in model.modules():
        if type(mod).__name__ == "Kolibri1_1Indexer":
            mod.register_forward_hook(lambda _m, _i, out: kept.append(int(out[0].sum())))
    with torch.no_grad():
        model(**inputs)
    b, s = inputs["input_ids"].shape
    assert kept and all(k < b * s * (s + 1) // 2 for k in kept), kept


def test_layers_reach_the_first_kv_borrower(zoo):
    """A per-layer map to earlier layers (Kolibri 1.1's kv_source_layers) keeps enough layers for one
    layer that reads another's K/V, so the zoo runs cross-layer K/V sharing."""
    if "kolibri1_1" not in zoo.families():
        pytest.skip("kolibri1_1 is not in this transformers")
    cfg = zoo.shrink_config(zoo.config_class("kolibri1_1"), "eager")
    assert "reuse" in cfg.kv_sharing_modes, cfg.kv_source_layers
    assert cfg.num_hidden_layers <= 12
