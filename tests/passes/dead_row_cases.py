"""Attention functions whose finite masking constant leaves some query rows with no kept key.

Importable by spawned ranks. ``compare(name, rank, world)`` compiles the function with
``backend="ring"`` and returns the largest absolute error of the output and of dq/dk/dv over ALL
rows against the same function in float64 eager on the full inputs (fresh random inputs from a
per-case seed, identical on every rank).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, H, S, D = 2, 2, 12, 4
f64 = torch.float64


def _scores(q, k):
    return q @ k.transpose(-1, -2) / math.sqrt(D)


def deberta_query_padding_fill(q, k, v, am):
    """DeBERTa: mask[b, q] * mask[b, kv], masked_fill with finfo.min (padded query rows keep nothing)."""
    m = (am[:, None, :, None] * am[:, None, None, :]).bool()
    return _scores(q, k).masked_fill(~m, torch.finfo(q.dtype).min).softmax(-1) @ v


def bert_additive_empty_row(q, k, v, am):
    """BERT's additive (1 - mask) * finfo.min with a batch row of only padding."""
    ext = (1.0 - am[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    return (_scores(q, k) + ext).softmax(-1) @ v


def hf_left_padding_causal(q, k, v, am):
    """HF eager causal LM, left padding: a finfo.min causal+padding mask added to the scores."""
    fmin = torch.finfo(q.dtype).min
    causal = torch.full((S, S), fmin, dtype=q.dtype).triu(1)
    mask = causal[None, None].expand(B, 1, S, S).masked_fill(am[:, None, None, :] == 0, fmin)
    return (_scores(q, k) + mask).softmax(-1) @ v


def softcap_minus_10000(q, k, v, am):
    """-10000 added after a softcap (so it provably masks live rows): dead rows see softmax(softcap(s))."""
    s = torch.tanh(_scores(q, k) / 5.0) * 5.0
    return (s + (1.0 - am[:, None, None, :].to(q.dtype)) * -10000.0).softmax(-1) @ v


def sdpa_left_padding_causal(q, k, v, am):
    """HF sdpa path: the same finfo.min mask as SDPA's float attn_mask."""
    fmin = torch.finfo(q.dtype).min
    causal = torch.full((S, S), fmin, dtype=q.dtype).triu(1)
    mask = causal[None, None].expand(B, 1, S, S).masked_fill(am[:, None, None, :] == 0, fmin)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


CASES = {f.__name__: f for f in (deberta_query_padding_fill, bert_additive_empty_row, hf_left_padding_causal,
                                 softcap_minus_10000, sdpa_left_padding_causal)}


def inputs(name: str):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, k, v = (torch.randn(B, H, S, D, dtype=f64, generator=g) for _ in range(3))
    am = torch.ones(B, S, dtype=torch.long)
    if name.startswith(("hf_", "sdpa_")):
        am[1, :5] = 0  # left padding: query rows 0..4 of batch 1 see only padded keys
    elif name.startswith(("bert", "softcap")):
        am[1] = 0  # an empty batch row
        am[0, -3:] = 0
    else:
        am[0, -4:] = 0
        am[1, 3:] = 0
    return q, k, v, am


def compare(name: str, rank: int = 0, world: int = 1) -> dict:
    from ringcompile import backend

    fn = CASES[name]
    q, k, v, am = inputs(name)
    torch._dynamo.reset()
    first = len(backend.HISTORY)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(fn, backend="ring", dynamic=False, options={"inner": "eager"})(*leaves, am)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    # SDPA's math backend is autograd of softmax; PyTorch's fused CPU SDPA backward gives other
    # gradients for rows whose keys are all at finfo.min (its forward agrees)
    with sdpa_kernel(SDPBackend.MATH):
        ref = fn(*ref_leaves, am)
        dout = torch.randn(ref.shape, dtype=f64, generator=torch.Generator().manual_seed(3))
        want = torch.autograd.grad(ref, ref_leaves, dout)
    got = torch.autograd.grad(out, leaves, dout)
    entries = backend.HISTORY[first:]
    return {"out": (out - ref).abs().max().item(),
            "grads": {n: (a - b).abs().max().item() for n, a, b in zip("qkv", got, want, strict=True)},
            "rewritten": sum(backend.rewritten_op_count(e.graph) for e in entries if e.graph is not None),
            "fallbacks": [e.fallback_reason for e in entries if e.fallback_reason],
            "notes": [n for e in entries for s in e.sites for n in s.notes]}


def all_cases_body(rank: int, world: int) -> dict:
    return {name: compare(name, rank, world) for name in CASES}


def hf_llama_left_padding(impl: str = "eager") -> dict:
    """A tiny HF Llama (float32), batch row 1 left padded: logits on ALL rows and every parameter's
    gradient against the same model in one process (SDPA's math backend for the reference)."""
    import copy

    import transformers as tf

    from ringcompile import backend

    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).float().eval()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(11)
    x = {"input_ids": torch.randint(1, 50, (2, S), generator=g),
         "attention_mask": torch.ones(2, S, dtype=torch.long)}
    x["attention_mask"][1, :4] = 0
    torch._dynamo.reset()
    first = len(backend.HISTORY)
    out = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})(**x).logits
    with sdpa_kernel(SDPBackend.MATH):
        r_out = ref(**x).logits
        dout = torch.randn(r_out.shape, generator=g)
        (r_out * dout).sum().backward()
    (out * dout).sum().backward()
    entries = backend.HISTORY[first:]
    return {"out": ((out - r_out).abs().max() / r_out.abs().max()).item(),
            "grads": {n: (p.grad - q.grad).abs().max().item() / q.grad.abs().max().item()
                      for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True)
                      if q.grad is not None and q.grad.abs().max() > 0},
            "rewritten": sum(backend.rewritten_op_count(e.graph) for e in entries if e.graph is not None),
            "fallbacks": [e.fallback_reason for e in entries if e.fallback_reason],
            "notes": [n for e in entries for s in e.sites for n in s.notes]}
