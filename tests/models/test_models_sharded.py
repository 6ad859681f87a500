"""Whole models under torch.compile(backend="ring") on 2 gloo ranks equal one process.

For each model: forward outputs (logits / hidden states), the loss and every parameter's
gradient after one backward, in float64, against the same model run eagerly and unsharded
in one process; every attention site is rewritten, the graph is sequence-sharded, and no
node of the sharded graph holds an S x S (or S/N x S) value. The ranks are spawned once for
the whole module. Every Hugging Face model runs with each attention implementation it offers;
RING_ALL_MODELS=0 alternates eager / sdpa instead, for a quicker local run.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import run_cases  # noqa: E402

pytestmark = pytest.mark.multirank
ALL = os.environ.get("RING_ALL_MODELS", "1") == "1"
V, S, B = 97, 24, 2


# ---------------------------------------------------------------------------- model builders


class RelBiasLM(torch.nn.Module):
    """One bidirectional attention layer with a learned relative-position bias table (T5-style buckets:
    the clamped distance k - q picks a per-head bias). The table is fed to attention as a score extra, so
    its gradient is the one the op's backward sums over ranks."""

    def __init__(self, vocab=V, dim=32, heads=4, max_distance=6):
        super().__init__()
        self.heads, self.max_distance = heads, max_distance
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.bias = torch.nn.Embedding(2 * max_distance + 1, heads)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, idx, targets):
        b, s = idx.shape
        x = self.emb(idx)
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(s, device=idx.device)
        m = self.max_distance
        bucket = (pos[None, :] - pos[:, None]).clamp(-m, m) + m
        bias = self.bias(bucket).permute(2, 0, 1).unsqueeze(0)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
        y = torch.softmax(scores, dim=-1) @ v
        logits = self.head(x + y.transpose(1, 2).reshape(b, s, -1))
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


class _BloomGeluForward(torch.nn.Module):
    """Bloom's eval-mode gelu without its ``GeLUFunction`` (a custom autograd.Function the normalize retrace
    does not keep opaque yet, issue 10 item 1c): so the test checks the sharding, not that bug."""

    def forward(self, x):
        from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

        return bloom_gelu_forward(x)


def _hf_common(impl):
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=64, attn_implementation=impl, use_cache=False)


def build(kind: str, impl: str = "eager"):
    torch.manual_seed(0)
    if kind == "builtin-llama":
        from ringcompile.models import ModelConfig, build_model

        return build_model("llama", ModelConfig(vocab=V, dim=32, layers=2, heads=4, kv_heads=2, max_seq=64))
    if kind == "builtin-gpt2":
        from ringcompile.models import ModelConfig, build_model

        return build_model("gpt2", ModelConfig(vocab=V, dim=32, layers=2, heads=4, kv_heads=4, max_seq=64))
    if kind in ("nanogpt", "nanogpt-break"):
        from nanogpt import GPT

        return GPT(vocab_size=V, block_size=64, graph_break=kind == "nanogpt-break")
    if kind == "relbias":
        return RelBiasLM()
    import transformers as tf

    if kind == "t5":
        cfg = tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                          num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, use_cache=False,
                          attn_implementation=impl, decoder_start_token_id=0, pad_token_id=0)
        return tf.T5ForConditionalGeneration(cfg)
    if kind == "llama4":  # complex RoPE (view_as_complex / polar), then xq_out.type_as(xq)
        cfg = tf.Llama4TextConfig(num_key_value_heads=2, head_dim=8, intermediate_size_mlp=64,
                                  num_local_experts=2, moe_layers=[], no_rope_layers=[1],
                                  attention_chunk_size=64, **_hf_common(impl))
        return tf.Llama4ForCausalLM(cfg)
    if kind == "roberta":  # positions from cumsum(mask).type_as(mask)
        cfg = tf.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0, attn_implementation=impl)
        return tf.RobertaModel(cfg, add_pooling_layer=False)
    if kind == "bloom":  # head split by the rewrite's own aten.unflatten
        model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=1, n_head=4,
                                                   attn_implementation=impl, use_cache=False))
        for block in model.transformer.h:
            block.mlp.gelu_impl = _BloomGeluForward()
        return model
    if kind == "falcon":  # new decoder architecture: flatten.using_ints of the heads, broadcast_to K/V groups
        cfg = tf.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              new_decoder_architecture=True, num_kv_heads=2, attn_implementation=impl,
                              use_cache=True, hidden_dropout=0.0, attention_dropout=0.0)
        return tf.FalconForCausalLM(cfg)
    if kind == "whisper":
        cfg = tf.WhisperConfig(vocab_size=V, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_source_positions=S, max_target_positions=64,
                               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                               decoder_start_token_id=1, attn_implementation=impl, use_cache=False)
        return tf.WhisperForConditionalGeneration(cfg)
    if kind in ("llama", "llama-pad"):
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **_hf_common(impl)))
    if kind == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=2, sliding_window=6, **_hf_common(impl))
        return tf.MistralForCausalLM(cfg)
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **_hf_common(impl)))
    if kind == "gemma2":
        cfg = tf.Gemma2Config(num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, sliding_window=6, **_hf_common(impl))
        return tf.Gemma2ForCausalLM(cfg)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                attn_implementation=impl, use_cache=False))
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, attn_implementation=impl)
        return tf.BertModel(cfg, add_pooling_layer=False)
    raise ValueError(kind)


