"""shard_graph on graphs built here (make_fx pre-dispatch, the backend's graph form), on 2 gloo ranks.

Each case traces a small model that calls ``torch.ops.ringcompile.ring_attention`` directly,
shards the graph, runs it on real float64 inputs and compares outputs and parameter
gradients with the same model computed on one process with float64 eager attention
(``attention_reference``) on the unsharded input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from harness import run_cases  # noqa: E402

from ringcompile.kernels.reference import attention_reference  # noqa: E402
from ringcompile.mods import causal, sliding_window  # noqa: E402
from ringcompile.spec import AttentionSpec, register_spec  # noqa: E402

pytestmark = pytest.mark.multirank
TOL = dict(rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- models as functions


def make_params(V=37, E=16, H=2, Hkv=2, D=8, max_pos=64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def p(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)

    return {"wte": p(V, E), "wpe": p(max_pos, E), "wq": p(H * D, E), "wk": p(Hkv * D, E),
            "wv": p(Hkv * D, E), "wo": p(E, H * D), "ln": (1 + p(E, scale=0.1)).detach().requires_grad_(True),
            "w1": p(2 * E, E), "w2": p(E, 2 * E), "head": p(V, E)}


def rope_tables(S, D, device="cpu"):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D))
    pos = torch.arange(S, device=device).to(torch.float64)
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def model(params, ids, labels, *, H, Hkv, D, key=None, mask=None, rope=False, loss=True, rms=False,
          pool=False, shift=False, neighbours=False, roll=False):
    """Embedding (+ learned positions or RoPE) -> attention -> norm -> MLP -> head (-> mean CE loss)."""
    B, S = ids.shape
    x = F.embedding(ids, params["wte"])
    if not rope:
        x = x + F.embedding(torch.arange(S, device=ids.device), params["wpe"])
    if roll:  # an op with no sharding rule between the inputs and the attention
        x = torch.roll(x, 1, -1)
    q = F.linear(x, params["wq"]).view(B, S, H, D).transpose(1, 2)
    k = F.linear(x, params["wk"]).view(B, S, Hkv, D).transpose(1, 2)
    v = F.linear(x, params["wv"]).view(B, S, Hkv, D).transpose(1, 2)
    if rope:
        cos, sin = rope_tables(S, D, ids.device)
        cos, sin = cos.unsqueeze(0).unsqueeze(0), sin.unsqueeze(0).unsqueeze(0)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    if key is None:
        y = attention_reference(q, k, v, mask=mask)
    else:
        y, _ = torch.ops.ringcompile.ring_attention(q, k, v, [], [], S, key)
    y = F.linear(y.transpose(1, 2).reshape(B, S, H * D), params["wo"])
    x = x + y
    if neighbours:  # ops that read other positions along the sequence: causal conv1d over time, cumsum
        E = x.shape[-1]
        conv = F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), params["w1"][:E].view(E, 1, -1)[:, :, :3], groups=E)
        x = x + conv.transpose(1, 2) + 0.01 * torch.cumsum(x, dim=1)
        x = x.clone().add_(0.5)  # an in-place op on a sharded value
    if rms:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * params["ln"]
    else:
        h = F.layer_norm(x, (x.shape[-1],), params["ln"])
    x = x + F.linear(F.silu(F.linear(h, params["w1"])), params["w2"])
    logits = F.linear(x, params["head"])
    if pool:
        return (logits, logits.mean(1))
    if not loss:
        return (logits,)
    if shift:  # next-token loss written the nanoGPT / built-in way: logits[:, :-1] vs labels[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
    else:
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
    return logits, ce


# ---------------------------------------------------------------------------- run one case


def _trace(fn, args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*args)


def _run_case(rank, world, *, B=2, S=24, H=2, Hkv=2, D=8, mask=None, rope=False, loss=True, rms=False,
              options=None, seq_dims=None, pool=False, shift=False, keep_outputs=False, neighbours=False,
              roll=False):
    from ringcompile.options import Options
    from ringcompile.passes.shard import shard_graph

    torch.manual_seed(1234)  # same inputs on every rank
    params = make_params(H=H, Hkv=Hkv, D=D)
    names = list(params)
    ids = torch.randint(0, 37, (B, S))
    labels = torch.randint(0, 37, (B, S))
    labels[0, :3] = -100  # some ignored positions
    key = register_spec(AttentionSpec(mask=mask, name="test"))
    kw = dict(H=H, Hkv=Hkv, D=D, mask=mask, rope=rope, loss=loss, rms=rms, pool=pool, shift=shift,
              neighbours=neighbours, roll=roll)

    def fn(*args):
        p = dict(zip(names, args[:len(names)], strict=True))
        return model(p, args[-2], args[-1], key=key, **kw)

    inputs = [params[n] for n in names] + [ids, labels]
    gm = _trace(fn, inputs)
    opts = Options(**(options or {}), seq_dims=seq_dims)
    shard_graph(gm, [], opts)
    report = gm.meta["ringcompile_shard"]
    outs = gm(*inputs)
    g_out = torch.randn((B, S, 37), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if opts.outputs == "sharded":
        from ringcompile.runtime.layouts import shard_tensor

        g_local = shard_tensor(g_out, 1, world, rank, report.layout)
        total = (outs[0] * g_local).sum()
    else:
        total = (outs[0] * g_out).sum()
    if loss or pool:
        total = total + outs[1].sum()
    grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)

    ref_params = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    ref = model(ref_params, ids, labels, **kw)
    ref_total = (ref[0] * g_out).sum() + (ref[1].sum() if loss or pool else 0)
    ref_grads = torch.autograd.grad(ref_total, [ref_params[n] for n in names], allow_unused=True)
    if opts.outputs == "sharded":
        from ringcompile.runtime.layouts import shard_tensor

        expected0 = shard_tensor(ref[0].detach(), 1, world, rank, report.layout)
    else:
        expected0 = ref[0].detach()
    errs = {"out0": (outs[0].detach() - expected0).abs().max().item()}
    if loss or pool:
        errs["loss"] = (outs[1] - ref[1]).abs().max().item()
    for n, g, rg in zip(names, grads, ref_grads, strict=True):
        if rg is None:
            errs[f"grad_{n}"] = 0.0 if g is None or not g.any() else float("inf")
        else:
            errs[f"grad_{n}"] = (g - rg).abs().max().item()
    big = _big_nodes(gm, {S, report.padded, report.padded // world})
    extra = {"outputs": outs, "ref0": ref[0].detach()} if keep_outputs else {}
    return {**extra, "errs": errs, "seeds": report.seeds, "layout": report.layout, "gathers": report.gathers,
            "padded": report.padded, "big_nodes": big, "out_shape": tuple(outs[0].shape),
            "targets": sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})}


def _big_nodes(gm, seq_sizes):
    """Nodes whose value has two sequence-sized dims (S x S or (S/N) x S) after the pass."""
    big = []
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        vals = v if isinstance(v, (tuple, list)) else [v]
        for t in vals:
            if isinstance(t, torch.Tensor) and sum(1 for s in t.shape if s in seq_sizes) >= 2:
                big.append((n.name, tuple(t.shape)))
    return big


# ---------------------------------------------------------------------------- cases (run in the ranks)


def case_block_causal(rank, world):
    return _run_case(rank, world, mask=causal())


def case_block_bidirectional_zigzag(rank, world):
    return _run_case(rank, world, mask=None, options={"layout": "zigzag"})


def case_rope_gqa_rmsnorm(rank, world):
    return _run_case(rank, world, H=4, Hkv=2, mask=causal(), rope=True, rms=True)


def case_padding_no_loss(rank, world):
    return _run_case(rank, world, S=21, mask=sliding_window(5), loss=False)


def case_sharded_outputs(rank, world):
    out = _run_case(rank, world, mask=causal(), options={"outputs": "sharded"}, keep_outputs=True)
    import ringcompile

    full = ringcompile.gather(out.pop("outputs")[0].detach(), dim=1, seq_len=24)  # default layout
    out["errs"]["gathered"] = (full - out.pop("ref0")).abs().max().item()
    return out


def case_padded_loss(rank, world):
    return _run_case(rank, world, S=21, mask=causal())


def case_shifted_loss(rank, world):
    return _run_case(rank, world, mask=causal(), shift=True, options={"layout": "zigzag"})


def case_shifted_padded_loss(rank, world):
    return _run_case(rank, world, S=21, mask=causal(), shift=True)


def case_sequence_mean(rank, world):
    return _run_case(rank, world, mask=None, loss=False, pool=True)


def case_neighbour_ops(rank, world):
    return _run_case(rank, world, mask=causal(), neighbours=True)


def case_sharded_labels_shift(rank, world):
    """Labels named as sequence inputs: labels[:, 1:] of a shard is a halo exchange, not a gather."""
    return _run_case(rank, world, mask=causal(), shift=True, seq_dims={"arg10_1": 1, "arg11_1": 1},
                     options={"layout": "zigzag"})


def case_sharded_labels_shift_padded(rank, world):
    return _run_case(rank, world, S=21, mask=causal(), shift=True, seq_dims={"arg10_1": 1, "arg11_1": 1})


def case_seq_dims_override(rank, world):
    """No rule for roll: the sequence cannot be traced back to the inputs unless the user names it."""
    from ringcompile.errors import UnsupportedPatternError

    try:
        _run_case(rank, world, mask=causal(), roll=True)
        raised = None
    except UnsupportedPatternError as e:
        raised = str(e)
    out = _run_case(rank, world, mask=causal(), roll=True, seq_dims={"arg10_1": 1})  # the token ids
    out["raised"] = raised
    return out


def case_padded_mean_falls_back(rank, world):
    from ringcompile.errors import UnsupportedPatternError

    try:
        _run_case(rank, world, S=21, mask=None, loss=False, pool=True)
    except UnsupportedPatternError as e:
        return {"raised": str(e)}
    return {"raised": None}


def case_collectives(rank, world):
    """to_local / gather_seq round trip (zigzag, padding, flattened seq with inner > 1) and their grads."""
    import ringcompile.runtime.collectives  # noqa: F401  (registers the ops)
    from ringcompile.runtime.layouts import padded_length, shard_tensor

    ops = torch.ops.ringcompile
    errs = {}
    for layout, S, inner in (("zigzag", 10, 1), ("contiguous", 7, 3), ("zigzag", 8, 2)):
        padded = padded_length(S, world, layout)
        x = torch.randn(3, 2 * S * inner, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(S))
        x.requires_grad_(True)
        local = ops.to_local(x, 1, inner, S, padded, layout, "default", 30.0)
        # expected: shard the (3, 2, S, inner, 5) view along S with the runtime's layout helper
        want = shard_tensor(x.detach().view(3, 2, S, inner, 5), 2, world, rank, layout, S)
        err = (local.detach() - want.reshape(local.shape)).abs().max().item()
        errs[f"to_local_{layout}_{S}_{inner}"] = err
        full = ops.gather_seq(local * 2.0, 1, inner, S, padded, layout, "default", 30.0)
        errs[f"gather_{layout}_{S}_{inner}"] = (full.detach() - 2 * x.detach()).abs().max().item()
        # d(sum(full * w))/dx = 2 w on every rank (gather backward slices, to_local backward sums)
        w = torch.randn(full.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (gx,) = torch.autograd.grad((full * w).sum(), [x])
        errs[f"grad_{layout}_{S}_{inner}"] = (gx - 2 * w).abs().max().item()
    for layout, S, k in (("zigzag", 16, 1), ("contiguous", 12, 2), ("zigzag", 24, 3)):
        padded = padded_length(S, world, layout)
        x = torch.randn(2, S, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        x.requires_grad_(True)
        local = shard_tensor(x, 1, world, rank, layout)
        y = ops.shift_seq(local, 1, k, padded, layout, "default", 30.0)
        full = ops.gather_seq(y, 1, 1, S - k, padded, layout, "default", 30.0)  # drops the junk tail
        errs[f"shift_{layout}_{S}_{k}"] = (full.detach() - x.detach()[:, k:]).abs().max().item()
        w = torch.randn(full.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        (gx,) = torch.autograd.grad((full * w).sum(), [x])  # shard_tensor's grad is local: sum over ranks
        gx = ops.reduce_partial(gx, "default", 30.0)
        want = torch.zeros_like(x)
        want[:, k:] = w
        errs[f"shift_grad_{layout}_{S}_{k}"] = (gx - want).abs().max().item()
    for layout, S, a, b in (("zigzag", 16, 5, 12), ("contiguous", 13, 12, 13), ("zigzag", 12, 0, 1)):
        padded = padded_length(S, world, layout)
        x = torch.randn(2, S, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(a + b))
        x.requires_grad_(True)
        local = shard_tensor(x, 1, world, rank, layout)
        rows = ops.gather_rows(local, 1, a, b, padded, layout, "default", 30.0)
        errs[f"rows_{layout}_{S}_{a}_{b}"] = (rows.detach() - x.detach()[:, a:b]).abs().max().item()
        w = torch.randn(rows.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        (gx,) = torch.autograd.grad((rows * w).sum(), [x])  # each rank's grad covers its own rows only
        gx = ops.reduce_partial(gx, "default", 30.0)
        want = torch.zeros_like(x)
        want[:, a:b] = w
        errs[f"rows_grad_{layout}_{S}_{a}_{b}"] = (gx - want).abs().max().item()
    p = torch.full((2,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    total = ops.reduce_partial(p, "default", 30.0)
    errs["reduce"] = (total.detach() - sum(range(1, world + 1))).abs().max().item()
    r = torch.ones(2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((ops.grad_reduce(r, "default", 30.0) * (rank + 1)).sum(), [r])
    errs["grad_reduce"] = (g - sum(range(1, world + 1))).abs().max().item()
    return {"errs": errs}


def case_tail_rows(rank, world):
    """HF's ``logits_to_keep`` slice (``h[:, -k:]``) and ``h[:, i]`` of a sharded graph: the rows come from
    ``gather_rows`` (a few rows each), not a gather of the whole sequence; values and grads as one process."""
    from ringcompile.options import Options
    from ringcompile.passes.shard import shard_graph

    errs, gathers, targets = {}, [], set()
    for layout, S, pick in (("zigzag", 24, "last"), ("contiguous", 21, "tail3"), ("zigzag", 24, "select"),
                            ("contiguous", 21, "select_mid")):
        torch.manual_seed(S)
        params = make_params()
        names = list(params)
        ids, labels = torch.randint(0, 37, (2, S)), torch.randint(0, 37, (2, S))
        key = register_spec(AttentionSpec(mask=causal(), name="test"))

        def tail(logits, pick=pick, S=S):
            return {"last": logits[:, -1:], "tail3": logits[:, S - 3:], "select": logits[:, -1],
                    "select_mid": logits[:, 7]}[pick]

        def fn(*args, key=key, names=names, tail=tail):
            p = dict(zip(names, args[:len(names)], strict=True))
            logits = model(p, args[-2], args[-1], key=key, H=2, Hkv=2, D=8, mask=causal(), loss=False)[0]
            return (tail(logits),)

        inputs = [params[n] for n in names] + [ids, labels]
        gm = _trace(fn, inputs)
        shard_graph(gm, [], Options(layout=layout))
        report = gm.meta["ringcompile_shard"]
        gathers += report.gathers
        targets |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        (out,) = gm(*inputs)
        ref_params = {n: params[n].detach().clone().requires_grad_(True) for n in names}
        ref = tail(model(ref_params, ids, labels, H=2, Hkv=2, D=8, mask=causal(), loss=False)[0])
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        grads = torch.autograd.grad((out * w).sum(), [params[n] for n in names], allow_unused=True)
        ref_grads = torch.autograd.grad((ref * w).sum(), [ref_params[n] for n in names], allow_unused=True)
        errs[f"{pick}_out"] = (out.detach() - ref.detach()).abs().max().item()
        for n, g, rg in zip(names, grads, ref_grads, strict=True):
            if rg is not None:
                errs[f"{pick}_grad_{n}"] = (g - rg).abs().max().item()
    return {"errs": errs, "gathers": gathers, "targets": sorted(targets), "big_nodes": []}


CASES = ["case_tail_rows", "case_collectives", "case_block_causal",
         "case_block_bidirectional_zigzag", "case_rope_gqa_rmsnorm",
         "case_padding_no_loss", "case_sharded_outputs", "case_padded_loss", "case_shifted_loss",
         "case_shifted_padded_loss", "case_sequence_mean", "case_padded_mean_falls_back",
         "case_neighbour_ops", "case_seq_dims_override", "case_sharded_labels_shift",
         "case_sharded_labels_shift_padded"]


@pytest.fixture(scope="module")
def results():
    return run_cases("test_shard_graphs", CASES, world=2, timeout=240)


def _check(res, name):
    for r, out in enumerate(res[name]):
        assert "error" not in out, f"rank {r}: {out.get('error')}"
        bad = {k: v for k, v in out["errs"].items() if not v < 1e-8}
        assert not bad, f"rank {r} differs from the one-process float64 reference: {bad}"
        assert not out["big_nodes"], f"rank {r} allocates S x S-sized values: {out['big_nodes']}"
    return res[name][0]


def test_collectives_round_trip(results):
    for r, out in enumerate(results["case_collectives"]):
        assert "error" not in out, f"rank {r}: {out.get('error')}"
        bad = {k: v for k, v in out["errs"].items() if not v < 1e-12}
        assert not bad, f"rank {r}: {bad}"


def test_causal_block_matches_one_process(results):
    out = _check(results, "case_block_causal")
    assert list(out["seeds"].values()) == [1]  # only the token ids carry the sequence (dim 1)
    assert out["gathers"] == []
    assert out["out_shape"] == (2, 24, 37)


def test_causal_mask_picks_zigzag(results):
    assert _check(results, "case_rope_gqa_rmsnorm")["layout"] == "zigzag"


def test_bidirectional_zigzag(results):
    out = _check(results, "case_block_bidirectional_zigzag")
    assert out["layout"] == "zigzag"


def test_rope_gqa_rmsnorm(results):
    _check(results, "case_rope_gqa_rmsnorm")


def test_padding_without_loss(results):
    out = _check(results, "case_padding_no_loss")
    assert out["padded"] == 22 and out["out_shape"] == (2, 21, 37)


def test_sharded_outputs(results):
    out = _check(results, "case_sharded_outputs")
    assert out["out_shape"] == (2, 12, 37)
    assert out["layout"] == "contiguous"  # what ringcompile.gather assumes by default


def test_padded_loss(results):
    """21 tokens on 2 ranks: padded to 22; the padding row is ignored by the loss."""
    assert _check(results, "case_padded_loss")["padded"] == 22


def test_shifted_loss_keeps_logits_sharded(results):
    out = _check(results, "case_shifted_loss")
    assert out["gathers"] == [], "logits[:, :-1] must not gather the logits"


def test_shifted_padded_loss(results):
    out = _check(results, "case_shifted_padded_loss")
    assert out["gathers"] == []


def test_ops_reading_neighbours_gather_and_stay_correct(results):
    out = _check(results, "case_neighbour_ops")
    assert out["gathers"], "conv1d / cumsum over the sequence need the full sequence (a gather)"


def test_shift_of_a_shard_uses_a_halo(results):
    out = _check(results, "case_sharded_labels_shift")
    assert out["gathers"] == [] and "ringcompile.shift_seq.default" in out["targets"]


def test_shift_of_a_padded_shard(results):
    out = _check(results, "case_sharded_labels_shift_padded")
    assert out["gathers"] == [] and out["padded"] == 22


def test_seq_dims_option_supplies_the_sequence_dim(results):
    out = _check(results, "case_seq_dims_override")
    assert out["raised"] and "seq_dims" in out["raised"]
    assert out["seeds"] == {"arg10_1": 1}


def test_mean_over_sequence_is_partial(results):
    _check(results, "case_sequence_mean")


def test_padded_mean_is_unsupported_not_wrong(results):
    for out in results["case_padded_mean_falls_back"]:
        assert "error" not in out, out.get("error")
        assert out["raised"] and "reduces over a sequence with padded" in out["raised"]


def test_a_few_rows_of_a_shard_are_gathered_as_rows(results):
    """``h[:, -1:]``, ``h[:, S-3:]``, ``h[:, -1]``, ``h[:, 7]`` after sharded attention: gather_rows, no
    whole-sequence gather, values and every parameter gradient as one process."""
    out = _check(results, "case_tail_rows")
    assert out["gathers"] == [], out["gathers"]
    assert "ringcompile.gather_rows.default" in out["targets"]
