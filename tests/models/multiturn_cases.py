"""Cases for multi-turn generate and crop over a compiled sharded KV cache (importable by spawned ranks).

Turn 1 generates from a prompt; turn 2 appends a new chunk of user tokens to the whole conversation
and generates again with the same cache (its first forward has query length > 1 against a cache that
already holds tokens: ``chunk_cache_attention``); then the cache is cropped (speculative decoding's
rollback) and decoding continues. The reference is the same model doing the same steps eagerly in
one process with HF's own DynamicCache."""

from __future__ import annotations

import inspect
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


def _conversation(model, ids, mask, cache, chunk, short: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """(sequences, logits) of turn 1, turn 2 (a new chunk), the continuation after crop(-3) and turn 3
    (a chunk of another length: Dynamo may make the query length dynamic); ``short``: turns 1 and 2."""
    seq1, logits1 = _generate(model, ids, mask, cache)
    ids2 = torch.cat([seq1, chunk], 1)
    mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], 1)
    seq2, logits2 = _generate(model, ids2, mask2, cache)
    if short:
        return [(seq1, logits1), (seq2, logits2)]
    cache.crop(-3)
    kept = int(cache.get_seq_length())
    mask3 = torch.cat([mask2, torch.ones_like(seq2[:, mask2.shape[1]:])], 1)[:, :kept + 1]
    seq3, logits3 = _generate(model, seq2[:, :kept + 1], mask3, cache)     # one uncached token
    ids4 = torch.cat([seq3, chunk[:, :3]], 1)          # turn 3: a chunk of another length
    mask4 = torch.cat([mask3, torch.ones_like(ids4[:, mask3.shape[1]:])], 1)
    seq4, logits4 = _generate(model, ids4, mask4, cache)
    return [(seq1, logits1), (seq2, logits2), (seq3, logits3), (seq4, logits4)]


def _forced_conversations(family: str, rank: int, world: int, methods=("pass_kv", "pass_q"),
                          short: bool = False) -> dict:
    """The conversation on a compiled sharded cache with each chunk method forced in turn, against one
    process doing the same steps: per method, the tokens / logits and what the backend did."""
    import torch._dynamo
    from transformers import DynamicCache

    import ringcompile.cost_model.decode as cost_decode
    from ringcompile import backend
    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    model, ids, mask = build(family)
    chunk = torch.randint(3, 96, (ids.shape[0], CHUNK), generator=torch.Generator().manual_seed(7))
    want = _conversation(model, ids, mask, DynamicCache(), chunk, short)
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    plain_choose = cost_decode.choose_chunk_method
    out: dict = {"model": model, "ids": ids, "mask": mask, "chunk": chunk, "want": want}
    for method in methods:
        asked: list[str] = []

        def choose(*args, method=method, asked=asked, **kwargs):
            asked.append(plain_choose(*args, **kwargs))     # what the cost model would take
            return method

        cost_decode.choose_chunk_method = choose
        before = len(backend.HISTORY)
        cache = sharded_cache(model.config.num_hidden_layers, rank, world, max_cache_len=MAX_CACHE,
                              compiled=True)
        try:
            got = _conversation(model, ids, mask, cache, chunk, short)
        finally:
            cost_decode.choose_chunk_method = plain_choose
        decisions = [d for g in backend.HISTORY[before:] for d in g.decisions]
        out[method] = {
            "same_tokens": [bool(torch.equal(g[0], w[0])) for g, w in zip(got, want, strict=True)],
            "logit_error": max(float((g[1] - w[1]).abs().max()) for g, w in zip(got, want, strict=True)),
            "chunk_rewrites": sum(d.outcome == "chunk_cache_attention" for d in decisions),
            "windowed": sum("sliding window" in d.reason for d in decisions),
            "chunk_calls": len(asked), "cost_model_choice": sorted(set(asked)),
            "filled": [layer.filled() for layer in cache.layers], "global_len": int(cache.get_seq_length()),
            "unsharded": [d.reason for d in decisions if d.leaves_attention_unsharded]}
    return out


