"""``ShardedCacheLayer.crop`` argument semantics on one rank's layers (no collectives: ``update`` only
files this rank's slots). Rollback against one process is tested in tests/models/test_generate_sharded.py."""

from __future__ import annotations

import pytest
import torch

from ringcompile.errors import OptionError
from ringcompile.runtime.cache_layout import CacheLayout
from ringcompile.serving.hf import ShardedCacheLayer, ShardedStaticLayer

pytest.importorskip("transformers")


def _filled(layer, rank: int, world: int, prefill: int = 9, appended: int = 4):
    g = torch.Generator().manual_seed(rank)
    k, v = (torch.randn(1, 2, prefill + appended, 4, generator=g) for _ in range(2))
    layer.update(k[:, :, :prefill], v[:, :, :prefill])
    for t in range(prefill, prefill + appended):
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    return k, v


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("rank", [0, 2])
def test_crop_keeps_exactly_the_layouts_slots_below_the_new_length(static, rank):
    world = 3
    layer = ShardedStaticLayer(rank, world, 20) if static else ShardedCacheLayer(rank, world)
    k, _ = _filled(layer, rank, world)
    layout = CacheLayout(world, 9)
    for arg, want_len in ((0, 13), (-2, 11), (20, 11), (7, 7), (-3, 4)):   # 0 and >= length: no change
        layer.crop(arg)
        slots = layout.slots(rank, want_len)
        assert layer.get_seq_length() == want_len
        assert layer.slots.tolist() == slots
        kept = layer.keys[:, :, :len(slots)] if static else layer.keys
        assert torch.equal(kept, k[:, :, slots])
    with pytest.raises(OptionError, match="cannot crop 5 tokens from a cache of 4"):
        layer.crop(-5)
