"""Small random transformer-like models for the differential test (tests/test_differential.py).

A ``Spec`` is a handful of drawn choices over the ops real models use around attention; ``DiffLM(spec)``
builds the model. ``draw_spec(pick)`` is the one place the choices and their constraints live: under
hypothesis ``pick`` draws (so failures shrink), in the spawned ranks it replays a list of specs the parent
drew. ``run_example`` compiles the model with ``backend="ring"`` and with ``backend="aot_eager"`` and
returns the errors and what the backend did (sharded or not, and why).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

V, E, D = 29, 16, 8


@dataclasses.dataclass(frozen=True)
class Spec:
    batch: int = 2
    seq: int = 8
    heads: int = 2
    kv_heads: int = 2
    layers: int = 1
    spelling: str = "sdpa"       # sdpa | matmul | bmm (merged heads (B*H, S, D)) | einsum
    gqa: str = "repeat_interleave"  # repeat_interleave | expand (HF repeat_kv) | sdpa_gqa (enable_gqa=True)
    rope: str = "none"           # none | rotate_half | interleaved | complex | learned_pos
    cast: str = "none"           # none | type_as (no-op casts) | float32_softmax (then type_as)
    inplace: tuple[str, ...] = ()  # subset of q_mul_, scores_div_, residual_add_, mlp_mul_, and writes
    #                                into inputs and shards: ids_clamp_ (the sharded ids input, before the
    #                                embedding reads it), hidden_view_add_ (x[..., :E/2] += through a view
    #                                of the embedded shard), labels_fill_ (labels.masked_fill_ on padding,
    #                                a replicated input, before the loss)
    custom_fn: bool = False      # an autograd.Function with its own (bounded) backward in the MLP
    bias: str = "none"           # none | relative (learned table, T5-style) | alibi | c2p (manual spellings:
    #                              DeBERTa's content->position term, gather(q @ pos_k^T) over q - kv)
    mask: str = "none"           # none | causal | padding | window | causal_padding
    mask_style: str = "bool"     # bool (masked_fill / bool attn_mask) | additive (finfo.min * (1 - m))
    sink: bool = False           # gpt-oss attention sinks (a learned logit column, softmax, sliced off)
    cache: str = "none"          # none | empty (cat with an empty past, as a fresh DynamicCache) | prefix
    loss: bool = True
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Spec:
        return Spec(**{**d, "inplace": tuple(d["inplace"])})


Pick = Callable[[str, Sequence[Any]], Any]


# drawn 1 in 6: patterns the backend does not shard today (it falls back with the reason: in-place division
# of the scores, attention sinks; a learned K/V prefix is cross-length attention by design), so that most
# examples still exercise sharding
RARE = [False] * 5 + [True]
# in-place writes into graph inputs and into a shard (drawn last, so the other fields draw as before)
INPUT_WRITES = ("ids_clamp_", "hidden_view_add_", "labels_fill_")


def draw_spec(pick: Pick) -> Spec:
    """A Spec from ``pick(field, options)`` (repeated options weigh more); options that do not combine are not
    offered."""
    heads = pick("heads", [2, 4])
    kv_heads = pick("kv_heads", [h for h in (4, 2, 1) if h <= heads])
    spelling = pick("spelling", ["sdpa", "matmul", "einsum", "sdpa", "matmul", "bmm"])
    gqa = pick("gqa", ["repeat_interleave", "expand"] + (["sdpa_gqa"] if spelling == "sdpa" else []))
    manual = spelling != "sdpa"
    inplace = tuple(x for x in ("q_mul_", "scores_div_", "residual_add_", "mlp_mul_")
                    if (x != "scores_div_" or manual)
                    and pick(f"inplace_{x}", RARE if x == "scores_div_" else [False, True]))
    inplace += tuple(x for x in INPUT_WRITES if pick(f"inplace_{x}", [False, False, True]))
    return Spec(
        batch=pick("batch", [1, 2]), seq=pick("seq", [8, 12, 16, 10]), heads=heads, kv_heads=kv_heads,
        layers=pick("layers", [1, 2]), spelling=spelling, gqa=gqa,
        rope=pick("rope", ["none", "rotate_half", "interleaved", "complex", "learned_pos"]),
        cast=pick("cast", ["none", "type_as"] + (["float32_softmax"] if manual else [])),
        inplace=inplace, custom_fn=pick("custom_fn", [False, True]),
        bias=pick("bias", ["none", "relative", "alibi"] + (["c2p"] if manual else [])),
        mask=pick("mask", ["none", "causal", "padding", "window", "causal_padding"]),
        mask_style=pick("mask_style", ["bool", "additive"]),
        sink=manual and pick("sink", RARE),
        cache=pick("cache", ["none", "empty", "none", "empty", "none", "prefix"]),
        loss=pick("loss", [True, False]), seed=pick("seed", list(range(4))))


# ---------------------------------------------------------------------------- the model


class BoundedTanh(torch.autograd.Function):
    """tanh whose backward keeps at least 0.2 of the gradient (a bounded derivative, as RecurrentGemma's
    SqrtBoundDerivative): differs from autograd's derivative, so inlining it changes the gradients."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y).clamp(min=0.2)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        h, hk = spec.heads, spec.kv_heads
        self.q = torch.nn.Linear(E, h * D)
        self.k = torch.nn.Linear(E, hk * D)
        self.v = torch.nn.Linear(E, hk * D)
        self.o = torch.nn.Linear(h * D, E)
        if spec.bias == "relative":
            self.rel = torch.nn.Embedding(2 * 4 + 1, h)
        if spec.bias == "c2p":  # a key per relative distance -4..3, per head
            self.pos_k = torch.nn.Parameter(torch.randn(h, 2 * 4, D) * 0.3)
        if spec.sink:
            self.sinks = torch.nn.Parameter(torch.randn(h) * 0.5)
        if spec.cache == "prefix":
            self.prefix_k = torch.nn.Parameter(torch.randn(hk, 2, D) * 0.3)
            self.prefix_v = torch.nn.Parameter(torch.randn(hk, 2, D) * 0.3)

    # -- pieces
    def rope(self, x, pos):
        s = self.spec
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D))
        freqs = torch.outer(pos.to(torch.float64), inv)  # (S, D/2)
        if s.rope == "rotate_half":
            emb = torch.cat((freqs, freqs), dim=-1)
            return x * emb.cos().type_as(x) + _rotate_half(x) * emb.sin().type_as(x)
        if s.rope == "interleaved":
            x1, x2 = x[..., 0::2], x[..., 1::2]
            c, si = freqs.cos(), freqs.sin()
            return torch.stack((x1 * c - x2 * si, x1 * si + x2 * c), dim=-1).flatten(-2)
        if s.rope == "complex":  # Llama-4 / Meta Llama: view_as_complex, multiply, view_as_real, type_as
            cis = torch.polar(torch.ones_like(freqs), freqs)
            xc = torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2).contiguous())
            return torch.view_as_real(xc * cis).flatten(-2).type_as(x)
        return x

    def repeat(self, t):
        s = self.spec
        n = s.heads // s.kv_heads
        if n == 1 or s.gqa == "sdpa_gqa":
            return t
        if s.gqa == "repeat_interleave":
            return torch.repeat_interleave(t, n, dim=1)
        b, hk, L, d = t.shape
        return t[:, :, None, :, :].expand(b, hk, n, L, d).reshape(b, hk * n, L, d)

    def keep(self, B, S, L, P, pad, device):
        """The bool mask (B, 1, S, L) of kept (query, key) pairs, or None; keys 0..P-1 are the prefix."""
        m = self.spec.mask
        if m == "none":
            return None
        qpos = torch.arange(S, device=device)[:, None] + P
        kpos = torch.arange(L, device=device)[None, :]
        keep = torch.ones(S, L, dtype=torch.bool, device=device)
        if m in ("causal", "causal_padding", "window"):
            keep = keep & (kpos <= qpos)
        if m == "window":
            keep = keep & (qpos - kpos < 4)
        keep = keep[None, None].expand(B, 1, S, L)
        if m in ("padding", "causal_padding"):
            kp = torch.cat((torch.ones(B, P, dtype=torch.bool, device=device), pad.bool()), dim=1)
            keep = keep & kp[:, None, None, :]
        return keep

    def extra(self, S, L, P, dtype, device):
        """The (1, H, S, L) additive position bias, or None."""
        s = self.spec
        if s.bias in ("none", "c2p"):
            return None
        qpos = torch.arange(S, device=device)[:, None] + P
        kpos = torch.arange(L, device=device)[None, :]
        if s.bias == "relative":
            bucket = (kpos - qpos).clamp(-4, 4) + 4
            return self.rel(bucket).permute(2, 0, 1).unsqueeze(0)
        slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(s.heads)], dtype=dtype, device=device)
        return -(slopes[:, None, None] * (qpos - kpos).abs().to(dtype)).unsqueeze(0)

    def c2p(self, q, L):
        """DeBERTa's content->position bias on (B, H, S, D) or merged (B*H, S, D) queries:
        ``gather(q @ pos_k^T, -1, clamp(q_pos - kv_pos + 4, 0, 7))``."""
        S = q.shape[-2]
        P = L - S if self.spec.cache == "prefix" else 0
        pos_k = self.pos_k if q.dim() == 4 else self.pos_k.repeat(q.shape[0] // self.spec.heads, 1, 1)
        att = q @ pos_k.transpose(-1, -2).to(q.dtype)  # (.., S, 8)
        rel = torch.arange(S, device=q.device)[:, None] + P - torch.arange(L, device=q.device)[None, :]
        index = torch.clamp(rel + 4, 0, 7).expand(*q.shape[:-2], S, L)
        return torch.gather(att, -1, index)

    def forward(self, x, pad):
        s = self.spec
        B, S, _ = x.shape
        q = self.q(x).view(B, S, s.heads, D).transpose(1, 2)
        k = self.k(x).view(B, S, s.kv_heads, D).transpose(1, 2)
        v = self.v(x).view(B, S, s.kv_heads, D).transpose(1, 2)
        P = 2 if s.cache == "prefix" else 0
        if s.rope in ("rotate_half", "interleaved", "complex"):
            pos = torch.arange(S, device=x.device) + P
            q, k = self.rope(q, pos), self.rope(k, pos)
        if s.cache == "empty":
            past = torch.zeros(B, s.kv_heads, 0, D, dtype=k.dtype, device=k.device)
            k, v = torch.cat((past, k), dim=2), torch.cat((past, v), dim=2)
        elif s.cache == "prefix":
            k = torch.cat((self.prefix_k.expand(B, -1, -1, -1), k), dim=2)
            v = torch.cat((self.prefix_v.expand(B, -1, -1, -1), v), dim=2)
        if s.cast == "type_as":
            q, k = q.to(x.dtype), k.type_as(q)
        if "q_mul_" in s.inplace:
            q = q.clone()
            q.mul_(1.5)
        L = k.shape[2]
        keep = self.keep(B, S, L, P, pad, x.device)
        bias = self.extra(S, L, P, x.dtype, x.device)
        k, v = self.repeat(k), self.repeat(v)
        y = self.sdpa(q, k, v, keep, bias) if s.spelling == "sdpa" else self.manual(q, k, v, keep, bias)
        return self.o(y.transpose(1, 2).reshape(B, S, s.heads * D))

    def sdpa(self, q, k, v, keep, bias):
        s = self.spec
        kw = {"enable_gqa": True} if s.gqa == "sdpa_gqa" and s.heads != s.kv_heads else {}
        mask = None
        if keep is not None and s.mask_style == "bool" and bias is None:
            mask = keep
        elif keep is not None:
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~keep, torch.finfo(q.dtype).min)
        if bias is not None:
            mask = bias if mask is None else mask + bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)

    def manual(self, q, k, v, keep, bias):
        s = self.spec
        B, H, S, _ = q.shape
        L = k.shape[2]
        if s.spelling == "bmm":  # merged heads (B*H, S, D), DeBERTa / Bloom style
            scores = torch.bmm(q.reshape(B * H, S, D), k.reshape(B * H, L, D).transpose(1, 2))
            if bias is not None:
                scores = scores + bias.expand(B, H, S, L).reshape(B * H, S, L)
            if s.bias == "c2p":
                scores = scores + self.c2p(q.reshape(B * H, S, D), L)
            scores = scores.view(B, H, S, L)
            v = v.reshape(B * H, L, D)
        elif s.spelling == "einsum":
            scores = torch.einsum("bhsd,bhld->bhsl", q, k)
        else:
            scores = q @ k.transpose(-1, -2)
        if "scores_div_" in s.inplace:
            scores.div_(math.sqrt(D))
        else:
            scores = scores / math.sqrt(D)
        if bias is not None and s.spelling != "bmm":
            scores = scores + bias
        if s.bias == "c2p" and s.spelling != "bmm":
            scores = scores + self.c2p(q, L)
        if keep is not None:
            if s.mask_style == "bool":
                scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
            else:
                scores = scores + (1.0 - keep.to(scores.dtype)) * torch.finfo(scores.dtype).min
        if s.sink:
            col = self.sinks.view(1, H, 1, 1).expand(B, H, S, 1).to(scores.dtype)
            scores = torch.cat((scores, col), dim=-1)
        if s.cast == "float32_softmax":
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(q)
        else:
            probs = scores.softmax(-1)
        if s.sink:
            probs = probs[..., :-1]
        if s.spelling == "bmm":
            return torch.bmm(probs.reshape(B * H, S, L), v).view(B, H, S, D)
        return probs @ v


