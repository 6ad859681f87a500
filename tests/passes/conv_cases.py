"""Cases for test_shard_conv.py, importable in spawned ranks: attention whose projections are 1-D
convolutions over a (B, C, S) layout, the way SqueezeBERT writes them, under backend="ring" vs float64 eager
on the unsharded input in one process.

- ``ConvProjections(kernel=1)``: q/k/v and output projections are ``Conv1d(k=1, groups=2)``; position-local,
  so the sequence passes through them and the graph is sharded (it was unsharded: ``aten.conv1d`` had no
  sequence rule). Conv weights and biases are replicated: their gradients must be summed over ranks once.
  Also under ``dynamic=True`` (one symbolic graph for several lengths, padded ones too).
- ``ConvProjections(kernel=3)``: the projections read neighbouring positions; the walk back from the attention
  stops there, so the graph runs unsharded with the convolution's reason (and stays right).
- ``ConvAfterAttention``: k=1 projections, then a causal depthwise ``Conv1d(k=3)`` over time (a Mamba-like
  mixer) on the sharded attention output: sharded, that conv gathered with its reason.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

B, H, D = 2, 2, 4
E = H * D


class ConvProjections(torch.nn.Module):
    """SqueezeBERT's self-attention: grouped Conv1d q/k/v over (B, E, S), heads split as (B, H, D, S)."""

    def __init__(self, kernel: int = 1, causal: bool = False) -> None:
        super().__init__()
        pad = kernel // 2
        self.q, self.k, self.v = (torch.nn.Conv1d(E, E, kernel, padding=pad, groups=2) for _ in range(3))
        self.out = torch.nn.Conv1d(E, E, 1, groups=2)
        self.causal = causal

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], H, D, x.shape[-1]).permute(0, 1, 3, 2)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, E) -> attention over the sequence -> (B, E, S) through the output conv."""
        xc = x.permute(0, 2, 1)
        q, k, v = self.heads(self.q(xc)), self.heads(self.k(xc)), self.heads(self.v(xc))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(a.permute(0, 1, 3, 2).reshape(x.shape[0], E, x.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(x).permute(0, 2, 1)
        return F.layer_norm(x + y, (E,))


class ConvAfterAttention(ConvProjections):
    """k=1 projections, then a causal depthwise conv over time (kernel 3, padding 2, the last 2 outputs
    dropped: Mamba's spelling) and a residual."""

    def __init__(self) -> None:
        super().__init__(kernel=1, causal=True)
        self.time = torch.nn.Conv1d(E, E, 3, padding=2, groups=E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(x)
        y = y + self.time(y)[..., : y.shape[-1]]
        return x + y.permute(0, 2, 1).tanh()


def compare(model: torch.nn.Module, S: int) -> dict:
    """Output error and relative gradient errors (per parameter) against float64 eager on the full input."""
    from ringcompile import backend

    torch.manual_seed(0)
    model = model.double()
    for p in model.parameters():  # fresh, non-trivial values (biases too)
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(B, S, E, dtype=torch.float64)
    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    first = len(backend.HISTORY)
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    out, r_out = compiled(x), ref(x)
    g = torch.randn(r_out.shape, generator=torch.Generator().manual_seed(9), dtype=r_out.dtype)
    (out * g).sum().backward()
    (r_out * g).sum().backward()
    # relative to each reference gradient, floored at 1e-3 of the largest: the key bias's gradient is zero
    # in exact arithmetic (it shifts a query's scores by one constant, which softmax ignores)
    floor = 1e-3 * max(q.grad.abs().max().item() for q in ref.parameters())
    grads = {name: ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(floor)).item()
             for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True)}
    entries = backend.HISTORY[first:]
    reports = [e.graph.meta["ringcompile_shard"] for e in entries
               if e.graph is not None and e.graph.meta.get("ringcompile_shard") is not None]
    return {"out": ((out - r_out).abs().max() / r_out.abs().max()).item(), "grads": grads,
            "reasons": [e.fallback_reason for e in entries if e.fallback_reason],
            "sharded": bool(reports),
            "gather_reasons": [w for r in reports for w in r.gather_reasons.values()],
            "gathered_in_decisions": [d.reason for e in entries for d in e.decisions
                                      if d.pattern == "gather"]}


def case_k1_causal(rank, world):
    return compare(ConvProjections(kernel=1, causal=True), S=8)


def case_k1_padded(rank, world):
    """7 tokens on 2 ranks: the padded position holds junk that must not reach the conv weight gradients."""
    return compare(ConvProjections(kernel=1, causal=False), S=7)


def case_k3_projections(rank, world):
    return compare(ConvProjections(kernel=3, causal=True), S=8)


def case_conv_after_attention(rank, world):
    return compare(ConvAfterAttention(), S=8)


def case_k1_dynamic(rank, world):
    """``dynamic=True``: one symbolic graph serves 8, 6 and 11 tokens (11: padded), each against eager."""
    from ringcompile import backend

    torch.manual_seed(0)
    model = ConvProjections(kernel=1, causal=True).double()
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    first = len(backend.HISTORY)
    compiled = torch.compile(model, backend="ring", dynamic=True, options={"inner": "eager"})
    errs = {}
    for S in (8, 6, 11):
        x = torch.randn(B, S, E, dtype=torch.float64)
        out, r_out = compiled(x), ref(x)
        errs[S] = ((out - r_out).abs().max() / r_out.abs().max()).item()
    entries = backend.HISTORY[first:]
    reports = [e.graph.meta["ringcompile_shard"] for e in entries
               if e.graph is not None and e.graph.meta.get("ringcompile_shard") is not None]
    return {"errs": errs, "graphs": len(entries), "dynamic": [r.dynamic for r in reports],
            "gathers": [r.gathers for r in reports],
            "reasons": [e.fallback_reason for e in entries if e.fallback_reason]}
