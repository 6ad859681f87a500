"""The sliding window read from a mask (``passes/rules/window.py``): taken only when the graph states
exactly HF's ``kv > q - w`` AND causal over the cache's slots and positions; the rewritten op then applies
it itself. Every spelling still equals float64 over the gathered cache, as one process reads it (world 1:
the unwritten slots are zeros, which a mask keeping future slots attends to)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
M, T, W = 12, 10, 3          # cache slots, filled slots (7 prefill + 3 appended), window


def _mask(kind: str, cum: torch.Tensor) -> torch.Tensor:
    """A (2, 1, 1, M) boolean decode mask for the query at slot ``cum``, spelled like HF's sdpa_mask."""
    q = (torch.arange(1) + cum.to("cpu"))[None, None, :, None]
    kv = (torch.arange(M) + (1 if kind == "offset" else 0))[None, None, None, :]
    causal = kv <= q
    window = kv > q - W
    if kind == "or":
        window = window | (kv <= q - 100)
    if kind == "other-q":
        window = kv > (torch.arange(1) + 9)[None, None, :, None] - W
    mask = window if kind == "no-causal" else torch.ones((), dtype=torch.bool) & window & causal
    return mask.expand(2, -1, 1, M)


@pytest.mark.parametrize("kind,window", [("hf", W), ("or", None), ("offset", None), ("no-causal", None),
                                         ("other-q", None)])
def test_a_window_is_read_from_the_mask_only_when_exact(kind, window):
    import torch._dynamo
    import torch.nn.functional as F

    from ringcompile.passes.rules.decode import rewrite_cache_attention
    from ringcompile.runtime.cache_append import cache_append, shard_capacity

    g = torch.Generator().manual_seed(len(kind))
    full_k, full_v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
    q = torch.randn(2, 4, 1, 8, generator=g)
    cap = shard_capacity(1, 7, M)[0]
    keys, values = torch.zeros(2, 2, cap, 8), torch.zeros(2, 2, cap, 8)
    slots = torch.full((cap,), -1, dtype=torch.long)
    cache_append(keys, values, slots, full_k[:, :, :7], full_v[:, :, :7], torch.arange(7), 0, 1, 7)
    for t in range(7, T):
        cache_append(keys, values, slots, full_k[:, :, t:t + 1], full_v[:, :, t:t + 1], torch.tensor([t]), 0,
                     1, 7)
    cum = torch.tensor(T - 1)

    def fn(q, keys, values, slots, cum):
        positions = torch.arange(1) + cum
        kk, vv = torch.ops.ringcompile.cache_gather(keys, values, slots, positions, M, 7, "single", 10.0)
        kk = kk[:, :, None].expand(-1, -1, 2, -1, -1).reshape(2, 4, M, 8)
        vv = vv[:, :, None].expand(-1, -1, 2, -1, -1).reshape(2, 4, M, 8)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=_mask(kind, cum))

    windows = []

    def backend(gm, example_inputs):
        rewrite_cache_attention(gm)
        calls = [n for n in gm.graph.nodes if "decode_attention" in str(n.target)]
        assert len(calls) == 1, gm.code
        windows.append(calls[0].args[7])
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(fn, backend=backend, fullgraph=True)(q, keys, values, slots, cum)
    assert windows == [-1 if window is None else window]
    # one process reads the gathered cache: M slots, the unwritten ones zero keys and values (a mask that
    # keeps a future slot, "no-causal", attends to them)
    keep = _mask(kind, cum)
    k_all = torch.zeros(2, 2, M, 8, dtype=torch.float64)
    v_all = torch.zeros(2, 2, M, 8, dtype=torch.float64)
    k_all[:, :, :T], v_all[:, :, :T] = full_k.double(), full_v.double()
    scores = q.double() @ k_all.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    want = probs @ v_all.repeat_interleave(2, 1)
    assert float((got.double() - want).abs().max()) < 1e-5
