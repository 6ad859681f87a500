"""Key tiles that a batch row pads fully are skipped, not just masked (issue 16): the kernels read
per-batch key bounds (``kernels/triton/padding_bounds.py``) and bound their kv loops (forward, dQ)
and the dK/dV programs' query loops by them. Under the interpreter: outputs and gradients equal
float64 on the clean inputs while every padded key and value outside the bounds is NaN (a loaded
NaN value would reach the output through ``p @ v`` even where p is 0), and the kernels' loop
iterations drop to the tiles that hold kept keys."""

from __future__ import annotations

import torch
from ringcompile.kernels import reference
from ringcompile.kernels.triton import cache, padding_bounds, triton_block_kernels
from test_triton_support import assert_close, triton_interpreter  # noqa: F401

from ringcompile import mods
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


def _run(mask, q, k, v, key_mask, g, monkeypatch):
    kernels = triton_block_kernels(AttentionSpec(mask=mask, kernel="triton"), forced=True)
    kw = dict(scale=0.25, q_offset=64, kv_offset=0, seq_len=80, mask=mask, mask_extras=[key_mask])
    counter = _CountingRange()
    original_load = cache.load

    def load(key, source):
        module = original_load(key, source)
        monkeypatch.setattr(module, "range", counter, raising=False)
        return module

    monkeypatch.setattr(cache, "load", load)
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
