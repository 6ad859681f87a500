"""Generated Triton kernels for attention blocks.

``triton_block_kernels(spec)`` returns block functions with the exact contract of
``kernels.reference.block_forward`` / ``block_backward`` (dropout included) whose work runs
in Triton kernels generated for the site (its mods lowered from FX, its head dim, dtype and
GQA mapping), or None when the site cannot be lowered. ``show(site)`` returns the generated
source. Triton is imported only when a kernel is built, so this package is cheap to import.

Modules: ``lower_mods`` (FX mod graph -> Triton statements and their derivatives),
``template`` (the kernel text), ``codegen`` (specialisation, key, rendering), ``cache``
(generated modules on disk), ``launch`` (strides, grids, tiles, fallbacks), ``offline``
(compile for a GPU target without a GPU).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from ringcompile.errors import KernelError
from ringcompile.log import get_logger
from ringcompile.spec import AttentionSpec

log = get_logger(__name__)


def triton_block_kernels(spec: AttentionSpec, forced: bool = False):
    """BlockKernels generated for ``spec``, or None (logged) when the site cannot be lowered.

    With ``forced`` (``kernel="triton"``) a site that cannot be lowered raises KernelError.
    """
    with _SELECT_LOCK:  # virtual ranks ask from several threads at once
        per_spec = _SELECTED.setdefault(spec, {})
        if forced not in per_spec:
            per_spec[forced] = _select(spec, forced)
        return per_spec[forced]


# The runtime asks for kernels on every call: the answer (and its generated modules) is kept
# per spec for as long as the spec lives.
_SELECTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SELECT_LOCK = threading.RLock()


def _select(spec: AttentionSpec, forced: bool):
    from ..kernel_set import BlockKernels
    from .launch import TritonBlocks, planner_tiles
    from .lower_mods import check_lowerable

    reason = _triton_missing()
    if reason is None:
        for mod in (spec.mask, spec.score):
            reason = check_lowerable(mod)
            if reason is not None:
                break
    if reason is not None:
        if forced:
            raise KernelError(f"kernel='triton' was requested for {spec.name or 'a site'} but the site "
                              f"cannot be lowered: {reason}; use kernel='auto' or 'cpu'")
        log.info("site %s: Triton kernels declined (the PyTorch block path runs): %s", spec.name, reason)
        return None
    blocks = TritonBlocks(forced, planner_tiles(getattr(spec, "tiles", None)), spec.name)
    return BlockKernels("triton", blocks.forward, blocks.backward, device_seed=True)


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def show(spec_or_site: Any, *, head_dim: int = 64, v_head_dim: int | None = None,
         dtype: torch.dtype = torch.bfloat16, groups: int | None = None,
         mask_extras: list[torch.Tensor] | None = None,
         score_extras: list[torch.Tensor] | None = None, dropout: bool | None = None) -> str:
    """The generated Triton source for a site (an AttentionSpec or AttentionSite).

    Head dim, dtype and GQA group size are what the source is specialised on; extras default
    to examples of the ranks the mods index them with; dropout defaults to the site's.
    """
    from .codegen import specialise
    from .lower_mods import example_extras

    mask, score = getattr(spec_or_site, "mask", None), getattr(spec_or_site, "score", None)
    groups = groups if groups is not None else int(getattr(spec_or_site, "gqa_groups", 1) or 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mx = mask_extras if mask_extras is not None else example_extras(mask, acc)
    sx = score_extras if score_extras is not None else example_extras(score, acc)
    gen = specialise(mask, score, head_dim=head_dim, v_head_dim=v_head_dim or head_dim, dtype=dtype,
                     groups=groups, mask_extras=mx, score_extras=sx,
                     dropout=bool(getattr(spec_or_site, "dropout_p", 0.0)) if dropout is None else dropout)
    return gen.source


__all__ = ["show", "triton_block_kernels"]
