"""Cases for test_shard_zoo_patterns.py, importable in spawned ranks: patterns of zoo families (issue 10)
that crashed or stayed unsharded, under backend="ring" vs the same model in one process:

- ``SliceAddInPlace``: an in-place add into a slice (on a non-sequence dim) of a sequence-sharded tensor,
  the way Gemma 3n's AltUp writes ``corrected[1:] += first`` (crashed: gather_seq returned a view);
- ``ConcatenateFeatures``: ``torch.concatenate`` of two activations on the feature dim before attention, as
  Zamba2's shared block does (unsharded: ``aten.concatenate`` had no sequence rule)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

B, H, S, D = 2, 2, 8, 4


class SliceAddInPlace(torch.nn.Module):
    """Attention, then a stack of predictions along a new leading dim whose tail gets the first added in
    place (a ``setitem`` of a slice: aten ``slice`` + ``add`` + ``copy_`` into the slice)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.out = torch.nn.Linear(H * D, H * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = self.out(a.transpose(1, 2).reshape(B, S, H * D))
        preds = torch.stack([a, 2 * a, a.sin()])
        first = preds[0].clone()
        preds[1:] += first
        return preds


class ConcatenateFeatures(torch.nn.Module):
    """Hidden states and the embeddings joined on the feature dim by ``torch.concatenate``, then attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(2 * H * D, 3 * H * D)
        self.mix = torch.nn.Linear(H * D, H * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.concatenate([self.mix(x).tanh(), x], dim=-1)
        q, k, v = self.qkv(h).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def compare(cls: type = SliceAddInPlace, grad: bool = True) -> dict:
    """Output error and relative gradient errors against float64 eager on the unsharded input."""
    from ringcompile import backend

    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(B, S, H * D, dtype=torch.float64)
    torch._dynamo.reset()
    ref = copy.deepcopy(model)
    first = len(backend.HISTORY)
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    with torch.set_grad_enabled(grad):
        out = compiled(x)
        r_out = ref(x)
    grads = {}
    if grad:
        g = torch.randn(r_out.shape, generator=torch.Generator().manual_seed(9), dtype=r_out.dtype)
        (out * g).sum().backward()
        (r_out * g).sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            grads[name] = ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-30)).item()
    entries = backend.HISTORY[first:]
    return {"out": (out - r_out).abs().max().item(), "grads": grads,
            "reasons": [e.fallback_reason for e in entries if e.fallback_reason],
            "sharded": any(e.graph is not None and e.graph.meta.get("ringcompile_shard") is not None
                           for e in entries)}


def case_inplace_slice_grad(rank, world):
    return compare(SliceAddInPlace, True)


def case_inplace_slice_no_grad(rank, world):
    return compare(SliceAddInPlace, False)


def case_concatenate(rank, world):
    return compare(ConcatenateFeatures, True)
