"""Attention-like softmaxes the matcher does not take say what they are (no generic 'no rule matched')."""

from __future__ import annotations

import torch


def _blocked_local_attention(q, k, v, block: int = 4):
    """LongT5-style: split the sequence into blocks, each block's queries attend to its own block and its
    two neighbours (keys of 3 blocks), scores (B, blocks, H, block, 3 * block)."""
    B, S, H, D = q.shape
    n = S // block
    qb, kb, vb = (t.reshape(B, n, block, H, D) for t in (q, k, v))

    def three(t):
        pad = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 1, 1))
        return torch.cat([pad[:, i:i + n] for i in range(3)], dim=2)

    scores = torch.einsum("...qhd,...khd->...hqk", qb, three(kb))  # LongT5's spelling
    scores = scores + torch.arange(3 * block, dtype=scores.dtype) * 0.1  # a position bias
    probs = torch.softmax(scores.float(), dim=-1).type_as(scores)
    return torch.einsum("...hqk,...khd->...qhd", probs, three(vb)).reshape(B, S, H, D)


def test_blocked_local_attention_reason_names_it():
    """LongT5's local attention reaches the 'no rule matched' account (its einsum spine is not followed);
    the reason says what it is, from the scores' shape."""
    from ringcompile.passes import _unmatched_softmax_reason
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v = (torch.randn(2, 16, 2, 8, dtype=torch.float64) for _ in range(3))
    gm = make_fx(lambda q, k, v: _blocked_local_attention(q, k, v), pre_dispatch=True)(q, k, v)
    softmaxes = [n for n in gm.graph.nodes if "softmax" in str(n.target)]
    assert softmaxes
    for sm in softmaxes:
        reason = _unmatched_softmax_reason(sm)
        assert "blocked local attention" in reason and "[2, 4, 2, 4, 12]" in reason, reason
