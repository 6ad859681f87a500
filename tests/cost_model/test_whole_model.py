"""``estimate_memory``: per-rank memory of a whole model from its rewritten graph on fake tensors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ringcompile.cli import main
from ringcompile.cost_model.model_plan import parse_bytes
from ringcompile.cost_model.whole_model import MemoryModel, estimate_memory
from ringcompile.demo import activation_bytes
from ringcompile.errors import OptionError
from ringcompile.models import ModelConfig, build_model

CFG = ModelConfig(vocab=64, dim=32, layers=2, heads=4, kv_heads=2, max_seq=4096)


@pytest.fixture(scope="module")
def llama_memory():
    model = build_model("llama", CFG, seed=0)
    ids = torch.randint(0, CFG.vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, MemoryModel.capture(model, ids, ids, options={"inner": "eager"})


def test_estimate_matches_measured_saved_activations(llama_memory):
    model, memory = llama_memory
    seq = 96
    ids = torch.randint(0, CFG.vocab, (1, seq), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    _, measured = activation_bytes(lambda: compiled(ids, ids)[1].backward(), list(model.parameters()))
    torch._dynamo.reset()
    est = memory.estimate(1, seq)
    assert abs(est.terms["activations"] / measured - 1) <= 0.15, (est.terms, measured)
    n_params = sum(p.numel() for p in model.parameters())
    assert est.terms["parameters"] == est.terms["gradients"] == 4 * n_params


def test_activations_shrink_with_the_world_and_the_table_prints(llama_memory):
    _, memory = llama_memory
    seq = 4096
    one, two, four = (memory.estimate(n, seq, optimizer="adam") for n in (1, 2, 4))
    assert two.local_len == 2048 and four.local_len == 1024
    assert 0.45 <= two.terms["activations"] / one.terms["activations"] <= 0.55
    assert 0.2 <= four.terms["activations"] / one.terms["activations"] <= 0.3
    assert one.terms["communication"] == 0 < two.terms["communication"]
    assert one.terms["optimizer"] == 2 * one.terms["parameters"]  # fp32 model: two fp32 moments
    assert four.per_rank_peak == sum(four.terms.values()) < one.per_rank_peak
    text = str(four)
    for term in ("parameters", "gradients", "optimizer", "activations", "attention_buffers", "peak"):
        assert term in text
    half = memory.estimate(2, seq, dtype=torch.bfloat16)
    assert half.terms["parameters"] * 2 == two.terms["parameters"]


class _CheckpointedGPT(torch.nn.Module):
    """gpt2-style blocks, each under non-reentrant activation checkpointing."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.inner = build_model("gpt2", ModelConfig(vocab=64, dim=32, layers=2, heads=4, kv_heads=4,
                                                     max_seq=4096), seed=0)
        self.checkpointed = checkpointed

    def forward(self, ids):
        m = self.inner
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = m.wte(ids) + m.wpe(pos)[None]
        for block in m.h:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return m.lm_head(m.ln_f(x)).float().logsumexp(-1).mean()


def test_checkpointing_lowers_the_estimate_under_inductor():
    ids = torch.randint(0, 64, (1, 16))
    kept = estimate_memory(_CheckpointedGPT(False), ids, world_size=2, seq_len=2048)
    recomputed = estimate_memory(_CheckpointedGPT(True), ids, world_size=2, seq_len=2048)
    assert kept.attention_calls == recomputed.attention_calls == 2
    assert recomputed.terms["activations"] < 0.7 * kept.terms["activations"], (kept.terms, recomputed.terms)


def test_bad_arguments_are_clear(llama_memory):
    _, memory = llama_memory
    with pytest.raises(OptionError, match="optimizer must be one of"):
        memory.estimate(2, 128, optimizer="lion")
    with pytest.raises(OptionError, match="cannot read"):
        parse_bytes("eighty gigs")
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("40 GB") == 40 * 10**9


def test_plan_cli_finds_the_smallest_world_that_fits(capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    config = str(tmp_path / "config.json")
    rc = main(["plan", "--model", config, "--seq", "65536", "--memory-budget", "160MiB", "--dtype",
               "float32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(x for x in out.splitlines() if x.startswith("smallest world size that fits"))
    world = int(line.rsplit(" ", 1)[1])
    assert world > 1 and f"N={world} " in out  # the attention plan follows at that size
    assert "activations" in out and "strategy" in out
