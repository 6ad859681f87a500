"""One attention found in a graph: what discovery learned and what the rewrite needs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from .mods import Mod


@dataclasses.dataclass
class AttentionSite:
    """An attention subgraph of the normalised (aten, pre-autograd) graph.

    q, k, v:      nodes whose values are (B, H, S, D) in that dim order (B*H merged and H=1
                  for 3-D attention); k/v carry the *un-repeated* KV heads for GQA.
    output:       the node whose value is the attention output (replaced by the rewrite).
    output_layout: how the op's (B, H, S, D) output maps back onto ``output``'s value
                  ("bhsd", "bshd", or "3d").
    pattern:      which form matched, e.g. "sdpa", "matmul-softmax-matmul", "bmm", "einsum".
    layout:       the layout the attention was written in ("bhsd", "bshd", "3d").
    scale:        softmax scale (None = 1/sqrt(D)).
    gqa_groups:   query heads per KV head (1 = MHA).
    dropout_p:    attention dropout probability (0 in eval).
    softmax_dtype: dtype the softmax ran in (None = input dtype).
    mask, score:  mods over global indices (see ringcompile.mods), or None.
    mask_extras, score_extras: graph nodes whose values the mods take as extras.
    dead_rows: the exact bias form of finite mask claims (``spec.DeadRowForm``), or None.
    nodes:        nodes that exist only to compute this attention (dead after rewrite).
    location:     module path or source line, for reports.
    rewritten, reason: whether the rewrite happened, and why not.
    q_perm, k_perm, v_perm: permutations that turn the q/k/v node values into (batch.., S, D)
                  (None = already in that order); 3-D values get a head dim of 1 inserted after.
    out_perm:     permutation of the canonical (batch.., S, Dv) output onto ``output``'s value.
    is_3d:        the attention ran on (B*H, S, D) tensors.
    head_split:   (B, H) sizes (ints or SymInt nodes) when (B*H, S, D) q/k/v are split into
                  (B, H, S, D) for the op because the mask chain ran on (B, H, S, S) scores.
    sink:         a (B, H, S, 1)-broadcastable logit column that joins the softmax's denominator
                  (gpt-oss attention sinks): out = out_ring * exp(lse - logaddexp(lse, sink)).
    lse_readers:  ``logsumexp(scores, -1)`` nodes of the softmax's own input that the graph reads
                  (GraniteSWA's sink scaling ``out * sigmoid(lse - sink)``): the rewrite points them at
                  the op's lse, so the model's own ops apply the sink.
    pv_merged:    with ``head_split``: v and the output are (B*H, S, D) too (Bloom); False when p @ v
                  runs on the (B, H, S, S) probabilities and a 4-D v (GPT-NeoX-Japanese).
    output_dtype: dtype of ``output``'s value (the op's result is cast to it).
    notes:        extra facts for reports (what the mods extraction noticed, ...).
    """

    name: str
    pattern: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    output: fx.Node
    layout: str = "bhsd"
    output_layout: str = "bhsd"
    scale: float | None = None
    gqa_groups: int = 1
    dropout_p: float = 0.0
    softmax_dtype: torch.dtype | None = None
    mask: Mod | None = None
    score: Mod | None = None
    mask_extras: list[fx.Node] = dataclasses.field(default_factory=list)
    score_extras: list[fx.Node] = dataclasses.field(default_factory=list)
    nodes: set[fx.Node] = dataclasses.field(default_factory=set)
    location: str = ""
    rewritten: bool = False
    reason: str | None = None
    q_perm: tuple[int, ...] | None = None
    k_perm: tuple[int, ...] | None = None
    v_perm: tuple[int, ...] | None = None
    out_perm: tuple[int, ...] | None = None
    is_3d: bool = False
    head_split: tuple | None = None
    sink: fx.Node | None = None
    lse_readers: list[fx.Node] = dataclasses.field(default_factory=list)
    pv_merged: bool = True
    output_dtype: torch.dtype | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    dead_rows: Any = None

    @property
    def mask_description(self) -> str:
        return self.mask.describe() if self.mask is not None else "none"

    @property
    def score_description(self) -> str:
        return self.score.describe() if self.score is not None else "none"
