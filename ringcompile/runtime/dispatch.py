"""Entry points of the custom op: pick the strategy for this call and run it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringcompile.spec import AttentionSpec

from .local import local_backward, local_forward


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_extras: Sequence[torch.Tensor],
    score_extras: Sequence[torch.Tensor], seq_len: int, spec: AttentionSpec,
    dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return local_forward(q, k, v, mask_extras, score_extras, seq_len, spec)


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, mask_extras: Sequence[torch.Tensor], score_extras: Sequence[torch.Tensor],
    seq_len: int, spec: AttentionSpec, dropout_seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    return local_backward(dout, q, k, v, out, lse, mask_extras, score_extras, seq_len, spec)
