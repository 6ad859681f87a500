"""Cases for compiled generate over a sharded KV cache (importable by spawned ranks).

``m.forward = torch.compile(m.forward, backend="ring")`` with ``sharded_cache(..., compiled=True)``
against the same model's eager generate with HF's own DynamicCache in one process."""

from __future__ import annotations

import logging

import torch
from generate_cases import build, generate

MAX_CACHE = 24   # prompt 11 + 8 new tokens needs 18 slots


class _Caught(logging.Handler):
    """The ringcompile log records of a block."""

    def __enter__(self):
        self.records: list[logging.LogRecord] = []
        logging.getLogger("ringcompile").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("ringcompile").removeHandler(self)

    def emit(self, record):
        self.records.append(record)


def _compiled(family: str, rank: int, world: int, attention: str | None = None,
              options: dict | None = None, extra_tokens: int = 0) -> dict:
    import torch._dynamo
    from transformers import DynamicCache

    from ringcompile import backend
    from ringcompile.serving.hf import sharded_cache

    torch._dynamo.reset()
    model, ids, mask = build(family)
    if extra_tokens:        # a longer prompt (12 tokens: 2N divides it, so the planner picks zigzag)
        more = torch.randint(3, 96, (2, extra_tokens), generator=torch.Generator().manual_seed(2))
        ids, mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    one_process = DynamicCache()
    want_tokens, want_logits = generate(model, ids, mask, one_process)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in one_process.layers)
    slots = one_process.get_seq_length()
    before = len(backend.HISTORY)
    if attention is not None:
        model.set_attn_implementation(attention)
    model.forward = torch.compile(model.forward, backend="ring", options=options)
    cache = sharded_cache(model.config.num_hidden_layers, rank, world, max_cache_len=MAX_CACHE, compiled=True)
    with _Caught() as caught:
        tokens, logits = generate(model, ids, mask, cache)
    graphs = backend.HISTORY[before:]
    decisions = [d for g in graphs for d in g.decisions]
    return {"same_tokens": bool(torch.equal(tokens, want_tokens)),
            "logit_error": float((logits - want_logits).abs().max()),
            "graphs": len(graphs),
            "decode_rewrites": sum(d.stage == "decode" for d in decisions),
            "ring_rewrites": sum(s.rewritten for g in graphs for s in g.sites),
            "prefill_gathers": [n for g in graphs for n in _shard_gathers(g)],
            "cache_writes": [w for g in graphs for w in _cache_writes(g)],
            "prefill_layouts": [g.graph.meta["ringcompile_shard"].layout for g in graphs
                                if g.graph is not None and g.graph.meta.get("ringcompile_shard")],
            "cache_layouts": sorted({layer.prefill_layout for layer in cache.layers}),
            "sharded_graphs": sum(bool(g.graph is not None and g.graph.meta.get("ringcompile_shard"))
                                  for g in graphs),
            "unsharded": [d.reason for d in decisions if d.leaves_attention_unsharded],
            "cache_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers),
            "slot_bytes": full_bytes / slots,    # all layers' K and V of one global slot
            "filled": [layer.filled() for layer in cache.layers], "global_len": slots,
            "warnings": [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]}


def _shard_gathers(entry) -> list[str]:
    """The nodes the sequence-sharding pass gathered in one compiled graph (none if not sharded)."""
    report = entry.graph.meta.get("ringcompile_shard") if entry.graph is not None else None
    return list(report.gathers) if report is not None else []


def _cache_writes(entry) -> list[dict]:
    """Each ``cache_append`` of a sequence-sharded graph: the layout it was told its K/V shard is in ("" if
    replicated) and whether its K/V come straight from a gather (the transient all-gather per layer)."""
    report = entry.graph.meta.get("ringcompile_shard") if entry.graph is not None else None
    if report is None:
        return []
    out = []
    for node in entry.graph.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("ringcompile.cache_append"):
            kv = node.args[3:5]
            told = node.args[11] if len(node.args) > 11 else node.kwargs.get("seq_layout", "")
            out.append({"seq_layout": told,
                        "gathered": [str(a.target).startswith("ringcompile.gather_seq") for a in kv],
                        "local_len": [int(a.meta["val"].shape[2]) for a in kv]})
    return out


def llama(rank: int, world: int) -> dict:
    """An 11-token prompt: contiguous shards padded to 12, the padding slot stored nowhere."""
    return _compiled("llama", rank, world, options={"inner": "eager"})