class Block(torch.nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.ln1, self.ln2 = torch.nn.LayerNorm(E), torch.nn.LayerNorm(E)
        self.attn = Attention(spec)
        self.up, self.down = torch.nn.Linear(E, 2 * E), torch.nn.Linear(2 * E, E)

    def forward(self, x, pad):
        s = self.spec
        a = self.attn(self.ln1(x), pad)
        if "residual_add_" in s.inplace:
            x = x.clone()
            x.add_(a)
        else:
            x = x + a
        h = self.up(self.ln2(x))
        if "mlp_mul_" in s.inplace:
            h.mul_(0.5)
        h = BoundedTanh.apply(h) if s.custom_fn else F.gelu(h)
        return x + self.down(h)


class DiffLM(torch.nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.emb = torch.nn.Embedding(V, E)
        if spec.rope == "learned_pos":
            self.pos = torch.nn.Embedding(32, E)
        self.blocks = torch.nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.head = torch.nn.Linear(E, V)

    def forward(self, ids, pad, labels):
        if "ids_clamp_" in self.spec.inplace:   # the caller sees its ids written (before the embedding
            ids.clamp_(max=V - 3)               # saves them for its backward)
        x = self.emb(ids)
        if "hidden_view_add_" in self.spec.inplace:
            x[..., : E // 2] += 0.5
        if self.spec.rope == "learned_pos":
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, pad)
        logits = self.head(x)
        if "labels_fill_" in self.spec.inplace:
            labels.masked_fill_(pad == 0, -100)
        if not self.spec.loss:
            return (logits,)
        return logits, F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))


