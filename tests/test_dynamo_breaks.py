"""A checkpointed region that Dynamo graph-breaks at runs eagerly, outside every graph the backend sees:
the backend says so (the attention in it is not sharded), and the Dynamo setting it names removes the break.
transformers >= 5.25 with Hugging Face's ``kernels`` installed hits one in every checkpointed layer (its
hub-kernel layers set a global context variable in forward)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class _Flag:
    value = None


FLAG = _Flag()


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FLAG.value = (FLAG.value or 0) + 1  # a side effect outside the checkpoint's scope, not undone
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False).sum()


def _run(caplog, model, inputs, **config) -> tuple[list[str], int]:
    """(the checkpoint warnings, the attention sites rewritten) of one compiled call, checked vs eager."""
    from ringcompile import backend

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref = model(**inputs)
    ref = ref.loss if hasattr(ref, "loss") else ref
    caplog.clear()
    first = len(backend.HISTORY)
    with caplog.at_level(logging.WARNING, logger="ringcompile"), torch._dynamo.config.patch(**config):
        out = torch.compile(model, backend="ring", options={"inner": "eager"})(**inputs)
    out = out.loss if hasattr(out, "loss") else out
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)
    sites = sum(len(e.sites) for e in backend.HISTORY[first:])
    return [r.getMessage() for r in caplog.records if "checkpointed region" in r.getMessage()], sites


def test_a_checkpoint_graph_break_is_reported(caplog):
    torch.manual_seed(0)
    warned, _ = _run(caplog, Model().double(), {"x": torch.randn(2, 8, 16, dtype=torch.float64)})
    assert warned and "not sharded" in warned[0], warned


def _hf_llama():
    import warnings

    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa", use_cache=False)
    model = tf.LlamaForCausalLM(cfg).double().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    return model, {"input_ids": ids, "labels": ids}


def test_hf_gradient_checkpointing_with_hub_kernels_is_reported_then_fixed_by_the_named_setting(caplog):
    pytest.importorskip("kernels")  # transformers >= 5.25 requires it; older ones do not break here
    model, inputs = _hf_llama()
    warned, sites = _run(caplog, model, inputs)
    if not warned:
        pytest.skip("this transformers / kernels pair does not graph-break at its checkpointed layers")
    assert sites == 0 and "skip_fwd_side_effects_in_bwd_under_checkpoint" in warned[0], (sites, warned)
    warned, sites = _run(caplog, model, inputs, skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    assert not warned and sites == 2, (sites, warned)
