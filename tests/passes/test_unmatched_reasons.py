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
    from torch.fx.experimental.proxy_tensor import make_fx

    from ringcompile.passes import _unmatched_softmax_reason

    q, k, v = (torch.randn(2, 16, 2, 8, dtype=torch.float64) for _ in range(3))
    gm = make_fx(lambda q, k, v: _blocked_local_attention(q, k, v), pre_dispatch=True)(q, k, v)
    softmaxes = [n for n in gm.graph.nodes if "softmax" in str(n.target)]
    assert softmaxes
    for sm in softmaxes:
        reason = _unmatched_softmax_reason(sm)
        assert "blocked local attention" in reason and "[2, 4, 2, 4, 12]" in reason, reason


def _whisper_front(x, w, labels):
    """Whisper: the encoder sequence comes out of a stride-2 conv over time; the decoder ids are built by
    shift_tokens_right (new_zeros, slice copy_, masked_fill_)."""
    y = torch.nn.functional.conv1d(x, w, stride=2, padding=1)
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = 1
    shifted.masked_fill_(shifted == -100, 0)
    return y, shifted


def test_sequence_walk_stops_say_why_for_whisper():
    from torch.fx.experimental.proxy_tensor import make_fx

    from ringcompile.passes.seq_dims import _why_stopped

    args = (torch.randn(2, 4, 16), torch.randn(8, 4, 3), torch.randint(0, 5, (2, 8)))
    gm = make_fx(_whisper_front, pre_dispatch=True)(*args)
    by_op = {str(n.target): _why_stopped(n) for n in gm.graph.nodes if n.op == "call_function"}
    conv = by_op["aten.conv1d.default"]
    assert "convolution with kernel 3, stride 2, padding 1" in conv and "halo" in conv, conv
    assert "changes the sequence length (16 -> 8)" in conv and "compile the layers it feeds" in conv, conv
    for op in ("aten.copy_.default", "aten.masked_fill_.Scalar"):
        assert "in-place write into new_zeros" in by_op[op] and "shift_tokens_right" in by_op[op], by_op[op]