# ---------------------------------------------------------------------------- one example


def build(spec: Spec):
    torch.manual_seed(spec.seed)
    model = DiffLM(spec).double()
    g = torch.Generator().manual_seed(100 + spec.seed)
    ids = torch.randint(0, V, (spec.batch, spec.seq), generator=g)
    labels = torch.randint(0, V, (spec.batch, spec.seq), generator=g)
    pad = torch.ones(spec.batch, spec.seq, dtype=torch.long)
    pad[-1, spec.seq - 3:] = 0  # right padding in the last row (every query keeps key 0)
    return model, (ids, pad, labels)


def _run(model, inputs, backend: str):
    from ringcompile import backend as rb

    torch._dynamo.reset()
    first = len(rb.HISTORY)
    opts = {"options": {"inner": "eager"}} if backend == "ring" else {}
    inputs = [x.clone() for x in inputs]  # the model may write into them: each run gets its own
    out = torch.compile(model, backend=backend, dynamic=False, **opts)(*inputs)
    g = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(9), dtype=out[0].dtype)
    total = (out[0] * g).sum() + (out[1] if len(out) > 1 else 0)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return [o.detach() for o in out], grads, rb.HISTORY[first:], inputs


def _rel(a, b) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def run_example(spec: Spec, world: int) -> dict:
    """Errors of ring vs aot_eager, and what the backend did: {"out", "grad", "sharded", "reasons", ...}."""
    model, inputs = build(spec)
    ref = copy.deepcopy(model)
    r_out, r_grads, _, r_after = _run(ref, inputs, "aot_eager")
    out, grads, entries, after = _run(model, inputs, "ring")
    errs = {"out": max(_rel(a, b) for a, b in zip(out, r_out, strict=True)),
            # the inputs after the call (in-place writes the caller sees): how many entries differ
            "inputs": float(sum((a != b).sum().item() for a, b in zip(after, r_after, strict=True)))}
    scale = max(g.abs().max().item() for g in r_grads.values() if g is not None) or 1.0
    gerr, missing = 0.0, []
    for name, rg in r_grads.items():
        if (rg is None) != (grads[name] is None):
            missing.append(name)
        elif rg is not None:
            gerr = max(gerr, (grads[name] - rg).abs().max().item() / scale)
    errs["grad"] = float("inf") if missing else gerr
    sites = [s for e in entries for s in e.sites]
    rewritten = sum(bool(s.rewritten) for s in sites)
    sharded_graphs = sum(1 for e in entries if e.graph is not None
                         and e.graph.meta.get("ringcompile_shard") is not None)
    reasons = [f"{d.stage} {d.location}: {d.reason}" for e in entries for d in e.decisions
               if d.leaves_attention_unsharded]
    reasons += [f"fallback: {e.fallback_reason}" for e in entries if e.fallback_reason]
    if world > 1:
        reasons += [f"{d.stage}: {d.reason}" for e in entries for d in e.decisions
                    if d.stage == "shard" and d.outcome == "not sharded"]
    sharded = rewritten >= spec.layers and (world == 1 or sharded_graphs > 0) and not reasons
    return {"spec": spec.as_dict(), "errs": errs, "missing_grads": missing, "rewritten": rewritten,
            "sharded": sharded, "reasons": reasons[:6]}


def tolerance(spec: Spec) -> float:
    """float64 models: tight; a float32 softmax (the reference's) is float32-accurate only."""
    return 1e-5 if spec.cast == "float32_softmax" else 1e-8


def verdict(rec: dict) -> str | None:
    """None when the example is fine, else what is wrong with it."""
    spec = Spec.from_dict(rec["spec"])
    tol = tolerance(spec)
    bad = {k: v for k, v in rec["errs"].items() if not v <= tol}
    if bad:
        return f"ring differs from aot_eager: {bad} (tol {tol:g}), missing grads {rec['missing_grads']}"
    if not rec["sharded"] and not rec["reasons"]:
        return "not sharded, and no reason given (silent fallback)"
    return None
