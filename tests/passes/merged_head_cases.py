"""Cases for test_merged_head_bias.py, importable in spawned ranks, under backend="ring" vs the same model
in one process: DeBERTa-v2 with its disentangled relative-position bias (c2p / p2c terms gathered over
relative positions and added to the merged-head (B*H, S, S) scores before the (B, H, S, S) view), and
Falcon's ALiBi path in float64."""

from __future__ import annotations

import copy

import torch

V, S, B = 61, 16, 2
CONFIGS = {
    # DeBERTa-v3's spelling: log-bucketed relative positions, shared q/k projections, normed embeddings
    "v3": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
               max_relative_positions=32, share_att_key=True, norm_rel_ebd="layer_norm"),
    # DeBERTa-v2's: plain clamped distances, separate positional projections, c2p only
    "v2-c2p": dict(relative_attention=True, pos_att_type=["c2p"], max_relative_positions=6,
                   share_att_key=False),
}


def build(name: str, impl: str = "eager"):
    import transformers as tf

    cfg = tf.DebertaV2Config(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, pad_token_id=0, **CONFIGS[name])
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return tf.DebertaV2ForMaskedLM(cfg).double().eval()


def build_falcon_alibi():
    """Falcon with ALiBi: the causal mask is ``where(causal, full((), 0.0, float64), finfo.min)`` folded
    into the alibi bias by masked_fill, and the scores are scaled in place (``*=``)."""
    import transformers as tf

    cfg = tf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          alibi=True, new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                          hidden_dropout=0.0, attention_dropout=0.0, use_cache=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.FalconForCausalLM(cfg).double().eval()


def inputs(pad: bool) -> dict:
    g = torch.Generator().manual_seed(5)
    x = {"input_ids": torch.randint(1, V, (B, S), generator=g)}
    if pad:
        x["attention_mask"] = torch.ones(B, S, dtype=torch.long)
        x["attention_mask"][1, S - 3:] = 0  # padding in the batch
    return x


def ring_vs_one_process(model, x: dict, rows: torch.Tensor) -> dict:
    """Relative errors of the logits (on ``rows``) and of the parameters' gradients back-propagated from
    those rows (relative to the largest reference gradient: a key bias's gradient is 0 up to rounding),
    plus what was rewritten."""
    from ringcompile import backend

    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    first = len(backend.HISTORY)
    out = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})(**x).logits
    r_out = ref(**x).logits
    g = torch.randn(r_out.shape, generator=torch.Generator().manual_seed(9), dtype=r_out.dtype)
    g = g * rows[..., None]
    (out * g).sum().backward()
    (r_out * g).sum().backward()
    scale = max(q.grad.abs().max().item() for q in ref.parameters() if q.grad is not None)
    grads = {}
    for (pname, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if q.grad is not None:
            grads[pname] = float("inf") if p.grad is None else (p.grad - q.grad).abs().max().item() / scale
    entries = backend.HISTORY[first:]
    return {"out": ((out - r_out)[rows].abs().max() / r_out[rows].abs().max()).item(), "grads": grads,
            "sites": [(s.pattern, s.rewritten, s.reason) for e in entries for s in e.sites],
            "notes": [n for e in entries for s in e.sites for n in s.notes],
            "sharded": [e.graph.meta.get("ringcompile_shard") is not None for e in entries
                        if e.graph is not None],
            "fallbacks": [e.fallback_reason for e in entries if e.fallback_reason]}


def compare(name: str, pad: bool) -> dict:
    """DeBERTa ``name``. With padding, DeBERTa masks the padded query rows entirely (finfo.min fill):
    the op recomputes those rows with the constant as a score term (``runtime.dead_rows``), so every
    row is compared, and gradients flow from every row."""
    x = inputs(pad)
    return ring_vs_one_process(build(name), x, torch.ones(B, S, dtype=torch.bool))


def case_v3_padded(rank, world):
    return compare("v3", pad=True)


def case_falcon_alibi(rank, world):
    return ring_vs_one_process(build_falcon_alibi(), inputs(False), torch.ones(B, S, dtype=torch.bool))
