"""The runtime as the compile-time passes see it: the one module a pass may import the runtime through.

Passes insert calls of the traceable collectives (``torch.ops.ringcompile.to_local``,
``gather_seq``, ``reduce_partial``, ``shift_seq``, and the ``grad_reduce_view`` function) and
compute their arguments with a few pure helpers (padded length, group name, group resolution).
Importing this module registers those ops. Nothing else of ``ringcompile.runtime`` is reachable
from ``passes/``: ``tests/test_import_cycles.py`` checks it, so the runtime can change behind
this list without a pass noticing.
"""

from __future__ import annotations

from typing import Any

from .runtime import collectives as _collectives
from .runtime.group import ResolvedGroup, resolve_group
from .runtime.layouts import padded_length

grad_reduce_view = _collectives.grad_reduce_view
group_name_of = _collectives.group_name_of


def world_size(group: Any = None, mesh_dim: int | str | None = None) -> int:
    """Ranks the sequence is split over (1 when torch.distributed is not initialised)."""
    return resolve_group(group, mesh_dim).world_size


__all__ = ["ResolvedGroup", "grad_reduce_view", "group_name_of", "padded_length", "resolve_group",
           "world_size"]
