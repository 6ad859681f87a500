"""Models and prompts for the sharded-cache generate tests (importable by spawned ranks).

Each family is a tiny random-initialised HF model (fixed seed, so every rank and the one-process
reference build the same weights); prompts are a batch of 2 with the second row left-padded."""

from __future__ import annotations

import inspect

import torch

PROMPT, NEW = 11, 8


def build(family: str):
    import transformers as tf

    common = dict(vocab_size=96, num_hidden_layers=2, max_position_embeddings=128, hidden_size=32,
                  intermediate_size=64, num_attention_heads=4)
    if family == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, **common)
        cls = tf.LlamaForCausalLM
    elif family == "mistral":      # a window shorter than prompt + new tokens: shards fall out of it
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=6, **common)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(num_key_value_heads=1, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=128)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return model, ids, mask


def generate(model, ids, mask, cache=None):
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
              output_logits=True, return_dict_in_generate=True)
    if cache is not None:
        name = "cache" if "cache" in inspect.signature(model.generate).parameters else "past_key_values"
        kw[name] = cache
    with torch.no_grad():
        out = model.generate(**kw)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def sharded(family: str, rank: int, world: int, max_cache_len: int | None = None) -> dict:
    from ringcompile.serving.hf import register, sharded_cache

    model, ids, mask = build(family)
    from transformers import DynamicCache

    one_process = DynamicCache()
    want_tokens, want_logits = generate(model, ids, mask, one_process)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in one_process.layers)
    register()
    model.set_attn_implementation("ring_decode")
    cache = sharded_cache(model.config.num_hidden_layers, rank, world, timeout=60.0,
                          max_cache_len=max_cache_len)
    tokens, logits = generate(model, ids, mask, cache)
    return {"same_tokens": bool(torch.equal(tokens, want_tokens)),
            "logit_error": float((logits - want_logits).abs().max()),
            "cache_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers),
            "filled_bytes": sum(layer.keys[:, :, :len(layer.slots)].nbytes * 2 for layer in cache.layers),
            "full_bytes": full_bytes, "global_len": cache.layers[0].global_len}


def llama(rank: int, world: int) -> dict:
    return sharded("llama", rank, world)


def mistral(rank: int, world: int) -> dict:
    return sharded("mistral", rank, world)


def qwen2(rank: int, world: int) -> dict:
    return sharded("qwen2", rank, world)


def gpt2(rank: int, world: int) -> dict:
    return sharded("gpt2", rank, world)


def llama_static(rank: int, world: int) -> dict:
    """Shards preallocated for 24 slots (prompt 11 + 8 new would need 18)."""
    return sharded("llama", rank, world, max_cache_len=24)


def _rollback_run(model, ids, mask, cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Generate, roll the cache back 3 tokens (a rejected draft) and continue on other tokens, then roll
    back into the prompt and continue again: the tokens and logits of each continuation."""
    g = torch.Generator().manual_seed(2)
    tokens, logits = [], []
    seq, m = ids, mask
    for remove in (None, 3, PROMPT + NEW):
        if remove is not None:
            cache.crop(-min(remove, cache.get_seq_length() - 2))
            kept = cache.get_seq_length()
            seq = torch.cat([seq[:, :kept], torch.randint(3, 96, (seq.shape[0], 2), generator=g)], 1)
            m = torch.cat([m[:, :kept], torch.ones(seq.shape[0], 2, dtype=m.dtype)], 1)
        new, lg = generate(model, seq, m, cache)
        tokens.append(new)
        logits.append(lg)
        seq = torch.cat([seq, new], 1)
        m = torch.cat([m, torch.ones_like(new)], 1)
    return tokens, logits


def rollback(family: str, rank: int, world: int, max_cache_len: int | None = None) -> dict:
    """``cache.crop`` on the sharded layers (what assisted decoding does after a rejected draft) then more
    decoding equals one process doing the same; every rank's shard stays the layout's at the new length."""
    from transformers import DynamicCache

    from ringcompile.serving.hf import register, sharded_cache

    model, ids, mask = build(family)
    want_tokens, want_logits = _rollback_run(model, ids, mask, DynamicCache())
    register()
    model.set_attn_implementation("ring_decode")
    cache = sharded_cache(model.config.num_hidden_layers, rank, world, timeout=60.0,
                          max_cache_len=max_cache_len)
    tokens, logits = _rollback_run(model, ids, mask, cache)
    layer = cache.layers[0]
    return {"same_tokens": all(torch.equal(a, b) for a, b in zip(tokens, want_tokens, strict=True)),
            "logit_error": max(float((a - b).abs().max()) for a, b in zip(logits, want_logits, strict=True)),
            "shard_len": len(layer.slots), "layout_len": layer.layout.lengths(layer.global_len)[rank],
            "slots_below_len": bool((layer.slots < layer.global_len).all())}


def llama_rollback(rank: int, world: int) -> dict:
    return rollback("llama", rank, world)


def llama_static_rollback(rank: int, world: int) -> dict:
    return rollback("llama", rank, world, max_cache_len=40)


def llama_assisted(rank: int, world: int) -> dict:
    """HF assisted generation (a random draft model, so most drafts are rejected and the main model's
    sharded cache is cropped every round): the same tokens as plain greedy decoding in one process."""
    import transformers as tf

    from ringcompile.serving.hf import register, sharded_cache

    model, ids, mask = build("llama")
    ids, mask = ids[:1], mask[:1]                          # assisted generation takes one sequence
    want, _ = generate(model, ids, mask)
    torch.manual_seed(5)
    draft = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, num_hidden_layers=1, hidden_size=16,
                                               intermediate_size=32, num_attention_heads=2,
                                               num_key_value_heads=1, max_position_embeddings=128)).eval()
    register()
    model.set_attn_implementation("ring_decode")
    cache = sharded_cache(model.config.num_hidden_layers, rank, world, timeout=60.0)
    crops = []
    original = cache.crop
    cache.crop = lambda n: (crops.append(n), original(n))[1]
    name = "cache" if "cache" in inspect.signature(model.generate).parameters else "past_key_values"
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0, assistant_model=draft, **{name: cache})
    return {"same_tokens": bool(torch.equal(out[:, ids.shape[1]:], want)),
            "tokens_cropped": -sum(n for n in crops if n < 0)}
