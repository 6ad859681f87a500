"""The built-in models compile with backend="ring": attention found, logits, loss and grads match."""

from __future__ import annotations

import pytest
import torch

from ringcompile import backend
from ringcompile.models import ModelConfig, build_model, repeat_kv

pytestmark = pytest.mark.usefixtures("fresh_dynamo_small_blocks")


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(repeat_kv(x, 2), x.repeat_interleave(2, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("name,mask,groups", [("llama", "causal", 2), ("gpt2", "causal", 1)])
def test_model_training_step_matches_eager(name, mask, groups):
    cfg = ModelConfig(layers=1, max_seq=64, kv_heads=2 if name == "llama" else 4)
    model = build_model(name, cfg, seed=1).double()
    reference = build_model(name, cfg, seed=1).double()
    ids = torch.randint(0, cfg.vocab, (2, 19))
    compiled = torch.compile(model, backend="ring", options={"inner": "eager"})
    logits, loss = compiled(ids, labels=ids)
    loss.backward()
    sites = backend.HISTORY[-1].sites
    assert [(s.mask_description, s.gqa_groups, s.rewritten) for s in sites] == [(mask, groups, True)]
    ref_logits, ref_loss = reference(ids, labels=ids)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(loss, ref_loss, atol=1e-9, rtol=1e-7)
    for (pname, p), (_, r) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-8, rtol=1e-6, msg=pname)


@pytest.mark.parametrize("arch,impl,mask", [("llama", "eager", "causal"), ("llama", "sdpa", "causal"),
                                            ("gpt2", "eager", "causal & padding"),
                                            ("bloom", "eager", "causal & padding")])
def test_transformers_models(arch, impl, mask):
    """Tiny Hugging Face models built from configs (no download): found, rewritten, equal to eager."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64)
        groups = 2
    elif arch == "bloom":  # ALiBi through baddbmm on (B*H, S, D), scores viewed to (B, H, S, S)
        cfg = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
        groups = 1
    else:
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        groups = 1
    cfg._attn_implementation = impl
    model_cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
                 "bloom": transformers.BloomForCausalLM}[arch]
    model = model_cls(cfg).eval().double()
    ids = torch.randint(0, 64, (2, 19))
    kwargs = {}
    if arch in ("gpt2", "bloom"):
        kwargs["attention_mask"] = torch.ones(2, 19, dtype=torch.long)
        kwargs["attention_mask"][1, 14:] = 0  # right padding on the second sequence
    compiled = torch.compile(model, backend="ring", options={"inner": "eager"})
    with torch.no_grad():
        got = compiled(ids, **kwargs).logits
        want = model(ids, **kwargs).logits
    sites = backend.HISTORY[-1].sites
    assert [(s.mask_description, s.gqa_groups, s.rewritten) for s in sites] == [(mask, groups, True)]
    # HF's eager Llama and Bloom run softmax in float32 even in a float64 model; the op stays in float64
    tol = 1e-6 if arch in ("llama", "bloom") and impl == "eager" else 1e-10
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)
    torch.testing.assert_close(got[1, :14], want[1, :14], atol=tol, rtol=tol)  # rows with kept keys
