"""Key tiles that a batch row pads fully are skipped, not just masked (issue 16): the kernels read
per-batch key bounds (``kernels/triton/padding_bounds.py``) and bound their kv loops (forward, dQ)
and the dK/dV programs' query loops by them. Under the interpreter: outputs and gradients equal
float64 on the clean inputs while every padded key and value outside the bounds is NaN (a loaded
NaN value would reach the output through ``p @ v`` even where p is 0), and the kernels' loop
iterations drop to the tiles that hold kept keys."""

from __future__ import annotations

import pytest
import torch
from test_triton_support import assert_close, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.kernels import reference
from ringcompile.kernels.triton import cache, padding_bounds, triton_block_kernels
from ringcompile.spec import AttentionSpec

TILE = 16  # the interpreter's tiles
KEPT = {0: (0, 21), 1: (37, 64)}  # batch row: kept keys [lo, hi) (right padding, left padding)


def _inputs(seed: int = 31):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Sq, Sk, D = 2, 2, 1, 16, 64, 16
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    key_mask = torch.zeros(B, 80, dtype=torch.bool)
    for b, (lo, hi) in KEPT.items():
        key_mask[b, lo:hi] = torch.rand(hi - lo, generator=g) > 0.2  # holes inside the bounds
        key_mask[b, lo] = key_mask[b, hi - 1] = True
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b, (lo, hi) in KEPT.items():
        for t in (poisoned_k, poisoned_v):
            t[b, :, :lo] = float("nan")
            t[b, :, hi:] = float("nan")
    return q, k, v, poisoned_k, poisoned_v, key_mask, g


class _CountingRange:
    """Stands in for ``range`` in a generated module: counts the iterations of the tile loops."""

    def __init__(self):
        self.tile_steps = 0

    def __call__(self, *args):
        r = range(*args)
        if len(args) == 3:  # range(start, stop, BLOCK): a tile loop (range(GROUPS) is not one)
            self.tile_steps += len(r)
        return r


def _count_tile_steps(monkeypatch) -> _CountingRange:
    """Every kernel module loaded from now on counts its tile-loop steps in the returned counter."""
    counter = _CountingRange()
    original_load = cache.load

    def load(key, source):
        module = original_load(key, source)
        monkeypatch.setattr(module, "range", counter, raising=False)
        return module

    monkeypatch.setattr(cache, "load", load)
    return counter


def _run(mask, q, k, v, key_mask, g, monkeypatch):
    kernels = triton_block_kernels(AttentionSpec(mask=mask, kernel="triton"), forced=True)
    kw = dict(scale=0.25, q_offset=64, kv_offset=0, seq_len=80, mask=mask, mask_extras=[key_mask])
    counter = _count_tile_steps(monkeypatch)
    out, lse = kernels.forward(q, k, v, **kw)
    fwd_steps = counter.tile_steps
    dout = torch.randn(out.shape, generator=g)
    grads = kernels.backward(q, k, v, out, dout, lse, **kw)
    return (out, lse, *grads[:3]), dout, kw, fwd_steps, counter.tile_steps - fwd_steps


