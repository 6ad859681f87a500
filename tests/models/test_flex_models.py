"""HF Llama with attn_implementation="flex_attention" under backend="ring", unchanged model code.

Eval, no grad (PyTorch refuses flex backward on CPU while tracing): logits on 2 gloo ranks equal
the same model in one process, and the flex site is rewritten and the graph sequence-sharded.
The training path (backward through the rewritten op) runs on CUDA only (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import run_cases  # noqa: E402

V, S, B = 97, 24, 2


def _llama(impl: str = "flex_attention"):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_key_value_heads=2, vocab_size=V, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                         attn_implementation=impl, use_cache=False)
    return tf.LlamaForCausalLM(cfg)


def _compare(device: str = "cpu", padded: bool = False) -> dict:
    from ringcompile import backend
    from ringcompile.ops import RingCall, is_ring_call
    from ringcompile.runtime.local import mask_structure

    torch._dynamo.reset()
    model = _llama().to(device).eval()
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3)).to(device)
    kwargs = {"input_ids": ids}
    if padded:  # right padding: HF's and_masks(causal, padding_mask_function(attention_mask))
        kwargs["attention_mask"] = torch.ones(B, S, dtype=torch.long, device=device)
        kwargs["attention_mask"][1, S - 7:] = 0
    first = len(backend.HISTORY)
    with torch.no_grad():
        ref = model(**kwargs).logits.double()
        compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
        out = compiled(**kwargs).logits
    entries = [e for e in backend.HISTORY[first:] if e.sites or e.fallback_reason]
    rings = [RingCall.from_node(n).spec.mask for e in entries if e.graph is not None
             for n in e.graph.graph.nodes if is_ring_call(n)]
    return {
        "err": (out.double() - ref).abs().max().item() / ref.abs().max().item(),
        "sites": [(s.pattern, s.mask_description, s.rewritten) for e in entries for s in e.sites],
        "fallbacks": [e.fallback_reason for e in entries if e.fallback_reason],
        "sharded": [e.graph.meta.get("ringcompile_shard") is not None for e in entries if e.sites],
        "kinds": [m.kinds for m in rings],
        # a block above the diagonal, decided from indices alone (causal tile skipping, no data read)
        "upper_block": [mask_structure(m, 0, S // 4 - 1, S // 2, S - 1) for m in rings],
    }


def case_hf_llama_flex(rank, world):
    return _compare()


def case_hf_llama_flex_padded(rank, world):
    return _compare(padded=True)


@pytest.mark.multirank
def test_hf_llama_flex_on_two_ranks_equals_one_process():
    """Without attention_mask HF states causality over position_ids (packed-sequence remap), with one it
    ands causal with padding_mask_function: causal & document / causal & padding, causal tiles skipped."""
    names = ["case_hf_llama_flex", "case_hf_llama_flex_padded"]
    results = run_cases("test_flex_models", names, world=2, timeout=400)
    for name, kinds in zip(names, [("causal", "document"), ("causal", "padding")], strict=True):
        for got in results[name]:
            assert got is not None and "error" not in got, got
            assert got["fallbacks"] == [] and got["err"] < 1e-5, got
            assert [p for p, _, ok in got["sites"] if ok] == ["flex_attention"], got["sites"]
            assert got["kinds"] == [kinds] and got["upper_block"] == ["empty"], got
            assert got["sharded"] == [True], got


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs CUDA while tracing")
def test_flex_training_through_the_ring_op_cuda():
    """Backward through the rewritten op: input gradients equal a float64 eager reference (world size 1)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from ringcompile import backend

    torch._dynamo.reset()
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 32, device=dev, generator=g, requires_grad=True) for _ in range(3))
    slopes = torch.rand(4, device=dev, generator=g)

    def fn(q, k, v):
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 256, 256, device=dev)
        return flex_attention(q, k, v, block_mask=mask,
                              score_mod=lambda s, b, h, qi, ki: s + slopes[h] * (ki - qi))

    out = torch.compile(fn, backend="ring", options={"inner": "eager"})(q, k, v)
    assert backend.HISTORY[-1].fallback_reason is None and backend.HISTORY[-1].sites[0].rewritten
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) * 32 ** -0.5
    i = torch.arange(256, device=dev)
    s = s + slopes.double().view(1, -1, 1, 1) * (i.view(1, 1, 1, -1) - i.view(1, 1, -1, 1))
    s = s.masked_fill(i.view(1, 1, 1, -1) > i.view(1, 1, -1, 1), float("-inf"))
    ref = torch.softmax(s, -1) @ vd
    refs = torch.autograd.grad(ref, (qd, kd, vd), dout.double())
    assert (out.double() - ref).abs().max() < 2e-2
    for a, b in zip(grads, refs, strict=True):
        assert (a.double() - b).abs().max() / b.abs().max() < 2e-2
