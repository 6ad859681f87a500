"""The block-pair classification that lets the runtime skip empty pairs and drop fully kept masks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ringcompile import mods
from ringcompile.runtime.local import mask_structure


@given(q0=st.integers(0, 40), qn=st.integers(1, 12), k0=st.integers(0, 40), kn=st.integers(1, 12),
       which=st.sampled_from(["causal", "sliding_causal", "sliding_both"]), window=st.integers(1, 9))
def test_mask_structure_agrees_with_the_evaluated_mask(q0, qn, k0, kn, which, window):
    mask = {"causal": mods.causal(), "sliding_causal": mods.sliding_window(window),
            "sliding_both": mods.sliding_window(window, is_causal=False)}[which]
    qi = torch.arange(q0, q0 + qn).view(-1, 1)
    kv = torch.arange(k0, k0 + kn).view(1, -1)
    keep = mask.fn(None, None, qi, kv)
    want = "empty" if not keep.any() else "full" if keep.all() else "partial"
    assert mask_structure(mask, q0, q0 + qn - 1, k0, k0 + kn - 1) == want


def test_unknown_masks_are_not_classified():
    assert mask_structure(mods.key_padding(), 0, 3, 0, 3) is None
    assert mask_structure(mods.and_masks(mods.causal(), mods.key_padding()), 0, 3, 0, 3) is None


_INDEX_MASKS = st.one_of(
    st.just(("causal", 0)),
    st.tuples(st.just("sliding_causal"), st.integers(1, 12)),
    st.tuples(st.just("sliding_both"), st.integers(1, 12)),
)


def _index_mask(which: str, window: int) -> mods.Mod:
    if which == "causal":
        return mods.causal()
    return mods.sliding_window(window, is_causal=which == "sliding_causal")


@given(q0=st.integers(0, 40), qn=st.integers(1, 12), k0=st.integers(0, 40), kn=st.integers(1, 12),
       parts=st.lists(_INDEX_MASKS, min_size=2, max_size=3), padding=st.booleans())
def test_combined_masks_are_classified_from_indices_without_lying(q0, qn, k0, kn, parts, padding):
    """An AND of index masks (two windows of different widths included, with or without padding)
    is classified by host arithmetic: "empty" only when nothing is kept, "full" only when all is."""
    joined = [_index_mask(w, n) for w, n in parts]
    key_mask = torch.rand(1, 60) > 0.5
    mask = mods.and_masks(*joined, *( [mods.key_padding()] if padding else []))
    qi = torch.arange(q0, q0 + qn).view(1, 1, -1, 1)
    kv = torch.arange(k0, k0 + kn).view(1, 1, 1, -1)
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    keep_index = torch.ones(qn, kn, dtype=torch.bool)
    for which, window in parts:  # the definitions, written out independently of mods.py
        d = qi[0, 0] - kv[0, 0]
        if which == "causal":
            keep_index &= d >= 0
        elif which == "sliding_causal":
            keep_index &= (d >= 0) & (d < window)
        else:
            keep_index &= d.abs() < window
    got = mask_structure(mask, q0, q0 + qn - 1, k0, k0 + kn - 1)
    if not keep_index.any():
        assert got == "empty"  # the index parts alone remove the pair: skipped with no data read
    if got == "empty":
        assert not mask.fn(b, None, qi, kv, *([key_mask] if padding else [])).any()
    if got == "full":
        assert not padding and keep_index.all()
    if padding and got != "empty":
        assert got is None  # padding depends on data: the kernel masks it
    assert mask.parts and [p.params.get("window") for p in mask.parts[:len(parts)]] == \
        [None if w == "causal" else n for w, n in parts]


def test_and_masks_keeps_each_parts_params():
    two = mods.and_masks(mods.sliding_window(3), mods.sliding_window(20, is_causal=False))
    assert [p.params for p in two.parts] == [{"window": 3, "causal": True}, {"window": 20, "causal": False}]
    assert two.params == {}  # the parts disagree on both facts: neither is stated for the whole
    nested = mods.and_masks(two, mods.causal())
    assert [p.kind for p in nested.parts] == ["sliding_window", "sliding_window", "causal"]
    same = mods.and_masks(mods.sliding_window(5), mods.key_padding())
    assert same.params == {"window": 5, "causal": True}


def _dense_two_window_attention(q, k, v, w_causal, w_both):
    """float64 attention with the mask written out: 0 <= q-kv < w_causal and |q-kv| < w_both."""
    S = q.shape[2]
    d = torch.arange(S).view(-1, 1) - torch.arange(S).view(1, -1)
    keep = (d >= 0) & (d < w_causal) & (d.abs() < w_both)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


@pytest.mark.parametrize("order", ["narrow_first", "wide_first"])
def test_two_windows_of_different_widths_vs_float64(order):
    """Blocks the wide window keeps whole must still apply the narrow one (the merged-params bug)."""
    from ringcompile.runtime.local import local_forward
    from ringcompile.spec import AttentionSpec

    g = torch.Generator().manual_seed(11 if order == "narrow_first" else 12)
    q, k, v = (torch.randn(1, 2, 48, 8, generator=g, dtype=torch.float64) for _ in range(3))
    narrow, wide = mods.sliding_window(3), mods.sliding_window(20, is_causal=False)
    mask = mods.and_masks(narrow, wide) if order == "narrow_first" else mods.and_masks(wide, narrow)
    spec = AttentionSpec(mask=mask)
    out, lse = local_forward(q, k, v, [], [], 48, spec, block=4)
    torch.testing.assert_close(out, _dense_two_window_attention(q, k, v, 3, 20), atol=1e-10, rtol=1e-10)