def test_padded_key_tiles_are_not_loaded_and_results_equal_float64(monkeypatch):
    q, k, v, pk, pv, key_mask, g = _inputs()
    mask = mods.and_masks(mods.causal(), mods.key_padding())
    (out, lse, dq, dk, dv), dout, kw, fwd_steps, bwd_steps = _run(mask, q, pk, pv, key_mask, g, monkeypatch)
    ref_out, ref_lse = reference.block_forward(q.double(), k.double(), v.double(), **kw)
    rq, rk, rv, _ = reference.block_backward(q.double(), k.double(), v.double(), ref_out, dout.double(),
                                             ref_lse, **kw)
    assert_close(out, ref_out, 5e-5, "out")  # (assert_close also fails on any NaN in the result)
    assert_close(lse, ref_lse, 5e-5, "lse")
    assert_close(dq, rq, 5e-5, "dq")
    assert_close(dk, rk, 5e-5, "dk")
    assert_close(dv, rv, 5e-5, "dv")
    # tiles holding kept keys: row 0 keys 0..20 -> tiles 0, 1; row 1 keys 37..63 -> tiles 2, 3
    tiles = sum(len(range(lo // TILE, -(-hi // TILE))) for lo, hi in KEPT.values())
    heads, groups = q.shape[1], q.shape[1] // k.shape[1]
    assert fwd_steps == heads * tiles  # one query tile per head
    assert bwd_steps == heads * tiles + groups * tiles  # dQ (per query head) + dK/dV (per kv tile and group)

    # the same mask as a custom mod (no padding part): every tile is visited, the result is the same
    custom = mods.and_masks(mods.causal(), mods.Mod(lambda b, h, q_, kv, m: m[b, kv] != 0, True, "custom",
                                                    n_extras=1, description="padding as a custom mod"))
    (c_out, *_), _, _, c_fwd, c_bwd = _run(custom, q, k, v, key_mask, g, monkeypatch)
    assert_close(c_out, ref_out, 5e-5, "out (custom)")
    all_tiles = len(KEPT) * (k.shape[2] // TILE)
    assert (c_fwd, c_bwd) == (heads * all_tiles, (heads + groups) * all_tiles)


def test_key_bounds_are_the_first_and_last_kept_key_per_batch_row():
    mask = mods.and_masks(mods.causal(), mods.key_padding(), mods.key_padding())
    m1 = torch.zeros(3, 50, dtype=torch.bool)
    m1[0, 3:30] = True
    m1[1, 10:12] = True  # row 2 keeps nothing
    m2 = torch.ones(3, 50, dtype=torch.bool)
    m2[0, 25:] = False  # the second part narrows row 0 to [3, 25)
    assert [p.kind for p, _ in padding_bounds.padding_parts(mask)] == ["padding", "padding"]
    bounds = padding_bounds.kv_bounds(mask, [m1, m2], 3, 5, 40, 50, torch.device("cpu"))
    assert bounds.tolist() == [[5, 25], [10, 12], [0, 0]]  # keys 5..44 of the block only
    assert padding_bounds.kv_bounds(mask, [m1, m2], 3, 5, 40, 8, torch.device("cpu")).tolist() == \
        [[5, 8], [0, 0], [0, 0]]  # keys at or past seq_len are not visited
    assert padding_bounds.padding_parts(mods.causal()) == []
    # a key mask with fewer rows than the batch (or columns than the keys): not evaluated (on a GPU
    # an out-of-range index is a device-side assert), every tile is visited
    everything = [[0, padding_bounds.NO_BOUND]] * 3
    cpu = torch.device("cpu")
    assert padding_bounds.kv_bounds(mask, [m1[:1], m2], 3, 5, 40, 50, cpu).tolist() == everything
    assert padding_bounds.kv_bounds(mask, [m1, m2[:, :30]], 3, 5, 40, 50, cpu).tolist() == everything


# ---------------------------------------------------------------------------- one mod: causal & padding

S_FULL, Q0 = 64, 48  # the block: the last query tile (48..63) against every key of a 64-token sequence
KEPT_ONE_MOD = {0: (0, 21), 1: (37, 64)}  # row 0 right padding, row 1 left padding (HF generation)


def _hf_prepare_4d(q, k, v, am):
    """HF 4.x ``_prepare_4d_causal_attention_mask`` then eager attention: causal & padding expanded to
    (B, 1, S, S), inverted, ``masked_fill(inverted.bool(), finfo.min)`` added to the scores."""
    qi = torch.arange(q.size(2))
    causal = (qi[None, :] <= qi[:, None])[None, None]
    expanded = am[:, None, None, :].expand(q.size(0), 1, q.size(2), k.size(2)).to(q.dtype)
    inverted = 1.0 - expanded * causal.to(q.dtype)
    add = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(q.dtype).min)
    return (torch.matmul(q, k.transpose(2, 3)) * 0.25 + add).softmax(-1) @ v


def _hf_visible_from(q, k, v, first_query):
    """Looks like causal & padding but is not one: key kv of row b is seen only by queries at or after
    ``first_query[b, kv]`` (a per-key, per-query condition)."""
    qi = torch.arange(q.size(2))
    keep = (qi[None, :] <= qi[:, None])[None, None] & (first_query[:, None, None, :] <= qi[:, None])
    return (torch.matmul(q, k.transpose(2, 3)) * 0.25).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def _discovered_mask(fn, q, k, v, extra) -> mods.Mod:
    """The mask mod the matcher lifts from ``fn``'s score chain (what the backend hands the kernels)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from ringcompile.passes.mods import extract_score_chain

    aten = torch.ops.aten
    gm = make_fx(fn, pre_dispatch=True, tracing_mode="fake")(q, k, v, extra)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    softmax = next(n for n in nodes if n.target in (aten.softmax.int, aten._softmax.default))
    score = next(n for n in nodes if n.target in (aten.matmul.default, aten.bmm.default))
    ex = extract_score_chain(score, softmax.args[0], dims=("b", "h", "q", "kv"))
    assert ex.score is None and len(ex.mask_extras) == 1
    return ex.mask


def _one_mod_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, S_FULL, 16, generator=g, dtype=torch.float64) for _ in range(3))
    key_mask = torch.zeros(2, S_FULL, dtype=torch.long)
    for b, (lo, hi) in KEPT_ONE_MOD.items():
        key_mask[b, lo:hi] = (torch.rand(hi - lo, generator=g) > 0.2).long()  # holes inside the bounds
        key_mask[b, lo] = key_mask[b, hi - 1] = 1
    return q, k, v, key_mask, g


def _float64_grads(keep, q, k, v, dout):
    """Out and (dq, dk, dv) of eager float64 attention of the block's queries (rows Q0..) against every
    key with the bool ``keep`` (B, 1, S, S) of the whole sequence: independent of mods and kernels."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q[:, :, Q0:], k, v))
    out = (q @ k.transpose(2, 3) * 0.25).masked_fill(~keep[:, :, Q0:], float("-inf")).softmax(-1) @ v
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def _run_block(mask, q, k, v, key_mask, g, monkeypatch):
    """The Triton kernels on the block (queries Q0.., every key) in fp32, with the tile-loop count."""
    kernels = triton_block_kernels(AttentionSpec(mask=mask, kernel="triton"), forced=True)
    kw = dict(scale=0.25, q_offset=Q0, kv_offset=0, seq_len=S_FULL, mask=mask, mask_extras=[key_mask])
    counter = _count_tile_steps(monkeypatch)
    out, lse = kernels.forward(q[:, :, Q0:].float().contiguous(), k.float(), v.float(), **kw)
    fwd_steps = counter.tile_steps
    dout = torch.randn(out.shape, generator=g)
    grads = kernels.backward(q[:, :, Q0:].float().contiguous(), k.float(), v.float(), out, dout, lse, **kw)
    return (out, *grads[:3]), dout, fwd_steps, counter.tile_steps - fwd_steps


def _plain_causal_padding() -> mods.Mod:
    """A user's mask_mod doing causal & padding in one function, declared as such (no parts)."""
    def causal_and_padding(b, h, q, kv, key_mask):
        return (kv <= q) & (key_mask[b, kv] != 0)

    return mods.Mod(causal_and_padding, True, "causal+padding", n_extras=1, description="causal & padding")


@pytest.mark.parametrize("spelling", ["function", "hf graph"])
def test_one_mod_doing_causal_and_padding_skips_padded_tiles_and_equals_float64(spelling, monkeypatch):
    """A parts-less causal+padding mod (a plain function declared so, or the graph the matcher lifts
    from HF's 4-D left-padded mask, whose class proves the key padding) gets per-batch key bounds: the
    kernels visit only the tiles holding kept keys, never load the padded keys (they are NaN here), and
    outputs and gradients equal eager float64 attention on the whole sequence."""
    q, k, v, key_mask, g = _one_mod_inputs(41)
    if spelling == "function":
        mask = _plain_causal_padding()
    else:
        mask = _discovered_mask(_hf_prepare_4d, q, k, v, key_mask)
        assert mask.kind == "causal+padding" and not mask.parts and mask.graph is not None
        assert mask.params[mods.KEY_PADDING_LOOKUPS] == ((0, ("b", "kv")),)
    assert [part for part, _ in padding_bounds.padding_parts(mask)] == [mask]
    bounds = padding_bounds.kv_bounds(mask, [key_mask], 2, 0, S_FULL, S_FULL, torch.device("cpu"))
    assert bounds.tolist() == [list(KEPT_ONE_MOD[b]) for b in (0, 1)]

    poisoned_k, poisoned_v = k.clone(), v.clone()
    for b, (lo, hi) in KEPT_ONE_MOD.items():
        for t in (poisoned_k, poisoned_v):
            t[b, :, :lo] = float("nan")
            t[b, :, hi:] = float("nan")
    (out, dq, dk, dv), dout, fwd_steps, bwd_steps = _run_block(mask, q, poisoned_k, poisoned_v, key_mask, g,
                                                               monkeypatch)
    causal = torch.ones(S_FULL, S_FULL, dtype=torch.bool).tril()
    keep = causal[None, None] & (key_mask[:, None, None, :] != 0)
    ref_out, rq, rk, rv = _float64_grads(keep, q, k, v, dout.double())
    if spelling == "hf graph":  # the HF function itself agrees (every query here keeps some key)
        torch.testing.assert_close(_hf_prepare_4d(q, k, v, key_mask)[:, :, Q0:], ref_out)
    assert_close(out, ref_out, 5e-5, "out")
    assert_close(dq, rq, 5e-5, "dq")
    assert_close(dk, rk, 5e-5, "dk")  # (NaN-free: the padded keys were never loaded)
    assert_close(dv, rv, 5e-5, "dv")
    tiles = sum(len(range(lo // TILE, -(-hi // TILE))) for lo, hi in KEPT_ONE_MOD.values())  # 2 + 2 of 8
    heads = q.shape[1]
    assert fwd_steps == heads * tiles
    assert bwd_steps == 2 * heads * tiles  # dQ per query head + dK/dV per kv head (MHA: one query head each)


def test_a_mod_that_only_looks_like_causal_and_padding_gets_no_bounds(monkeypatch):
    """``first_query[b, kv] <= q`` is a lookup by (b, kv), so it is classified "padding", but it depends
    on the query: evaluated at any one query it would be a wrong key padding. Its class states no key
    padding lookups, so it gets no bounds: every tile is visited, and the result equals float64."""
    q, k, v, _, g = _one_mod_inputs(43)
    first_query = torch.randint(0, S_FULL, (2, S_FULL), generator=g)
    first_query[:, 0] = 0  # every query keeps key 0
    mask = _discovered_mask(_hf_visible_from, q, k, v, first_query)
    assert mask.kind == "causal+padding" and mods.KEY_PADDING_LOOKUPS not in mask.params
    assert padding_bounds.padding_parts(mask) == []
    (out, dq, dk, dv), dout, fwd_steps, bwd_steps = _run_block(mask, q, k, v, first_query, g, monkeypatch)
    qi = torch.arange(S_FULL)
    keep = (qi[None, :] <= qi[:, None])[None, None] & (first_query[:, None, None, :] <= qi[:, None])
    ref_out, rq, rk, rv = _float64_grads(keep, q, k, v, dout.double())
    assert_close(out, ref_out, 5e-5, "out")
    assert_close(dq, rq, 5e-5, "dq")
    assert_close(dk, rk, 5e-5, "dk")
    assert_close(dv, rv, 5e-5, "dv")
    all_tiles = 2 * (S_FULL // TILE)
    assert (fwd_steps, bwd_steps) == (q.shape[1] * all_tiles, 2 * q.shape[1] * all_tiles)


def test_one_mod_bounds_need_in_range_lookups_and_no_closure():
    """The proof covers lookups at exactly b / kv; the extras must still be wide enough (host shapes), a
    head-shifted copy (ulysses) keeps the proof, and a declared kind on a closure or graph is not enough."""
    from ringcompile.runtime.strategies.ulysses import shift_heads

    q, k, v, key_mask, _ = _one_mod_inputs(47)
    mask = _discovered_mask(_hf_prepare_4d, q, k, v, key_mask)
    cpu = torch.device("cpu")

    def bounds(m, extra, kv_len=S_FULL):
        return padding_bounds.kv_bounds(m, [extra], 2, 0, kv_len, kv_len, cpu).tolist()

    everything = [[0, padding_bounds.NO_BOUND]] * 2
    assert bounds(mask, key_mask[:, :40]) == everything  # keys 40.. would be looked up out of range
    assert bounds(mask, key_mask[:1]) == everything  # batch row 1 likewise
    last = [int(key_mask[b, :40].nonzero().max()) + 1 for b in (0, 1)]
    assert bounds(mask, key_mask[:, :40], kv_len=40) == [[0, last[0]], [37, last[1]]]  # 40 keys, 40 wide
    assert bounds(shift_heads(mask, 2), key_mask) == [list(KEPT_ONE_MOD[b]) for b in (0, 1)]
    # evaluated on the diagonal q = kv, which a window keeps too (at the last query it keeps 4 keys only)
    def window_and_padding(b, h, q, kv, key_mask):
        return (kv <= q) & (q - kv < 4) & (key_mask[b, kv] != 0)

    window = mods.Mod(window_and_padding, True, "sliding_window+padding", {"window": 4, "causal": True}, 1)
    assert bounds(window, key_mask) == [list(KEPT_ONE_MOD[b]) for b in (0, 1)]
    unproved = mods.Mod(mask.fn, True, "causal+padding", n_extras=1, graph=mask.graph)
    assert padding_bounds.padding_parts(unproved) == []
    closure = shift_heads(_plain_causal_padding(), 1)  # a plain function shifted: now a closure
    assert padding_bounds.padding_parts(closure) == []
