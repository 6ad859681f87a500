"""Sequence sharding under dynamic shapes: ONE compile serves several sequence lengths, on 2 gloo ranks.

A model compiled with ``torch.compile(dynamic=True)`` (the built-in Llama: RoPE, GQA, shifted loss;
the nanoGPT of tests/models: learned positions, ``tril`` mask, ``ignore_index=-1`` loss) runs at
three sequence lengths (one not divisible by 2N) through one backend call; at each length the
forward output, the loss and every parameter gradient equal the same model run eagerly on one
process in float64, and the graph is really sharded: the shard report says ``dynamic`` and each
ring_attention call receives a local shard (padded length / N positions), not the full sequence.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from harness import run_cases  # noqa: E402

pytestmark = pytest.mark.multirank
V, B = 61, 2
LENGTHS = (16, 21, 30)  # 21 divides neither N=2 nor 2N=4; 30 divides N but not 2N


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        from ringcompile.models import ModelConfig, build_model

        return build_model("llama", ModelConfig(vocab=V, dim=32, layers=1, heads=4, kv_heads=2, max_seq=64))
    if kind == "hf-llama":
        import transformers as tf

        cfg = tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             attn_implementation="sdpa", use_cache=False)
        return tf.LlamaForCausalLM(cfg)
    from nanogpt import GPT

    return GPT(vocab_size=V, block_size=64, n_layer=1)


def _logits_and_loss(out):
    return (out.logits, out.loss) if hasattr(out, "logits") else out


def _run_dynamic(rank: int, world: int, kind: str, dynamic: bool | None = True) -> dict:
    import ringcompile.runtime.dispatch as dispatch
    from ringcompile import backend
    from ringcompile.backend import ring_backend

    torch._dynamo.reset()
    model = _build(kind).double().eval()
    ref = copy.deepcopy(model)
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(1)
        return ring_backend(gm, example_inputs, {"inner": "eager"})

    seen = []  # (local q length, global seq_len) of every attention call at run time
    forward = dispatch.attention_forward

    def recording_forward(q, k, v, mask_extras, score_extras, seq_len, *args, **kwargs):
        seen.append((int(q.shape[2]), int(seq_len)))
        return forward(q, k, v, mask_extras, score_extras, seq_len, *args, **kwargs)

    dispatch.attention_forward = recording_forward
    compiled = torch.compile(model, backend=counting_backend, dynamic=dynamic)
    specialize_float = torch._dynamo.config.specialize_float
    if kind in ("nanogpt", "hf-llama"):
        # under dynamic=True Dynamo turns module floats (LayerNorm's eps, HF's attention scale) into 0-d
        # tensors read with .item(), which the aten retrace (passes/normalize.py) cannot pass to layer_norm /
        # SDPA (unbacked float): keep module floats constant
        torch._dynamo.config.specialize_float = True
    first = len(backend.HISTORY)
    errs, local = {}, {}
    try:
        for S in LENGTHS:
            g = torch.Generator().manual_seed(S)  # same inputs on every rank
            ids = torch.randint(0, V, (B, S), generator=g)
            labels = torch.randint(0, V, (B, S), generator=g)
            labels[0, :2] = -1 if kind == "nanogpt" else -100
            model.zero_grad()
            ref.zero_grad()
            seen.clear()
            kw = {"targets" if kind == "nanogpt" else "labels": labels}
            out, loss = _logits_and_loss(compiled(ids, **kw))
            local[S] = sorted(set(seen))
            w = torch.randn(out.shape, generator=g, dtype=out.dtype)
            ((out * w).sum() + loss).backward()
            r_out, r_loss = _logits_and_loss(ref(ids, **kw))
            ((r_out * w).sum() + r_loss).backward()
            errs[f"out{S}"] = (out - r_out).abs().max().item()
            errs[f"loss{S}"] = abs(loss.item() - r_loss.item())
            errs[f"grad{S}"] = max((p.grad - q.grad).abs().max().item()
                                   for p, q in zip(model.parameters(), ref.parameters(), strict=True))
    finally:
        dispatch.attention_forward = forward
        torch._dynamo.config.specialize_float = specialize_float
    entries = backend.HISTORY[first:]
    reports = [e.graph.meta.get("ringcompile_shard") for e in entries if e.graph is not None]
    return {"errs": errs, "calls": len(calls), "local": local,
            "fallbacks": [e.fallback_reason for e in entries if e.fallback_reason],
            "reports": [(r.dynamic, r.layout, r.gathers) if r else None for r in reports],
            "lengths": LENGTHS}


def case_llama(rank, world):
    return _run_dynamic(rank, world, "llama")


def case_nanogpt(rank, world):
    return _run_dynamic(rank, world, "nanogpt")


def case_hf_llama_sdpa(rank, world):
    return _run_dynamic(rank, world, "hf-llama")


def case_llama_automatic_dynamic(rank, world):
    """No dynamic=True: Dynamo compiles the first length statically, then once more with a symbolic length
    (automatic dynamic shapes); the third length reuses that graph."""
    return _run_dynamic(rank, world, "llama", dynamic=None)


# ---------------------------------------------------------------------------- graphs traced here


def _trace_symbolic(fn, inputs, dynamic_inputs):
    """make_fx pre-dispatch graph (the backend's form) in which dim 1 of ``dynamic_inputs`` is symbolic."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = []
    for i, x in enumerate(inputs):
        if i in dynamic_inputs:
            ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC])
            fakes.append(mode.from_tensor(x, symbolic_context=ctx))
        else:
            fakes.append(mode.from_tensor(x, static_shapes=True))
    with mode:
        return make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*fakes)


