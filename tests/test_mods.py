"""The mod library: each mask/score closure against an explicit dense construction."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from ringcompile import mods


def _grid(B, H, q0, Sq, k0, Sk):
    return mods.index_grid(B, H, q0, Sq, k0, Sk)


@given(q0=st.integers(0, 40), k0=st.integers(0, 40), sq=st.integers(1, 9), sk=st.integers(1, 9),
       w=st.integers(1, 12))
def test_masks_match_dense_definitions(q0, k0, sq, sk, w):
    grid = _grid(1, 1, q0, sq, k0, sk)
    qi = torch.arange(q0, q0 + sq)[:, None]
    ki = torch.arange(k0, k0 + sk)[None, :]
    causal = mods.evaluate_mask(mods.causal(), grid, ())[0, 0]
    assert torch.equal(causal, ki <= qi)
    win = mods.evaluate_mask(mods.sliding_window(w), grid, ())[0, 0]
    assert torch.equal(win, (ki <= qi) & (qi - ki < w))
    both = mods.evaluate_mask(mods.sliding_window(w, is_causal=False), grid, ())[0, 0]
    assert torch.equal(both, (qi - ki).abs() < w)


def test_key_padding_and_composition():
    torch.manual_seed(0)
    B, S = 3, 11
    key_mask = torch.rand(B, S) > 0.4
    m = mods.and_masks(mods.causal(), mods.key_padding())
    assert m.kind == "causal+padding" and m.n_extras == 1 and m.describe() == "causal & padding"
    keep = mods.evaluate_mask(m, _grid(B, 2, 0, S, 0, S), (key_mask,))
    dense = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & key_mask[:, None, None, :]
    assert torch.equal(keep.expand(B, 2, S, S), dense.expand(B, 2, S, S))


def test_score_mods_match_formulas():
    torch.manual_seed(1)
    B, H, S = 2, 3, 7
    s = torch.randn(B, H, S, S, dtype=torch.float64)
    slopes = torch.rand(H, dtype=torch.float64)
    grid = _grid(B, H, 0, S, 0, S)
    pos = torch.arange(S, dtype=torch.float64)
    expected = s + slopes[None, :, None, None] * (pos[None, :] - pos[:, None])
    assert torch.allclose(mods.alibi()(s, *grid, slopes), expected)
    capped = mods.compose_scores(mods.softcap(2.0), mods.alibi())
    assert torch.allclose(capped(s, *grid, slopes), torch.tanh(s / 2.0) * 2.0 + (expected - s))
    assert capped.n_extras == 1 and capped.kind == "softcap+alibi"


def test_from_callable_wraps_plain_functions():
    def my_mask(b, h, q, kv):
        return (q - kv) % 2 == 0

    m = mods.from_callable(my_mask, is_mask=True)
    assert m.kind == "custom" and "my_mask" in m.describe()
    assert mods.from_callable(None, True) is None
    assert mods.from_callable(m, True) is m
