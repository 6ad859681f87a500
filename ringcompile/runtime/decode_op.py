"""``torch.ops.ringcompile.decode_attention``: flash-decoding across ranks as one opaque custom op.

What a compiled decode graph calls (``runtime/decode.py`` does the work): Dynamo, AOTAutograd and
Inductor see one call whose output has q's shape with v's head dim, so the cache length can be a
dynamic size (one graph for every generated token). The group travels by name, the cache layout as
ints, a missing window as -1, a missing mask as None. A model's mask is the whole rule, as the graph's
SDPA over the gathered cache applies it in one process (``decode``: ``whole_mask``).
"""

from __future__ import annotations

import torch

from ringcompile import op_support
from ringcompile.cache_codes import layout_code, layout_from_code

from .cache_layout import CacheLayout

Tensor = torch.Tensor


def layout_ints(layout: CacheLayout | None) -> list[int]:
    """A CacheLayout as the op's int list ([] for none): [prefill_len, layout index, policy index]."""
    if layout is None:
        return []
    return layout_code(layout.prefill_len, layout.prefill_layout, layout.policy)


@torch.library.custom_op("ringcompile::decode_attention", mutates_args=(), **op_support.SYNCING)
def decode_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_slots: Tensor, q_slots: Tensor,
                        slot_mask: Tensor | None, cache_len: int, window: int, scale: float, group_name: str,
                        timeout: float, layout: list[int]) -> Tensor:
    """Replicated queries against this rank's cache shard, merged over the group ``group_name``
    ("single": no communication). ``cache_len`` -1: the last query slot + 1; kv_slots -1 at the end of
    the shard: preallocated entries not written yet."""
    from .communicator import RingCommunicator
    from .decode import decode_attention
    from .group import SINGLE, resolve_group

    if group_name == "single":
        resolved = SINGLE
    else:
        from .collectives import group_by_name

        resolved = resolve_group(group_by_name(group_name))
    cl = None
    if layout:
        cl = CacheLayout(resolved.world_size, *layout_from_code(layout))
    with op_support.device_guard(q.device):
        return decode_attention(q, k, v, kv_slots=kv_slots, q_slots=q_slots,
                                cache_len=None if cache_len < 0 else cache_len,
                                slot_mask=slot_mask, window=None if window < 0 else window, scale=scale,
                                layout=cl, comm=RingCommunicator(resolved, timeout, device=q.device),
                                whole_mask=True)


@decode_attention_op.register_fake
def _(q, k, v, kv_slots, q_slots, slot_mask, cache_len, window, scale, group_name, timeout, layout):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