def _run_symbolic(rank, world, *, mask, S0=24, lengths=LENGTHS, B=2, H=2, Hkv=2, D=8, options=None,
                  seq_dims=None, **kw):
    """Trace and shard ONCE at length S0 with a symbolic length; run the same graph at every length."""
    from test_shard_graphs import make_params, model

    from ringcompile.options import Options
    from ringcompile.passes.shard import shard_graph
    from ringcompile.spec import AttentionSpec, register_spec

    torch.manual_seed(1234)
    params = make_params(H=H, Hkv=Hkv, D=D)
    names = list(params)
    key = register_spec(AttentionSpec(mask=mask, name="test"))
    args = dict(H=H, Hkv=Hkv, D=D, mask=mask, **kw)
    loss = kw.get("loss", True) or kw.get("pool", False)

    def fn(*a):
        return model(dict(zip(names, a[:len(names)], strict=True)), a[-2], a[-1], key=key, **args)

    def data(S):
        g = torch.Generator().manual_seed(S)
        ids, labels = torch.randint(0, 37, (B, S), generator=g), torch.randint(0, 37, (B, S), generator=g)
        labels[0, :3] = -100
        return ids, labels

    n = len(names)
    gm = _trace_symbolic(fn, [params[k] for k in names] + list(data(S0)), {n, n + 1})
    shard_graph(gm, [], Options(**(options or {}), seq_dims=seq_dims))
    report = gm.meta["ringcompile_shard"]
    errs = {}
    for S in lengths:
        ids, labels = data(S)
        outs = gm(*[params[k] for k in names], ids, labels)
        w = torch.randn((B, S, 37), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        total = (outs[0] * w).sum() + (outs[1].sum() if loss else 0)
        grads = torch.autograd.grad(total, [params[k] for k in names], allow_unused=True)
        ref_params = {k: params[k].detach().clone().requires_grad_(True) for k in names}
        ref = model(ref_params, ids, labels, **args)
        ref_total = (ref[0] * w).sum() + (ref[1].sum() if loss else 0)
        ref_grads = torch.autograd.grad(ref_total, [ref_params[k] for k in names], allow_unused=True)
        errs[f"out{S}"] = (outs[0].detach() - ref[0].detach()).abs().max().item()
        if loss:
            errs[f"loss{S}"] = (outs[1] - ref[1]).abs().max().item()
        errs[f"grad{S}"] = max(0.0 if rg is None and (g is None or not g.any()) else
                               float("inf") if rg is None else (g - rg).abs().max().item()
                               for g, rg in zip(grads, ref_grads, strict=True))
    to_local = [nd for nd in gm.graph.nodes if nd.target == torch.ops.ringcompile.to_local.default]
    baked = [nd.name for nd in to_local if isinstance(nd.args[3], int) or isinstance(nd.args[4], int)]
    return {"errs": errs, "loss_tol": 1e-5 if kw.get("shift") else 1e-8, "dynamic": report.dynamic,
            "layout": report.layout, "gathers": report.gathers,
            "baked": baked, "targets": sorted({str(nd.target) for nd in gm.graph.nodes
                                               if nd.op == "call_function"})}


def case_sym_causal_rope_gqa(rank, world):
    from ringcompile.mods import causal

    return _run_symbolic(rank, world, mask=causal(), H=4, Hkv=2, rope=True, rms=True)


def case_sym_sliding_window_no_loss(rank, world):
    from ringcompile.mods import sliding_window

    return _run_symbolic(rank, world, mask=sliding_window(5), loss=False)


def case_sym_shifted_loss(rank, world):
    from ringcompile.mods import causal

    return _run_symbolic(rank, world, mask=causal(), shift=True)


def case_sym_sharded_labels_halo(rank, world):
    from ringcompile.mods import causal

    return _run_symbolic(rank, world, mask=causal(), shift=True, seq_dims={"arg10_1": 1, "arg11_1": 1},
                         options={"layout": "zigzag"})


def case_sym_sequence_mean(rank, world):
    return _run_symbolic(rank, world, mask=None, loss=False, pool=True)


def case_sym_sharded_outputs_contiguous(rank, world):
    from ringcompile.mods import causal

    return _run_symbolic(rank, world, mask=causal(), options={"layout": "contiguous"})


CASES = ["case_llama", "case_nanogpt", "case_hf_llama_sdpa", "case_llama_automatic_dynamic",
         "case_sym_causal_rope_gqa", "case_sym_sliding_window_no_loss", "case_sym_shifted_loss",
         "case_sym_sharded_labels_halo",
         "case_sym_sequence_mean", "case_sym_sharded_outputs_contiguous"]


@pytest.fixture(scope="module")
def results():
    return run_cases("test_shard_dynamic", CASES, world=2, timeout=240)


def _padded(S: int, unit: int) -> int:
    return -(-S // unit) * unit


@pytest.mark.parametrize("name,loss_tol", [("case_llama", 1e-5), ("case_nanogpt", 1e-9),
                                           ("case_hf_llama_sdpa", 1e-5)])
def test_one_compile_serves_every_length_sharded(results, name, loss_tol):
    """The Llamas compute their loss from logits.float(): float32-accurate loss."""
    for r, out in enumerate(results[name]):
        assert "error" not in out, f"rank {r}: {out['error']}"
        assert out["calls"] == 1, f"rank {r}: {out['calls']} backend calls for {len(LENGTHS)} lengths"
        assert not out["fallbacks"], f"rank {r} fell back: {out['fallbacks']}"
        assert out["reports"] and all(rep is not None and rep[0] for rep in out["reports"]), out["reports"]
        layout = out["reports"][0][1]
        unit = 2 * 2 if layout == "zigzag" else 2
        for S in LENGTHS:  # every attention call held its local shard of this length
            assert out["local"][S] == [(_padded(S, unit) // 2, S)], (S, out["local"][S])
        limits = {"out": 1e-9, "grad": 1e-8, "loss": loss_tol}
        bad = {k: v for k, v in out["errs"].items() if not v <= limits[k.rstrip("0123456789")]}
        assert not bad, f"rank {r} differs from one process: {bad}"


def test_automatic_dynamic_shapes_shard_after_the_recompile(results):
    for r, out in enumerate(results["case_llama_automatic_dynamic"]):
        assert "error" not in out, f"rank {r}: {out['error']}"
        assert out["calls"] == 2, f"rank {r}: {out['calls']} backend calls (static, then symbolic)"
        assert not out["fallbacks"], out["fallbacks"]
        assert [rep[0] for rep in out["reports"]] == [False, True], out["reports"]
        bad = {k: v for k, v in out["errs"].items() if not v <= (1e-5 if k.startswith("loss") else 1e-8)}
        assert not bad, f"rank {r} differs from one process: {bad}"


SYM_CASES = [c for c in CASES if c.startswith("case_sym_")]


@pytest.mark.parametrize("name", SYM_CASES)
def test_one_symbolic_graph_serves_every_length(results, name):
    for r, out in enumerate(results[name]):
        assert "error" not in out, f"rank {r}: {out['error']}"
        assert out["dynamic"] and not out["baked"], out
        # the shifted loss is computed from logits.float(): float32-accurate
        bad = {k: v for k, v in out["errs"].items()
               if not v < (out["loss_tol"] if k.startswith("loss") else 1e-8)}
        assert not bad, f"rank {r} differs from the one-process float64 reference: {bad}"


def test_symbolic_halo_and_no_gather(results):
    out = results["case_sym_sharded_labels_halo"][0]
    assert out["gathers"] == [] and "ringcompile.shift_seq.default" in out["targets"]
    assert results["case_sym_shifted_loss"][0]["gathers"] == []


def test_symbolic_sequence_mean_gathers_instead_of_guessing_padding(results):
    """Whether a length needs padding is known only at run time: the mean over the sequence runs on the
    gathered sequence (correct for every length) instead of a Partial sum."""
    assert results["case_sym_sequence_mean"][0]["gathers"]


def test_location_is_a_clean_module_path():
    from ringcompile.passes.find_attention import module_path

    for source in ("L['blocks'][1].attn", "L['blocks[1]'].attn", "L['blocks[1].attn", 'L["blocks"][1].attn',
                   "L['blocks'][1]._modules['attn']", "L['self'].blocks[1].attn"):
        assert module_path(source) == "blocks.1.attn", source
    assert module_path("L['self'].transformer.h.0.attn") == "transformer.h.0.attn"
