"""Cases for multi-turn generate and crop over a compiled sharded KV cache (importable by spawned ranks).

Turn 1 generates from a prompt; turn 2 appends a new chunk of user tokens to the whole conversation
and generates again with the same cache (its first forward has query length > 1 against a cache that
already holds tokens: ``chunk_cache_attention``); then the cache is cropped (speculative decoding's
rollback) and decoding continues. The reference is the same model doing the same steps eagerly in
one process with HF's own DynamicCache."""

from __future__ import annotations

import logging

import torch
from generate_cases import build
from generate_compiled_cases import _Caught, _generate_with_cache

CHUNK, NEW = 5, 4
MAX_CACHE = 40          # prompt 11 + 4 + chunk 5 + 4, cropped by 3 and 4 more: fits


def _generate(model, ids, mask, cache, with_cache: bool = False):
    """Greedy NEW tokens: (prompt + new tokens, logits[, the cache generate used])."""
    new, logits, used = _generate_with_cache(model, ids, mask, cache, new=NEW)
    sequences = torch.cat([ids, new], 1)
    return (sequences, logits, used) if with_cache else (sequences, logits)


def _prepared_two_turns(model, ids, mask, chunk, max_cache_len: int) -> dict:
    """``prepare(model, max_cache_len=M)``: turn 1 with no cache gets a compiled sharded cache; turn 2
    passes the cache generate returned, which prepare reuses as it is."""
    from ringcompile.serving import prepare
    from ringcompile.serving.compiled_cache import CompiledShardedLayer

    prepare(model, max_cache_len=max_cache_len)
    seq1, logits1, cache = _generate(model, ids, mask, None, with_cache=True)
    ids2 = torch.cat([seq1, chunk], 1)
    mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], 1)
    seq2, logits2, cache2 = _generate(model, ids2, mask2, cache, with_cache=True)
    return {"turns": [(seq1, logits1), (seq2, logits2)], "reused": cache2 is cache,
            "sharded": all(isinstance(layer, CompiledShardedLayer) for layer in cache.layers)}


def _conversation(model, ids, mask, cache, chunk) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(sequences, logits) of turn 1, turn 2 (a new chunk), the continuation after crop(-3) and turn 3
    (a chunk of another length: Dynamo may make the query length dynamic)."""
    seq1, logits1 = _generate(model, ids, mask, cache)
    ids2 = torch.cat([seq1, chunk], 1)
    mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], 1)
    seq2, logits2 = _generate(model, ids2, mask2, cache)
    cache.crop(-3)
    kept = int(cache.get_seq_length())
    mask3 = torch.cat([mask2, torch.ones_like(seq2[:, mask2.shape[1]:])], 1)[:, :kept + 1]
    seq3, logits3 = _generate(model, seq2[:, :kept + 1], mask3, cache)     # one uncached token
    ids4 = torch.cat([seq3, chunk[:, :3]], 1)          # turn 3: a chunk of another length
    mask4 = torch.cat([mask3, torch.ones_like(ids4[:, mask3.shape[1]:])], 1)
    seq4, logits4 = _generate(model, ids4, mask4, cache)
    return [(seq1, logits1), (seq2, logits2), (seq3, logits3), (seq4, logits4)]


def multiturn(rank: int, world: int) -> dict:
    import ringcompile.cost_model.decode as cost_decode
    import torch._dynamo
    from transformers import DynamicCache

    from ringcompile import backend
    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    model, ids, mask = build("llama")
    chunk = torch.randint(3, 96, (ids.shape[0], CHUNK), generator=torch.Generator().manual_seed(7))
    want = _conversation(model, ids, mask, DynamicCache(), chunk)
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    plain_choose = cost_decode.choose_chunk_method
    out: dict = {}
    for method in ("pass_kv", "pass_q"):
        asked: list[str] = []

        def choose(*args, method=method, asked=asked, **kwargs):
            asked.append(plain_choose(*args, **kwargs))     # what the cost model would take
            return method

        cost_decode.choose_chunk_method = choose
        before = len(backend.HISTORY)
        cache = sharded_cache(model.config.num_hidden_layers, rank, world, max_cache_len=MAX_CACHE,
                              compiled=True)
        try:
            got = _conversation(model, ids, mask, cache, chunk)
        finally:
            cost_decode.choose_chunk_method = plain_choose
        decisions = [d for g in backend.HISTORY[before:] for d in g.decisions]
        out[method] = {
            "same_tokens": [bool(torch.equal(g[0], w[0])) for g, w in zip(got, want, strict=True)],
            "logit_error": max(float((g[1] - w[1]).abs().max()) for g, w in zip(got, want, strict=True)),
            "chunk_rewrites": sum(d.outcome == "chunk_cache_attention" for d in decisions),
            "chunk_calls": len(asked), "cost_model_choice": sorted(set(asked)),
            "filled": [layer.filled() for layer in cache.layers], "global_len": int(cache.get_seq_length()),
            "unsharded": [d.reason for d in decisions if d.leaves_attention_unsharded]}
    with _Caught() as caught:
        prepared = _prepared_two_turns(model, ids, mask, chunk, MAX_CACHE)
    out["prepared"] = {
        "same_tokens": [bool(torch.equal(g[0], w[0])) for g, w in zip(prepared["turns"], want, strict=False)],
        "logit_error": max(float((g[1] - w[1]).abs().max()) for g, w in zip(prepared["turns"], want,
                                                                              strict=False)),
        "reused": prepared["reused"], "sharded": prepared["sharded"],
        "warnings": [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]}
    return out


def multiturn_zigzag(rank: int, world: int) -> dict:
    """A 12-token prompt (2N divides it: the prefill graph and the cache take zigzag), then the same
    conversation (chunk, crop, another chunk) with the cost model's own chunk method."""
    import torch._dynamo
    from transformers import DynamicCache

    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    model, ids, mask = build("llama")
    more = torch.randint(3, 96, (ids.shape[0], 1), generator=torch.Generator().manual_seed(2))
    ids, mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    chunk = torch.randint(3, 96, (ids.shape[0], CHUNK), generator=torch.Generator().manual_seed(7))
    want = _conversation(model, ids, mask, DynamicCache(), chunk)
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    cache = sharded_cache(model.config.num_hidden_layers, rank, world, max_cache_len=MAX_CACHE, compiled=True)
    got = _conversation(model, ids, mask, cache, chunk)
    return {"same_tokens": [bool(torch.equal(g[0], w[0])) for g, w in zip(got, want, strict=True)],
            "logit_error": max(float((g[1] - w[1]).abs().max()) for g, w in zip(got, want, strict=True)),
            "layouts": sorted({layer.prefill_layout for layer in cache.layers}),
            "filled": [layer.filled() for layer in cache.layers], "global_len": int(cache.get_seq_length())}
