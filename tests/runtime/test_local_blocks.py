"""The block-pair classification that lets the runtime skip empty pairs and drop fully kept masks."""

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
