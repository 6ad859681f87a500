"""Cases for test_shard_grad_mode.py, importable in spawned ranks: a model that uses the same parameters and
input first under ``torch.no_grad()`` and then with grad on (HRM's recurrence), under backend="ring" vs the
same model in one process."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

B, H, S, D = 2, 2, 8, 4


class NoGradThenGrad(torch.nn.Module):
    """Attention run twice on shared weights: a no-grad warm-up step, then a step with grad; ``only_no_grad``
    is used under no_grad only, so its gradient must stay None."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.out = torch.nn.Linear(H * D, H * D)
        self.only_no_grad = torch.nn.Linear(H * D, H * D)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(B, S, H * D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.only_no_grad(self.step(x))
        return self.step(x + z)


def compare() -> dict:
    """Output and per-parameter gradient errors (None on exactly one side is ``inf``), float64."""
    from ringcompile import backend

    torch.manual_seed(0)
    model = NoGradThenGrad().double()
    x = torch.randn(B, S, H * D, dtype=torch.float64)
    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    first = len(backend.HISTORY)
    out = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})(x)
    r_out = ref(x)
    g = torch.randn(r_out.shape, generator=torch.Generator().manual_seed(9), dtype=r_out.dtype)
    (out * g).sum().backward()
    (r_out * g).sum().backward()
    grads = {}
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        if p.grad is None or q.grad is None:
            grads[name] = None if p.grad is None and q.grad is None else float("inf")
        else:
            grads[name] = (p.grad - q.grad).abs().max().item()
    entries = backend.HISTORY[first:]
    return {"out": (out - r_out).abs().max().item(), "grads": grads,
            "rewritten": sum(s.rewritten for e in entries for s in e.sites),
            "sharded": any(e.graph is not None and e.graph.meta.get("ringcompile_shard") is not None
                           for e in entries)}


def case_no_grad_then_grad(rank, world):
    return compare()
