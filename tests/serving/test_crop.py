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


@pytest.mark.parametrize("rank", [0, 2])
def test_compiled_layer_crop_drops_its_slots_in_place_and_appends_refill_them(rank, monkeypatch):
    """``CompiledShardedLayer.crop``: kept entries are exactly the layout's slots below the new length;
    dropped ones get slot -1 and zeros; appending the same slots again refills them where they were."""
    from ringcompile.serving import compiled_cache
    from ringcompile.serving.compiled_cache import CompiledShardedLayer

    monkeypatch.setattr(compiled_cache, "cache_gather", lambda *a: (None, None))   # no ranks here
    world, prefill, appended = 3, 9, 4
    layer = CompiledShardedLayer(rank, world, max_cache_len=20)
    k, v = _filled(layer, rank, world, prefill, appended)
    full_keys = layer.keys.clone()
    layout = CacheLayout(world, prefill)
    for arg, want_len in ((0, 13), (-2, 11), (20, 11), (7, 7)):      # 0 and >= length: no change
        layer.crop(arg)
        slots = layout.slots(rank, want_len)
        assert int(layer.get_seq_length()) == want_len and layer.filled() == len(slots)
        assert layer.slots[:len(slots)].tolist() == slots and bool((layer.slots[len(slots):] == -1).all())
        assert torch.equal(layer.keys[:, :, :len(slots)], k[:, :, slots])
        assert not bool(layer.keys[:, :, len(slots):].any())
    for t in range(7, prefill + appended):                              # the same tokens again
        layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert torch.equal(layer.keys, full_keys)
    with pytest.raises(OptionError, match="cannot crop 14 tokens from a cache of 13"):
        layer.crop(-14)