def llama_zigzag(rank: int, world: int) -> dict:
    """A 12-token prompt: the planner picks zigzag for the causal prefill, and the cache stores it so."""
    return _compiled("llama", rank, world, options={"inner": "eager"}, extra_tokens=1)


def llama_forced_contiguous(rank: int, world: int) -> dict:
    """A 12-token prompt with layout="contiguous" forced: the cache (zigzag) disagrees with the graph, so
    cache_append gets the full K/V (gathered, the correct fallback)."""
    return _compiled("llama", rank, world, options={"inner": "eager", "layout": "contiguous"}, extra_tokens=1)


def llama_inductor(rank: int, world: int) -> dict:
    """The default inner compiler (Inductor): slow to compile, so with RING_SLOW=1 only."""
    return _compiled("llama", rank, world)


def mistral(rank: int, world: int) -> dict:
    """A sliding window (6) shorter than the sequence: HF's mask carries it to the shards."""
    return _compiled("mistral", rank, world, options={"inner": "eager"})


def mistral_eager_attention(rank: int, world: int) -> dict:
    """Mistral's window in HF's additive float mask, read by the eager chain: decode_attention too."""
    return _compiled("mistral", rank, world, attention="eager", options={"inner": "eager"})


def llama_eager_attention(rank: int, world: int) -> dict:
    """HF's eager attention (q @ k^T * scale + float mask, softmax, @ v) over the cache: decode_attention."""
    return _compiled("llama", rank, world, attention="eager", options={"inner": "eager"})


def llama_plain_cache(rank: int, world: int) -> dict:
    """HF's own DynamicCache (no sharded cache passed): the cache is gathered, one WARNING says why."""
    import torch._dynamo
    from transformers import DynamicCache

    from ringcompile import backend

    torch._dynamo.reset()
    model, ids, mask = build("llama")
    want_tokens, want_logits = generate(model, ids, mask, DynamicCache())
    before = len(backend.HISTORY)
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    with _Caught() as caught:
        tokens, logits = generate(model, ids, mask, DynamicCache())
    graphs = backend.HISTORY[before:]
    return {"same_tokens": bool(torch.equal(tokens, want_tokens)),
            "logit_error": float((logits - want_logits).abs().max()),
            "graphs": len(graphs),
            "decisions": [(d.stage, d.pattern, d.outcome, d.reason) for g in graphs for d in g.decisions],
            "warnings": [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]}


def llama_prepared(rank: int, world: int) -> dict:
    """``ringcompile.serving.prepare(model)``: generate without a cache (and with a fresh StaticCache)
    gets the compiled sharded cache; same tokens as one process."""
    import torch._dynamo
    from transformers import DynamicCache, StaticCache

    from ringcompile.serving import prepare
    from ringcompile.serving.compiled_cache import CompiledShardedLayer

    torch._dynamo.reset()
    model, ids, mask = build("llama")
    want_tokens, want_logits = generate(model, ids, mask, DynamicCache())
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    prepare(model)
    out = {}
    static = StaticCache(config=model.config, max_cache_len=MAX_CACHE)
    for label, cache in (("none", None), ("static", static)):
        with _Caught() as caught:
            tokens, logits, used = _generate_with_cache(model, ids, mask, cache)
        out[label] = {"same_tokens": bool(torch.equal(tokens, want_tokens)),
                      "logit_error": float((logits - want_logits).abs().max()),
                      "sharded": all(isinstance(layer, CompiledShardedLayer) for layer in used.layers),
                      "filled": [layer.filled() for layer in used.layers],
                      "max_cache_len": used.layers[0].max_cache_len,
                      "warnings": [r.getMessage() for r in caught.records if r.levelno >= logging.WARNING]}
    return out


def _generate_with_cache(model, ids, mask, cache, new: int | None = None):
    """generate_cases.generate (``new`` tokens, default its NEW), also returning the cache generate used."""
    import inspect

    from generate_cases import NEW

    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW if new is None else new,
              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    if cache is not None:
        kw["cache" if "cache" in inspect.signature(model.generate).parameters else "past_key_values"] = cache
    with torch.no_grad():
        res = model.generate(**kw)
    return res.sequences[:, ids.shape[1]:], torch.stack(res.logits, 1), res.past_key_values


def qwen2(rank: int, world: int) -> dict:
    """Qwen2 with one KV head (MQA) through the compiled path."""
    return _compiled("qwen2", rank, world, options={"inner": "eager"})


def gpt2(rank: int, world: int) -> dict:
    """GPT-2 (learned positions, no KV-head repeat) through the compiled path."""
    return _compiled("gpt2", rank, world, options={"inner": "eager"})
