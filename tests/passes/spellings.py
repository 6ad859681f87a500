"""Attention as real models spell it (Falcon, XGLM, OPT, gpt-oss, GraniteSWA, GPT-NeoX-Japanese, Flaubert),
shared by the world-size-1 tests and the 2-rank cases. Each spelling maps (q, k, v, mask) to the attention
output (B, H, S, D); ``kv_heads`` says how many KV heads the spelling wants."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def falcon_inplace(q, k, v, mask):
    """Falcon eager: ``scores /= sqrt(D)`` in place, then ``softmax(scores + mask, dtype=)``."""
    s = q @ k.transpose(-1, -2)
    s /= math.sqrt(q.shape[-1])
    return F.softmax(s + mask, dim=-1, dtype=q.dtype) @ v


def inplace_chain(q, k, v, mask):
    """mul_, add_, masked_fill_ and div_ on the score chain, each mutating a fresh value."""
    s = torch.matmul(q, k.transpose(-1, -2))
    s.mul_(0.5)
    s.add_(mask)
    s.div_(1.5)
    s.masked_fill_(mask < -1, float("-inf"))
    return torch.softmax(s, -1) @ v


def xglm_round_trip(q, k, v, mask):
    """XGLM: bmm on (B*H, S, D), view to (B, H, S, S) for the mask and the finfo.min floor, back, bmm."""
    B, H, S, D = q.shape
    q3, k3, v3 = (t.reshape(B * H, S, D) for t in (q, k, v))
    w = torch.bmm(q3 * D ** -0.5, k3.transpose(1, 2))
    w = w.view(B, H, S, S) + mask
    w = torch.max(w, torch.full((), torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device))
    w = w.view(B * H, S, S)
    p = F.softmax(w, dim=-1).view(B, H, S, S).view(B * H, S, S)  # "keeps its gradient", as XGLM says
    return torch.bmm(p, v3).view(B, H, S, D)


def falcon_sdpa_mqa(q, k, v, mask):
    """Falcon multi_query sdpa: one KV head broadcast by SDPA itself."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def mqa_expand(q, k, v, mask):
    """One KV head expanded to H heads (a view, no copy) before a softmax chain."""
    H = q.shape[1]
    k, v = (t.expand(-1, H, -1, -1) for t in (k, v))
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask, -1) @ v


SPELLINGS = {"falcon_inplace": (falcon_inplace, 1), "inplace_chain": (inplace_chain, None),
             "xglm_round_trip": (xglm_round_trip, None), "falcon_sdpa_mqa": (falcon_sdpa_mqa, 1),
             "mqa_expand": (mqa_expand, 1)}


# the spellings that take a ``sinks`` parameter
SINK_SPELLINGS = ("gpt_oss_sinks", "granite_swa_lse_sinks", "granite_swa_lse_sinks_model_dtype")


def causal_additive(S: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((S, S), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


class SpellingLM(torch.nn.Module):
    """Embedding -> q/k/v projections -> one attention spelling (causal) -> head, with a loss."""

    def __init__(self, spelling: str, vocab=53, dim=32, heads=4):
        super().__init__()
        self.fn, kv = SPELLINGS[spelling]
        self.heads, self.kv = heads, kv or heads
        self.d = dim // heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv_proj = torch.nn.Linear(dim, 2 * self.kv * self.d)
        self.head = torch.nn.Linear(dim, vocab)
        self.extra = ()
        if spelling in SINK_SPELLINGS:  # a learned sink logit per head: its gradient comes through lse
            self.sinks = torch.nn.Parameter(torch.linspace(-1.0, 1.5, heads))
            self.extra = ("sinks",)

    def forward(self, ids, labels):
        b, s = ids.shape
        x = self.emb(ids)
        q = self.q(x).view(b, s, self.heads, self.d).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, s, 2, self.kv, self.d).permute(2, 0, 3, 1, 4)
        extra = {"sinks": self.sinks} if "sinks" in self.extra else {}
        y = self.fn(q, k, v, causal_additive(s, torch.float32).to(x.dtype), **extra)
        logits = self.head(x + y.transpose(1, 2).reshape(b, s, -1))
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def gpt_oss_sinks(q, k, v, mask, sinks=None):
    """gpt-oss: a learned per-head logit column joins the softmax, minus the row max, then is sliced off."""
    B, H, S, D = q.shape
    if sinks is None:
        sinks = torch.linspace(-1.0, 2.0, H, dtype=q.dtype)
    w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
    col = sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)
    logits = torch.cat([w, col], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)
    return torch.matmul(probs[..., :-1].to(v.dtype), v)


SPELLINGS["gpt_oss_sinks"] = (gpt_oss_sinks, None)


def granite_swa_lse_sinks(q, k, v, mask, sinks=None, forced=torch.float32):
    """GraniteSWA eager: the sink as post-attention lse scaling, ``out * sigmoid(logsumexp(w) - sink)`` with
    the softmax and the scale forced to float32 (an extra softmax-denominator logit per head); ``forced=None``
    keeps both in the model's dtype (float64 runs are then exact)."""
    H = q.shape[1]
    if sinks is None:
        sinks = torch.linspace(-1.0, 2.0, H, dtype=q.dtype)
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
    lse = torch.logsumexp(w, dim=-1)
    scale = (lse - sinks.view(1, -1, 1)).to(forced or q.dtype).sigmoid()
    p = F.softmax(w, dim=-1, dtype=forced or q.dtype).to(q.dtype)
    out = torch.matmul(p, v)
    return out * scale.unsqueeze(-1).to(out.dtype)


def neox_japanese_baddbmm(q, k, v, mask):
    """GPT-NeoX-Japanese ``_attn``: q/k merged to (B*H, S, D), ``baddbmm(zeros, q, k^T, beta=1, alpha=)``,
    viewed back to (B, H, S, S) for the mask, then a 4-D matmul with v."""
    B, H, S, D = q.shape
    q3, k3 = q.reshape(B * H, S, D), k.reshape(B * H, S, D)
    zeros = torch.zeros(B * H, S, S, dtype=q.dtype, device=q.device)
    w = torch.baddbmm(zeros, q3, k3.transpose(1, 2), beta=1.0, alpha=1.0 / math.sqrt(D))
    w = w.view(B, H, S, -1) + mask
    p = F.softmax(w, dim=-1).to(v.dtype)
    return torch.matmul(p, v)


def flaubert_masked_fill(q, k, v, mask):
    """Flaubert / XLM: q pre-scaled, a keep mask expanded with ``expand_as(scores)``, ``masked_fill_`` on the
    scores, then ``softmax(scores.float()).type_as(scores)`` (the scores are dtype templates of both)."""
    B, H, S, D = q.shape
    keep = (mask[:, 0] == 0).to(torch.int64).expand(B, S, S)  # 1 = attend, like the model's mask argument
    q = q / math.sqrt(D)
    scores = torch.matmul(q, k.transpose(2, 3))
    masked = (keep == 0).view(B, 1, S, -1).expand_as(scores)
    scores.masked_fill_(masked, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores.float(), dim=-1).type_as(scores)
    return torch.matmul(weights, v)


_granite_model_dtype = functools.partial(granite_swa_lse_sinks, forced=None)
SPELLINGS.update({"granite_swa_lse_sinks": (granite_swa_lse_sinks, None),
                  "granite_swa_lse_sinks_model_dtype": (_granite_model_dtype, None),
                  "neox_japanese_baddbmm": (neox_japanese_baddbmm, None),
                  "flaubert_masked_fill": (flaubert_masked_fill, None)})
