"""Specs built from user arguments (``ring_attention``, the simulated ring), and the GQA check both make.

Lives in the runtime so the public ``api`` and ``simulated_api`` share it without either
importing the other.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import torch

from ringcompile import mods
from ringcompile.errors import ShapeMismatchError
from ringcompile.options import Options
from ringcompile.spec import AttentionSpec, register_spec

Tensor = torch.Tensor
_CAUSAL = mods.causal()
_SPEC_CACHE: collections.OrderedDict[tuple, tuple[AttentionSpec, tuple]] = collections.OrderedDict()
_SPEC_CACHE_SIZE = 512
_LOCK = threading.Lock()


def check_gqa(q: Tensor, k: Tensor, enable_gqa: bool) -> None:
    """Like SDPA: differing head counts are an error unless GQA was asked for."""
    if q.dim() != 4 or k.dim() != 4:
        raise ShapeMismatchError(
            f"q and k must be (B, H, S_local, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] != k.shape[1]:
        if not enable_gqa:
            raise ShapeMismatchError(
                f"q has {q.shape[1]} heads but k/v have {k.shape[1]}: pass enable_gqa=True for grouped-query "
                "attention (as with scaled_dot_product_attention)")
        if q.shape[1] % k.shape[1]:
            raise ShapeMismatchError(f"with enable_gqa, query heads ({q.shape[1]}) must be a multiple of kv "
                                     f"heads ({k.shape[1]})")


def build_spec(
    *, is_causal: bool = False, mask_mod: Callable | None = None, score_mod: Callable | None = None,
    scale: float | None = None, strategy: str = "auto", group: Any = None, mesh_dim: int | str | None = None,
    layout: str | None = None, kernel: str = "auto", timeout: float = 300.0, block_size: int | None = None,
    record_timing: bool = False,
) -> AttentionSpec:
    """The spec for these arguments (validated through ``Options``); the same object for the same args."""
    return cached_spec(is_causal, mask_mod, score_mod, scale, strategy, group, mesh_dim, layout, kernel,
                       timeout, block_size, record_timing)[0]


def cached_spec(is_causal, mask_mod, score_mod, scale, strategy, group, mesh_dim, layout, kernel, timeout,
                block_size, record_timing) -> tuple[AttentionSpec, str]:
    """(spec, registry key) for these arguments; one spec per distinct set of argument objects.

    Cached by the arguments' identities in this process only (the objects are kept alive with
    the entry, so an id cannot be reused while cached); the registry key is by content.
    """
    layout = layout if layout is not None else ("zigzag" if strategy == "zigzag" else "contiguous")
    Options(strategy=strategy, layout=layout, kernel=kernel, timeout=timeout, block_size=block_size)
    key = (bool(is_causal), id(mask_mod), id(score_mod), scale, strategy, id(group), mesh_dim, layout, kernel,
           float(timeout), block_size, bool(record_timing))
    with _LOCK:
        hit = _SPEC_CACHE.get(key)
        if hit is not None and hit[1] == (mask_mod, score_mod, group):
            _SPEC_CACHE.move_to_end(key)
        else:
            hit = None
    if hit is not None:
        return hit[0], register_spec(hit[0])  # registered again: the bounded registry may have evicted it
    mask = mods.from_callable(mask_mod, is_mask=True)
    if is_causal:
        mask = _CAUSAL if mask is None else mods.and_masks(_CAUSAL, mask)
    spec = AttentionSpec(scale=scale, mask=mask, score=mods.from_callable(score_mod, is_mask=False),
                         strategy=strategy, layout=layout, group=group, mesh_dim=mesh_dim, kernel=kernel,
                         timeout=float(timeout), block_size=block_size, record_timing=record_timing,
                         name="ringcompile.ring_attention")
    with _LOCK:
        _SPEC_CACHE[key] = (spec, (mask_mod, score_mod, group))  # keeps the ids in the key alive
        while len(_SPEC_CACHE) > _SPEC_CACHE_SIZE:
            _SPEC_CACHE.popitem(last=False)
    return spec, register_spec(spec)