def inputs_for(kind: str) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    if kind in ("builtin-llama", "builtin-gpt2"):
        return {"input_ids": ids, "labels": labels}
    if kind == "relbias":
        return {"idx": ids, "targets": labels}
    if kind == "whisper":
        feats = torch.randn(B, 8, 2 * S, generator=g, dtype=torch.float64)
        return {"input_features": feats, "labels": labels}
    if kind == "roberta":
        return {"input_ids": ids, "attention_mask": torch.ones(B, S, dtype=torch.long)}
    if kind.startswith("nanogpt"):
        labels[0, :2] = -1
        return {"idx": ids, "targets": labels}
    if kind == "bert":
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, S - 5:] = 0  # padding in the batch
        return {"input_ids": ids, "attention_mask": mask}
    labels[1, :3] = -100
    if kind == "llama-pad":  # left padding in the batch, as a tokenizer makes for generation
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, :4] = 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return {"input_ids": ids, "labels": labels}


def outputs_of(kind: str, out) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, tuple):
        return out[0], out[1]
    if kind in ("bert", "roberta"):
        return out.last_hidden_state, None
    return out.logits, out.loss


# ---------------------------------------------------------------------------- one case (in the ranks)


def _big_nodes(gm, seq_sizes):
    big = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        for t in v if isinstance(v, (tuple, list)) else [v]:
            if isinstance(t, torch.Tensor) and sum(1 for s in t.shape if s in seq_sizes) >= 2:
                big.append((n.name, tuple(t.shape)))
    return big


