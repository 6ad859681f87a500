"""Cases for test_row_shift.py, importable in spawned ranks: softmax-invariant row shifts and Inkling2's
sinks, as small LMs (embedding -> attention spelling -> head, with a loss) run under backend="ring" and
compared with float64 eager on the unsharded input.

- ``shift_*``: MiMo-V2-Flash's ``w - w.max(-1, keepdim=True).values`` before the softmax, and the other
  spellings of a row-max shift (amax, a detached max, a max unsqueezed back, a positive dim, a cast
  between the shift and the softmax); ``wrong_dim``: a max over the query dim, which the softmax is not
  invariant to;
- ``inkling``: Inkling2's relative-position bias (a per-query bias bank gathered at the clamped
  distance, zero outside its extent), a per-query sink column computed from the hidden states,
  ``cat([w, sinks], -1)`` cast before the softmax and the sink column sliced off after it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

V, DIM, HEADS, EXTENT, D_REL = 37, 16, 2, 5, 3


def _causal(s: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((s, s), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _row_max(w: torch.Tensor, spelling: str) -> torch.Tensor:
    """The value a spelling subtracts from the scores."""
    if spelling == "max_values":
        return w.max(dim=-1, keepdim=True).values
    if spelling == "amax":
        return torch.amax(w, dim=-1, keepdim=True)
    if spelling == "detach":
        return w.max(dim=-1, keepdim=True).values.detach()
    if spelling == "unsqueeze":
        return torch.max(w, -1)[0].unsqueeze(-1)
    if spelling == "positive_dim":
        return w.amax(dim=3, keepdim=True)
    if spelling == "wrong_dim":  # over the queries: varies along each row
        return w.max(dim=-2, keepdim=True).values
    raise ValueError(spelling)


def shifted_attention(q, k, v, mask, spelling="max_values", cast=None):
    """MiMo-V2-Flash eager without sinks: scores plus mask, minus their row max, softmax in their dtype."""
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
    w = w - _row_max(w, spelling)
    if cast is not None:
        w = w.to(cast)
    p = F.softmax(w, dim=-1, dtype=w.dtype)
    return torch.matmul(p.to(v.dtype), v)


class RelativePositionBias(torch.nn.Module):
    """Inkling2's bias: per-query, per-head states mix a bank of bias-vs-distance profiles, gathered at
    ``clamp(q - kv, 0, E - 1)`` and zero outside ``0 <= q - kv < E``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(DIM, HEADS * D_REL, bias=False)
        self.proj = torch.nn.Parameter(torch.randn(D_REL, EXTENT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        pos = torch.arange(s, device=x.device)
        dist = pos[:, None] - pos[None, :]
        states = self.linear(x).view(b, s, HEADS, D_REL)
        rel = (states @ self.proj).transpose(1, 2)  # (B, H, S, E)
        index = dist.clamp(0, EXTENT - 1).expand(b, HEADS, -1, -1)
        bias = rel.gather(-1, index)
        return bias.masked_fill((dist < 0) | (dist >= EXTENT), 0.0)


class ShiftLM(torch.nn.Module):
    """Embedding -> q/k/v -> one attention spelling (causal) -> head, with a loss.

    ``kind``: a row-shift spelling of ``shifted_attention``, or ``"inkling"`` (bias, sinks, cast cat)."""

    def __init__(self, kind: str, cast: torch.dtype | None = None) -> None:
        super().__init__()
        self.kind, self.cast = kind, cast
        self.emb = torch.nn.Embedding(V, DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.head = torch.nn.Linear(DIM, V)
        if kind == "inkling":
            self.sink_proj = torch.nn.Linear(DIM, HEADS, bias=False)
            self.bias = RelativePositionBias()

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        mask = _causal(s, torch.float32).to(x.dtype)
        if self.kind != "inkling":
            return shifted_attention(q, k, v, mask, self.kind, self.cast)
        w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + self.bias(x) + mask
        sinks = self.sink_proj(x).transpose(1, 2).unsqueeze(-1)  # (B, H, S, 1): one sink logit per query
        combined = torch.cat([w, sinks], dim=-1)
        combined = combined.float() if self.cast is None else combined.to(self.cast)
        p = F.softmax(combined, dim=-1)[..., :-1].to(q.dtype)
        return torch.matmul(p, v)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor):
        b, s = ids.shape
        x = self.emb(ids)
        y = self.attend(x).transpose(1, 2).reshape(b, s, DIM)
        logits = self.head(x + y)
        return logits, F.cross_entropy(logits.view(-1, V), labels.view(-1))


def compare(kind: str, cast: torch.dtype | None = None, dtype: torch.dtype = torch.float64,
            seq: int = 12) -> dict:
    """backend="ring" on a ``dtype`` model vs float64 eager: logits, loss and every parameter's gradient
    (relative to the reference's largest), the sites found and the reasons given."""
    from ringcompile import backend

    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = ShiftLM(kind, cast).double()
    model = copy.deepcopy(ref).to(dtype)
    g = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(0, V, (2, seq), generator=g), torch.randint(0, V, (2, seq), generator=g)
    first = len(backend.HISTORY)
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    logits, loss = compiled(ids, labels)
    (logits.sum() * 1e-2 + loss).backward()
    r_logits, r_loss = ref(ids, labels)
    (r_logits.sum() * 1e-2 + r_loss).backward()
    grads = {name: ((p.grad.double() - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-30)).item()
             for (name, p), r in zip(model.named_parameters(), ref.parameters(), strict=True)}
    entries = backend.HISTORY[first:]
    return {"out": ((logits.double() - r_logits).abs().max() / r_logits.abs().max()).item(),
            "loss": abs(loss.item() - r_loss.item()), "grads": grads,
            "sites": [(s.pattern, s.rewritten) for e in entries for s in e.sites],
            "reasons": [r.reason for e in entries for r in e.rejected] + [e.fallback_reason for e in entries
                                                                          if e.fallback_reason],
            "sharded": any(e.graph is not None and e.graph.meta.get("ringcompile_shard") is not None
                           for e in entries)}


def case_shift_max_values(rank, world):
    return compare("max_values")


def case_shift_detach(rank, world):
    return compare("detach")


def case_wrong_dim(rank, world):
    return compare("wrong_dim")


def case_inkling_float64(rank, world):
    return compare("inkling", cast=torch.float64)


def case_inkling_float(rank, world):
    return compare("inkling")
