"""Cases for test_shard_inplace.py, importable in spawned ranks: in-place writes into sharded graph inputs and
into values derived from the shard, under backend="ring" on 2 gloo ranks vs the same function in one process
(float64 eager on the unsharded input, fresh random inputs).

The local shard of an input is a fresh slice (``to_local``), and some sequence slices of a shard are not
views of it locally (``x[:, k:]`` is a halo exchange, ``x[:, i]`` a gather of one row, ``x[:, :n]`` the whole
shard with a shorter valid length). A write through such a value must reach exactly what it reaches on one
device: the caller's tensor when it is a graph input, the positions it names when it is a slice, every
later reader when it is a view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

B, H, S, D = 2, 2, 8, 4
E = H * D


class Attn(torch.nn.Module):
    """A projection, causal attention, an output projection; ``pattern`` writes in place somewhere."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern
        self.proj = torch.nn.Linear(E, E)
        self.qkv = torch.nn.Linear(E, 3 * E)
        self.out = torch.nn.Linear(E, E)
        if pattern == "shift_tokens_right":
            self.emb = torch.nn.Embedding(4, E)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(B, S, E))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        p = self.pattern
        h = self.proj(x + 0.0)  # not x itself: linear saves its input, so eager could not write into x
        if p == "input_add_after":          # the caller's x is written after the graph read it
            a = self.attend(h)
            x.add_(1.0)
            return a
        if p == "input_view_add_after":     # ... through a view of it
            a = self.attend(h)
            x.view(B, S, 2, E // 2)[:, :, 0].mul_(3.0)
            return a
        if p == "input_slice_write":        # x[:, 2:5] = 0 after use (a sequence slice of an input)
            a = self.attend(h)
            x[:, 2:5] = 0.0
            return a
        if p == "pad_masked_fill_":         # an int input mask rewritten in place, then used
            pad.masked_fill_(pad == 0, 2)
            return self.attend(h) * pad[..., None].to(h.dtype)
        if p == "prefix_write":             # h[:, :2] = 0: only the first two positions
            h[:, :2] = 0.0
            return self.attend(h)
        if p == "suffix_write":             # h[:, 3:] = 0
            h[:, 3:] = 0.0
            return self.attend(h)
        if p == "suffix_add_":              # h[:, 3:] += 1
            h[:, 3:] += 1.0
            return self.attend(h)
        if p == "row_write":                # h[:, 3] = 0
            h[:, 3] = 0.0
            return self.attend(h)
        if p == "last_row_write":           # h[:, -1:] = 0
            h[:, -1:] = 0.0
            return self.attend(h)
        if p == "feature_slice_add_":       # h[..., :4] += 1: a slice off the sequence dim (no halo)
            h[..., :4] += 1.0
            return self.attend(h)
        if p == "masked_fill_":             # padding positions zeroed in place
            h.masked_fill_(pad[..., None] == 0, 0.0)
            return self.attend(h)
        if p == "index_put_":               # h[:, idx] = 0 with a tensor index along the sequence
            h[:, torch.tensor([1, 6])] = 0.0
            return self.attend(h)
        if p == "gathered_then_view_write":  # h read whole (cumsum gathers it), then written via a view
            c = h.cumsum(1)
            h[..., :4].mul_(2.0)
            return self.attend(h) + c + h.cumsum(1)
        if p == "attn_out_view_add_":       # the attention's output written through a view
            a = self.attend(h)
            a.view(B, S, 2, E // 2)[:, :, 1].add_(h.view(B, S, 2, E // 2)[:, :, 0])
            return a
        if p == "cast_copy_write":          # a write into x.to(float32), a copy: x itself is unchanged
            y = x.to(torch.float32)
            y.mul_(2.0)
            return self.attend(h) + y.to(h.dtype)
        if p == "shift_tokens_right":       # HF's decoder ids from a sharded int input (pad, embedded too)
            h = h + self.emb(pad)
            shifted = pad.new_zeros(pad.shape)
            shifted[:, 1:] = pad[:, :-1].clone()
            shifted[:, 0] = 3
            shifted.masked_fill_(shifted == 0, 2)
            return self.attend(h) * shifted[..., None].to(h.dtype)
        if p == "cache_update":             # a replicated buffer input updated with sharded values
            a = self.attend(h)
            pad_f = pad.to(h.dtype)
            pad_f.mul_(2.0)
            return a + pad_f[..., None]
        raise ValueError(p)


PATTERNS = ["input_add_after", "input_view_add_after", "input_slice_write", "pad_masked_fill_",
            "prefix_write", "suffix_write", "suffix_add_", "row_write", "last_row_write",
            "feature_slice_add_", "masked_fill_", "index_put_", "gathered_then_view_write",
            "attn_out_view_add_", "cache_update", "cast_copy_write", "shift_tokens_right"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def compare(pattern: str, grad: bool, input_grad: bool = False, inner: str = "eager") -> dict:
    """Errors of ring vs one-process eager: output, the inputs after the call (in-place writes the caller
    sees), parameter gradients and the input's gradient."""
    from ringcompile import backend

    torch.manual_seed(0)
    model = Attn(pattern).double()
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(B, S, E, dtype=torch.float64, generator=g)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[-1, S - 3:] = 0
    ref = Attn(pattern).double()
    ref.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    first = len(backend.HISTORY)
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": inner})
    res: dict = {}
    runs = []
    for m in (compiled, ref):
        leaf = x0.clone().requires_grad_(input_grad)
        x = leaf * 1.0 if input_grad else leaf   # a non-leaf: eager allows writing into it
        p = pad.clone()
        with torch.set_grad_enabled(grad):
            out = m(x, p)
        if grad:
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
            (out * w).sum().backward()
        runs.append((out.detach(), x.detach().clone(), p.clone(), leaf.grad))
    (out, x, p, xg), (r_out, r_x, r_p, r_xg) = runs
    res["out"] = _rel(out, r_out)
    res["x_after"] = _rel(x, r_x)
    res["pad_after"] = float((p != r_p).sum().item())
    res["grads"] = {}
    if grad:
        for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
            res["grads"][name] = _rel(a.grad, b.grad)
        if input_grad:
            res["grads"]["x"] = _rel(xg, r_xg)
    entries = backend.HISTORY[first:]
    res["reasons"] = [e.fallback_reason for e in entries if e.fallback_reason] + [
        f"{d.stage}: {d.reason}" for e in entries for d in e.decisions if d.leaves_attention_unsharded]
    res["sharded"] = any(e.graph is not None and e.graph.meta.get("ringcompile_shard") is not None
                         for e in entries)
    return res


SHARDED = ["input_add_after", "input_view_add_after", "pad_masked_fill_", "feature_slice_add_",
           "masked_fill_", "gathered_then_view_write", "attn_out_view_add_", "cache_update",
           "cast_copy_write", "shift_tokens_right"]
# pattern -> what the fallback reason must say
UNSHARDED = {
    "input_slice_write": "the caller's tensor",
    "prefix_write": "a slice x[:, :n] of a sequence shard",
    "suffix_write": "is a separate copy",
    "suffix_add_": "is a separate copy",
    "row_write": "is a separate copy",
    "last_row_write": "is a separate copy",
    "index_put_": "in-place write",
}
MODES = ((False, False), (True, True))  # no grad; grads of the parameters and of a non-leaf input


def _run_patterns(patterns: list[str], modes, inner: str) -> dict:
    import logging
    import traceback

    logging.getLogger("ringcompile").setLevel(logging.ERROR)
    out = {}
    for pattern in patterns:
        for grad, input_grad in modes:
            key = f"{pattern}/grad={grad}/{inner}"
            try:
                out[key] = compare(pattern, grad, input_grad, inner)
            except Exception:  # noqa: BLE001 - a crash is a finding, reported by the parent
                out[key] = {"crash": traceback.format_exc()[-1500:]}
    return out


def case_eager(rank: int, world: int) -> dict:
    return _run_patterns(PATTERNS, MODES, "eager")


def case_inductor(rank: int, world: int) -> dict:
    """The default inner compiler (AOTAutograd functionalizes the writes; an input written in place is
    copied back by its runtime wrapper)."""
    patterns = ["input_add_after", "input_view_add_after", "masked_fill_", "gathered_then_view_write"]
    return _run_patterns(patterns, ((True, True),), "inductor")