def compare(rank, world, kind, impl="eager"):
    from ringcompile import backend

    torch._dynamo.reset()
    model = build(kind, impl).double().eval()
    ref = copy.deepcopy(model)
    inputs = inputs_for(kind)
    first = len(backend.HISTORY)
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    out, loss = outputs_of(kind, compiled(**inputs))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    ((out * g).sum() + (loss if loss is not None else 0)).backward()
    r_out, r_loss = outputs_of(kind, ref(**inputs))
    ((r_out * g).sum() + (r_loss if r_loss is not None else 0)).backward()
    errs = {"out": (out - r_out).abs().max().item() / max(r_out.abs().max().item(), 1e-30)}
    if loss is not None:
        errs["loss"] = abs(loss.item() - r_loss.item())
    scale = max(q.grad.abs().max().item() for q in ref.parameters() if q.grad is not None)
    gerr = 0.0
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        if q.grad is None and p.grad is None:
            continue
        if (q.grad is None) != (p.grad is None):
            gerr = float("inf")
            continue
        gerr = max(gerr, (p.grad - q.grad).abs().max().item() / scale)
    errs["grad"] = gerr
    entries = backend.HISTORY[first:]
    sites = [(s.location or s.name, s.rewritten, s.reason) for e in entries for s in e.sites]
    reports = [e.graph.meta.get("ringcompile_shard") for e in entries if e.graph is not None]
    big = []
    for e in entries:
        rep = e.graph.meta.get("ringcompile_shard") if e.graph is not None else None
        if rep is not None:
            big += _big_nodes(e.graph, {rep.seq_len, rep.padded, rep.padded // world})
    graphs = [(sum(s.rewritten for s in e.sites), e.graph.meta.get("ringcompile_shard") is not None)
              for e in entries if e.graph is not None]
    fallbacks = [e.fallback_reason for e in entries if e.fallback_reason]
    return {"errs": errs, "sites": sites, "fallbacks": fallbacks, "graphs": graphs,
            "gathers": [r.gathers for r in reports if r], "big": big}


def case_builtin_llama(rank, world):
    return compare(rank, world, "builtin-llama")


def case_builtin_gpt2(rank, world):
    return compare(rank, world, "builtin-gpt2")


def case_nanogpt(rank, world):
    return compare(rank, world, "nanogpt")


def case_nanogpt_graph_break(rank, world):
    return compare(rank, world, "nanogpt-break")


def case_relbias(rank, world):
    return compare(rank, world, "relbias")


HF_DEFAULT = [("llama", "sdpa"), ("mistral", "eager"), ("qwen2", "sdpa"), ("gemma2", "eager"),
              ("gpt2", "eager"), ("bert", "sdpa")]
HF_EXTRA = [("llama-pad", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"), ("qwen2", "eager"),
            ("gpt2", "sdpa"), ("bert", "eager")]
# families whose sharding needed a placement rule of their own (issue 10): each one sharded, not fallen back
HF_PLACEMENT = [("t5", "eager"), ("llama4", "eager"), ("roberta", "sdpa"), ("bloom", "eager"),
                ("falcon", "sdpa")]
HF = HF_DEFAULT + HF_PLACEMENT + (HF_EXTRA if ALL else [])


def _name(kind, impl):
    return f"case_hf_{kind.replace('-', '_')}_{impl}"


def _hf_case(kind, impl):
    def case(rank, world):
        return compare(rank, world, kind, impl)
    return case


for _kind, _impl in HF_DEFAULT + HF_EXTRA + HF_PLACEMENT + [("whisper", "sdpa")]:
    globals()[_name(_kind, _impl)] = _hf_case(_kind, _impl)

CASES = ["case_builtin_llama", "case_builtin_gpt2", "case_nanogpt", "case_nanogpt_graph_break",
         "case_relbias", _name("whisper", "sdpa")] + [_name(k, i) for k, i in HF]


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("transformers")
    return run_cases("test_models_sharded", CASES, world=2, timeout=420)


def check(results, name, *, tol=1e-8, loss_tol=1e-8, s_by_s_ok=False):
    """``tol``: relative error of outputs and gradients; ``loss_tol``: absolute error of the loss."""
    for r, out in enumerate(results[name]):
        assert "error" not in out, f"rank {r}: {out['error']}"
        assert not out["fallbacks"], f"rank {r} fell back: {out['fallbacks']}"
        assert out["sites"] and all(ok for _, ok, _ in out["sites"]), f"not all rewritten: {out['sites']}"
        assert any(sharded for _, sharded in out["graphs"]), "no graph was sequence-sharded"
        unsharded = [g for g in out["graphs"] if g[0] and not g[1]]
        assert not unsharded, f"a graph with attention stayed unsharded: {out['graphs']}"
        limits = {"out": tol, "grad": tol, "loss": loss_tol}
        bad = {k: v for k, v in out["errs"].items() if not v <= limits[k]}
        assert not bad, f"rank {r} differs from one process: {bad}"
        assert s_by_s_ok or not out["big"], f"rank {r} holds S x S-sized values: {out['big']}"
    return results[name][0]


# the built-in models compute their loss from logits.float(): the loss is float32-accurate
FP32_LOSS = 1e-5


def test_builtin_llama(results):
    out = check(results, "case_builtin_llama", loss_tol=FP32_LOSS)
    assert out["gathers"] == [[]], "the shifted loss must not gather the logits inside the graph"


def test_builtin_gpt2(results):
    check(results, "case_builtin_gpt2", loss_tol=FP32_LOSS)


def test_nanogpt(results):
    check(results, "case_nanogpt")


def test_learned_score_bias_gradient_reduced_once(results):
    # the bias table's gradient was exactly 2x when both the graph (grad_reduce) and the op summed it
    check(results, "case_relbias")


def test_graph_break_each_graph_sharded_on_its_own(results):
    out = check(results, "case_nanogpt_graph_break")
    assert [n for n, _ in out["graphs"] if n] == [1, 1], out["graphs"]


@pytest.mark.parametrize("kind,impl", HF)
def test_hugging_face(results, kind, impl):
    # HF eager attention runs its softmax in float32 (softmax(..., dtype=float32)), so the one-process
    # reference is float32-accurate there; the HF losses upcast logits to float32 too.
    tol = 1e-6 if impl == "eager" and kind not in ("gpt2", "bert") else 1e-8
    # T5's relative-position buckets are still computed as a replicated S x S index table (the lifted score
    # mod reads it): correct, but memory the index lift could save (reported on issue 10)
    check(results, _name(kind, impl), tol=tol, loss_tol=FP32_LOSS, s_by_s_ok=kind == "t5")



def test_whisper_unsharded_with_the_reason(results):
    """Whisper's encoder sequence comes out of a stride-2 conv over time and its decoder ids out of
    shift_tokens_right's in-place writes: no sequence rule, so the graph runs unsharded (still right) and the
    fallback names where the walk back from the attention stopped."""
    for r, out in enumerate(results[_name("whisper", "sdpa")]):
        assert "error" not in out, f"rank {r}: {out['error']}"
        assert all(v <= 1e-8 for k, v in out["errs"].items() if k != "loss") and out["errs"]["loss"] <= 1e-5
        assert out["fallbacks"] and "convolution" in out["fallbacks"][0], out["fallbacks"]
