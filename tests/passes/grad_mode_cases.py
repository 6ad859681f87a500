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


class EnableGradInsideNoGrad(NoGradThenGrad):
    """``torch.enable_grad()`` nested in ``no_grad``: the inner step trains, the outer one does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.only_no_grad(self.step(x))
            with torch.enable_grad():
                w = self.step(x + z)
        return self.step(x + w)


class InferenceModeThenGrad(NoGradThenGrad):
    """``torch.inference_mode()`` inside the model (the aten retrace drops it: the backend must fall back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = self.only_no_grad(self.step(x))
        return self.step(x + z.clone())


class AutocastThenFull(NoGradThenGrad):
    """A bf16 CPU autocast step, then a float32 step on the same weights and input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = self.step(x)
        return self.step(x) + z.float()


def compare(cls: type = NoGradThenGrad, dtype: torch.dtype = torch.float64) -> dict:
    """Output error and per-parameter relative gradient errors (None on exactly one side, or a gradient
    of another dtype than its parameter, is ``inf``)."""
    from ringcompile import backend

    torch.manual_seed(0)
    model = cls().to(dtype)
    x = torch.randn(B, S, H * D, dtype=dtype)
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
            grads[name] = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)).item()
        if p.grad is not None and p.grad.dtype != p.dtype:
            grads[name] = float("inf")
    entries = backend.HISTORY[first:]
    return {"out": (out - r_out).abs().max().item(), "grads": grads, "dtype": str(out.dtype),
            "ref_dtype": str(r_out.dtype),
            "reasons": [e.fallback_reason for e in entries if e.fallback_reason],
            "rewritten": sum(s.rewritten for e in entries for s in e.sites),
            "sharded": any(e.graph is not None and e.graph.meta.get("ringcompile_shard") is not None
                           for e in entries)}


def case_no_grad_then_grad(rank, world):
    return compare()


def case_enable_grad_inside_no_grad(rank, world):
    return compare(EnableGradInsideNoGrad)


def case_inference_mode(rank, world):
    return compare(InferenceModeThenGrad)


def case_autocast_bf16(rank, world):
    return compare(AutocastThenFull, torch.float32)
