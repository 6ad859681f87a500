"""Shared checks for mask/score extraction tests: trace a function, extract, compare in float64.

``check_chain`` traces an attention function with make_fx (pre-dispatch, like normalize),
extracts the mods from its score chain, and verifies against the ORIGINAL function:
the full attention output (float64, rows with at least one kept key), and for several
(q_offset, kv_offset) sub-blocks the keep mask and the modified scores against the
corresponding sub-block of the original pre-softmax scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from ringcompile.kernels.reference import attention_reference
from ringcompile.mods import evaluate_mask, index_grid
from ringcompile.passes.mods import ExtractedMods, extract_attn_mask, extract_score_chain

aten = torch.ops.aten
MASKED = -1e4  # pre-softmax values at or below this are masked in the original


def trace(fn: Callable, *args, mode: str = "fake", buffers: dict[int, torch.Tensor] | None = None
          ) -> fx.GraphModule:
    """make_fx like normalize does; ``buffers`` marks placeholders (by position) as constant buffers."""
    gm = make_fx(fn, pre_dispatch=True, tracing_mode=mode)(*args)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, t in (buffers or {}).items():
        phs[i].meta["ringcompile_example"] = t
        phs[i].meta["ringcompile_source"] = f"L['self'].buffer{i}"
    return gm


def chain_ends(gm: fx.GraphModule) -> tuple[fx.Node, fx.Node]:
    """(raw q@k^T node, softmax input) of the only attention in ``gm``."""
    sm = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        aten.softmax.int, aten._softmax.default))
    score = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        aten.matmul.default, aten.bmm.default, aten.einsum.default))
    return score, sm.args[0]


def node_values(gm: fx.GraphModule, args: Sequence, nodes: Sequence[fx.Node]) -> dict[fx.Node, object]:
    """Real runtime values of ``nodes`` when ``gm`` runs on ``args``."""
    wanted = set(nodes)
    out: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            val = super().run_node(n)
            if n in wanted:
                out[n] = val
            return val

    Recorder(gm).run(*args)
    return out


def blocks(S: int) -> list[tuple[int, int, int, int]]:
    """(q0, n, k0, m) sub-blocks, including off-diagonal and ragged ones."""
    h = max(S // 2, 1)
    out = [(0, S, 0, S), (h, S - h, 0, h), (0, h, h, S - h), (h, S - h, h, S - h)]
    return out + [(1, S - 3, 2, S - 5)] if S >= 6 else out


def check_chain(fn: Callable, args: Sequence, *, mask: str, score: str = "none", mode: str = "fake",
                buffers: dict[int, torch.Tensor] | None = None, dims=("b", "h", "q", "kv"),
                to4d: Callable | None = None, atol: float = 1e-9) -> ExtractedMods:
    """Extract from ``fn``'s score chain and compare everything with the original in float64."""
    gm = trace(fn, *args, mode=mode, buffers=buffers)
    score_node, sm_in = chain_ends(gm)
    ex = extract_score_chain(score_node, sm_in, dims=dims)
    got_mask = ex.mask.describe() if ex.mask is not None else "none"
    got_score = ex.score.describe() if ex.score is not None else "none"
    assert (got_mask, got_score) == (mask, score), (got_mask, got_score, ex.notes)
    values = node_values(gm, args, [score_node, sm_in, *ex.mask_extras, *ex.score_extras])
    compare(ex, values[score_node], values[sm_in], [values[n] for n in ex.mask_extras],
            [values[n] for n in ex.score_extras], to4d=to4d, atol=atol)
    # the full attention through the reference oracle against the original function
    q, k, v = args[:3]
    ref = fn(*args)
    keep_orig = values[sm_in] > MASKED
    if to4d is not None:
        q, k, v, ref, keep_orig = (to4d(t) for t in (q, k, v, ref, keep_orig))
    scale = ex.scale if ex.scale is not None else 1.0
    ours = attention_reference(q, k, v, scale=scale, mask=ex.mask, score=ex.score,
                               mask_extras=[values[n] for n in ex.mask_extras],
                               score_extras=[values[n] for n in ex.score_extras])
    rows = keep_orig.expand(*ours.shape[:3], keep_orig.shape[-1]).any(-1)
    assert rows.any()
    torch.testing.assert_close(ours[rows], ref.to(ours.dtype)[rows], atol=atol, rtol=1e-7)
    return ex


def compare(ex: ExtractedMods, raw: torch.Tensor, sm_in: torch.Tensor, mask_extras: list,
            score_extras: list, *, to4d: Callable | None = None, atol: float = 1e-9) -> None:
    """Keep mask and modified scores of every sub-block (global offsets) vs the original's block."""
    if to4d is not None:
        raw, sm_in = to4d(raw), to4d(sm_in)
    B, H, S, Sk = sm_in.shape
    scale = ex.scale if ex.scale is not None else 1.0
    for q0, n, k0, m in blocks(S):
        grid = index_grid(B, H, q0, n, k0, m)
        orig = sm_in[:, :, q0:q0 + n, k0:k0 + m]
        keep_orig = orig > MASKED
        if ex.mask is None:
            keep = torch.ones_like(keep_orig)
        else:
            keep = evaluate_mask(ex.mask, grid, mask_extras).expand(B, H, n, m)
        assert torch.equal(keep, keep_orig), (q0, k0, keep.int(), keep_orig.int())
        s = raw[:, :, q0:q0 + n, k0:k0 + m].to(torch.float64) * scale
        if ex.score is not None:
            s = ex.score(s, *grid, *score_extras)
        s = s.expand(B, H, n, m)
        torch.testing.assert_close(s[keep], orig[keep].to(s.dtype), atol=atol, rtol=1e-7)


def check_attn_mask(mask_fn: Callable, inputs: Sequence[torch.Tensor], B: int, H: int, S: int, *,
                    mask: str, score: str = "none", mode: str = "fake") -> ExtractedMods:
    """SDPA attn_mask built by ``mask_fn(*inputs)``: extract and compare block by block."""
    gm = make_fx(mask_fn, pre_dispatch=True, tracing_mode=mode)(*inputs)
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    ex = extract_attn_mask(out_node, dims=("b", "h", "q", "kv"))
    got_mask = ex.mask.describe() if ex.mask is not None else "none"
    got_score = ex.score.describe() if ex.score is not None else "none"
    assert (got_mask, got_score) == (mask, score), (got_mask, got_score, ex.notes)
    assert ex.scale is None
    values = node_values(gm, inputs, [out_node, *ex.mask_extras, *ex.score_extras])
    dense = values[out_node]
    raw = torch.randn(B, H, S, S, dtype=torch.float64)
    if dense.dtype == torch.bool:
        sm_in = raw.masked_fill(~dense, float("-inf"))
    else:
        sm_in = raw + dense
    compare(ex, raw, sm_in.expand(B, H, S, S), [values[n] for n in ex.mask_extras],
            [values[n] for n in ex.score_extras])
    # and SDPA itself on the dense mask vs the reference with the extracted mods
    q, k, v = (torch.randn(B, H, S, 8, dtype=torch.float64) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    ours = attention_reference(q, k, v, mask=ex.mask, score=ex.score,
                               mask_extras=[values[n] for n in ex.mask_extras],
                               score_extras=[values[n] for n in ex.score_extras])
    rows = (sm_in.expand(B, H, S, S) > MASKED).any(-1)
    torch.testing.assert_close(ours[rows], ref[rows], atol=1e-9, rtol=1e-7)
    return ex
