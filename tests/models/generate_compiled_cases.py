"""Cases for compiled generate over a sharded KV cache (importable by spawned ranks).

``m.forward = torch.compile(m.forward, backend="ring")`` with ``sharded_cache(..., compiled=True)``
against the same model's eager generate with HF's own DynamicCache in one process."""

from __future__ import annotations

from generate_cases import build, generate

MAX_CACHE = 24   # prompt 11 + 8 new tokens needs 18 slots


def _compiled(family: str, rank: int, world: int) -> dict:
    import torch._dynamo
    from transformers import DynamicCache

    from ringcompile import backend
    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    model, ids, mask = build(family)
    one_process = DynamicCache()
    want_tokens, want_logits = generate(model, ids, mask, one_process)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in one_process.layers)
    slots = one_process.get_seq_length()
    before = len(backend.HISTORY)
    model.forward = torch.compile(model.forward, backend="ring")
    cache = sharded_cache(model.config.num_hidden_layers, rank, world, max_cache_len=MAX_CACHE, compiled=True)
    tokens, logits = generate(model, ids, mask, cache)
    graphs = backend.HISTORY[before:]
    decisions = [d for g in graphs for d in g.decisions]
    return {"same_tokens": bool(torch.equal(tokens, want_tokens)),
            "logit_error": float((logits - want_logits).abs().max()),
            "graphs": len(graphs),
            "decode_rewrites": sum(d.stage == "decode" for d in decisions),
            "unsharded": [d.reason for d in decisions if d.leaves_attention_unsharded],
            "cache_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers),
            "slot_bytes": full_bytes / slots,    # all layers' K and V of one global slot
            "filled": [layer.filled() for layer in cache.layers], "global_len": slots}


def llama(rank: int, world: int) -> dict:
    return _compiled("llama", rank, world)