def _public(out: dict) -> dict:
    """The picklable part of a case's result (what the parent test reads)."""
    return {k: v for k, v in out.items() if k not in ("model", "ids", "mask", "chunk", "want")}


def multiturn(rank: int, world: int) -> dict:
    out = _forced_conversations("llama", rank, world)
    model, ids, mask, chunk, want = (out[k] for k in ("model", "ids", "mask", "chunk", "want"))
    with _Caught() as caught:
        prepared = _prepared_two_turns(model, ids, mask, chunk, MAX_CACHE)
    out["prepared"] = {
        "same_tokens": [bool(torch.equal(g[0], w[0])) for g, w in zip(prepared["turns"], want, strict=False)],
        "logit_error": max(float((g[1] - w[1]).abs().max()) for g, w in zip(prepared["turns"], want,
                                                                              strict=False)),
        "reused": prepared["reused"], "sharded": prepared["sharded"],
        "warnings": [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]}
    return _public(out)


def qwen2(rank: int, world: int) -> dict:
    """Qwen2 (one KV head) through the same conversation, pass-KV and pass-Q forced."""
    return _public(_forced_conversations("qwen2", rank, world))


def mistral(rank: int, world: int) -> dict:
    """Mistral with a window (6) shorter than the cache (up to 27 slots): chunks and decode steps whose
    window leaves whole shards out."""
    return _public(_forced_conversations("mistral", rank, world))


def llama_n4(rank: int, world: int) -> dict:
    """Turns 1 and 2 of the Llama conversation at N = 4: the 5-token chunk is split 2/2/1/0 over the
    ranks (rank 3 holds only padding queries)."""
    return _public(_forced_conversations("llama", rank, world, short=True))


def llama_n4_full(rank: int, world: int) -> dict:
    """The whole Llama conversation (crop, a turn 3 chunk of another length) at N = 4 (RING_SLOW=1)."""
    return _public(_forced_conversations("llama", rank, world))


GROW_CHUNKS = (5, 9)    # turn 1 is sized 11 + 4 = 15 slots; turn 2 reaches 24 (grown to 30), turn 3 37 (60)


def _turns(model, ids, mask, cache, chunks, after_turn=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Turn 1 from the prompt, then one turn per chunk of new user tokens on the same cache (the one
    generate returned, so prepare's cache is reused); ``after_turn(cache)`` is called after each."""
    seq, m = ids, mask
    done = []
    for i, size in enumerate((0, *chunks)):
        if size:
            g = torch.Generator().manual_seed(20 + i)
            extra = torch.randint(3, 96, (ids.shape[0], size), generator=g)
            seq = torch.cat([seq, extra], 1)
            m = torch.cat([m, torch.ones_like(extra)], 1)
        new_seq, logits, cache = _generate(model, seq, m, cache, with_cache=True)
        done.append((new_seq, logits))
        m = torch.cat([m, torch.ones_like(new_seq[:, seq.shape[1]:])], 1)
        seq = new_seq
        if after_turn is not None:
            after_turn(cache)
    return done


def growing(rank: int, world: int) -> dict:
    """``prepare(model)`` without max_cache_len: turn 1's cache holds prompt + NEW slots; the later
    turns reach past it, so prepare grows the cache (doubling) before each such call. Tokens and logits
    against one process; per turn the cache length, this rank's shard capacity and the graphs
    compiled so far (the backend's and Dynamo's counts)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    from ringcompile import backend
    from ringcompile.serving import prepare

    torch._dynamo.reset()
    model, ids, mask = build("llama")
    want = _turns(model, ids, mask, DynamicCache(), GROW_CHUNKS)
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    prepare(model)
    before, unique_before = len(backend.HISTORY), counters["stats"]["unique_graphs"]
    per_turn: list[dict] = []

    def record(cache):
        layer = cache.layers[0]
        per_turn.append({"max_cache_len": layer.max_cache_len, "capacity": int(layer.keys.shape[-2]),
                         "filled": [lyr.filled() for lyr in cache.layers],
                         "global_len": int(cache.get_seq_length()),
                         "graphs": len(backend.HISTORY) - before,
                         "dynamo_graphs": counters["stats"]["unique_graphs"] - unique_before})

    with _Caught() as caught:
        got = _turns(model, ids, mask, None, GROW_CHUNKS, after_turn=record)
    decisions = [d for g in backend.HISTORY[before:] for d in g.decisions]
    return {"same_tokens": [bool(torch.equal(g[0], w[0])) for g, w in zip(got, want, strict=True)],
            "logit_error": max(float((g[1] - w[1]).abs().max()) for g, w in zip(got, want, strict=True)),
            "turns": per_turn, "unsharded": [d.reason for d in decisions if d.leaves_attention_unsharded],
            "outcomes": sorted({d.outcome for d in decisions if d.stage == "decode"}),
            "warnings": [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]}


def _draft_model():
    """A tiny random Llama draft (its proposals are mostly rejected: the main cache is cropped often)."""
    import transformers as tf

    torch.manual_seed(5)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, num_hidden_layers=1, hidden_size=16,
                                              intermediate_size=32, num_attention_heads=2,
                                              num_key_value_heads=1, max_position_embeddings=128)).eval()


def assisted(rank: int, world: int, prepared: bool = False) -> dict:
    """Assisted generation on the compiled path: a draft model, prompt lookup (on a prompt that repeats
    itself, so it has candidates to propose), and a draft model through ``prepare`` (no cache passed):
    the same tokens as plain greedy decoding in one process; the candidates' verification is a chunk
    against the sharded cache and every rejection a ``crop``."""
    import torch._dynamo
    from generate_cases import NEW, generate

    from ringcompile import backend
    from ringcompile.serving import prepare
    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    model, ids, mask = build("llama")
    ids, mask = ids[:1], mask[:1]                          # assisted generation takes one sequence
    looping = torch.cat([ids[:, :4]] * 3, 1)[:, :11]        # a prompt that repeats itself
    want = {"draft": generate(model, ids, mask)[0],
            "lookup": generate(model, looping, torch.ones_like(looping))[0]}
    draft = _draft_model()
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    out: dict = {}
    runs = [("assistant", ids, {"assistant_model": draft}, True),
            ("lookup", looping, {"prompt_lookup_num_tokens": 3}, True)]
    if prepared:        # its own process: a third run after those two passes Dynamo's recompile limit (8)
        runs = [("prepared", ids, {"assistant_model": draft}, False)]
    for label, prompt, extra, explicit in runs:
        before = len(backend.HISTORY)
        kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                  do_sample=False, pad_token_id=0, return_dict_in_generate=True, **extra)
        crops: list[int] = []
        if explicit:
            cache = sharded_cache(model.config.num_hidden_layers, rank, world, max_cache_len=MAX_CACHE,
                                  compiled=True)
            original = cache.crop
            cache.crop = lambda n, original=original, crops=crops: (crops.append(n), original(n))[1]
            name = "cache" if "cache" in inspect.signature(model.generate).parameters else "past_key_values"
            kw[name] = cache
        else:
            prepare(model)
        with torch.no_grad(), _Caught() as caught:
            res = model.generate(**kw)
        decisions = [d for g in backend.HISTORY[before:] for d in g.decisions]
        used = res.past_key_values
        out[label] = {"same_tokens": bool(torch.equal(res.sequences[:, prompt.shape[1]:],
                                                      want["lookup" if label == "lookup" else "draft"])),
                      "tokens_cropped": -sum(n for n in crops if n < 0),
                      "sharded": _is_compiled(used), "global_len": int(used.get_seq_length()),
                      "filled": [layer.filled() for layer in used.layers],
                      "outcomes": sorted({d.outcome for d in decisions if d.stage == "decode"}),
                      "graphs": len(backend.HISTORY) - before,
                      "unsharded": [d.reason for d in decisions if d.leaves_attention_unsharded],
                      "warnings": [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]}
    return out


def assisted_prepared(rank: int, world: int) -> dict:
    """A draft model through ``prepare`` (no cache passed) (RING_SLOW=1)."""
    return assisted(rank, world, prepared=True)


def _is_compiled(cache) -> bool:
    from ringcompile.serving.growth import compiled_layers

    return bool(compiled_layers(cache))


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
