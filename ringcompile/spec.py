"""What one rewritten attention needs at run time, and the registry the custom op reads it from.

Custom ops take only tensors and scalars, so each site's static description (scale, mods,
strategy, group...) lives here under a string key that the op call carries. Keys are
content-derived so a recompiled graph in a new process finds the same key after the
backend re-registers it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Any

from .errors import RingCompileError
from .mods import Mod


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Static facts about one attention call.

    scale:     softmax scale; None means 1/sqrt(head_dim).
    mask:      mask mod over global indices, or None.
    score:     score mod over global indices, or None.
    dropout_p: attention-probability dropout (training only).
    strategy:  "auto", "ring", "zigzag", "allgather", "ulysses" or "local".
    layout:    "contiguous" or "zigzag" for the q/k/v shards the op receives; None = contiguous.
    group:     ProcessGroup, DeviceMesh or None (default group / single process).
    mesh_dim:  which DeviceMesh dimension, when group is a mesh.
    kernel:    "auto", "triton" or "cpu" ("cpu" = no Triton: the CPU kernels on CPU tensors, the
              device-generic PyTorch kernels on other devices).
    timeout:   seconds per collective.
    block_size: K/V tokens per ring transfer chunk (ring/zigzag): a shard travels as
              ceil(local/block_size) messages; None = the planner's choice (whole shard
              when no plan is available). The compute block is the kernels' own choice.
    tiles:     Triton tile sizes (a mapping with BLOCK_M/BLOCK_N/num_warps/num_stages, or a
              ``kernels.triton.launch.Tiles``); None = the planner's on CUDA, defaults elsewhere.
    profile:   hardware profile (name or TOML path) the run-time planner uses for "auto" and the
              K/V chunk; None = the default for the device.
    record_timing: keep a timing record per call.
    name:      where the site came from, for logs and reports.
    """

    scale: float | None = None
    mask: Mod | None = None
    score: Mod | None = None
    dropout_p: float = 0.0
    strategy: str = "auto"
    layout: str | None = None
    group: Any = None
    mesh_dim: int | str | None = None
    kernel: str = "auto"
    timeout: float = 300.0
    block_size: int | None = None
    tiles: Any = None
    profile: str | None = None
    record_timing: bool = False
    name: str = ""

    def replace(self, **changes: Any) -> AttentionSpec:
        return dataclasses.replace(self, **changes)


_REGISTRY: dict[str, AttentionSpec] = {}
_LOCK = threading.Lock()


def register_spec(spec: AttentionSpec) -> str:
    """Store ``spec`` and return the key the op call should carry."""
    fields = (spec.scale, spec.dropout_p, spec.strategy, spec.layout, spec.kernel, spec.timeout,
              spec.block_size, _tiles_identity(spec.tiles), spec.profile, spec.record_timing, spec.name,
              spec.mesh_dim,
              _mod_identity(spec.mask), _mod_identity(spec.score), id(spec.group) if spec.group else 0)
    digest = hashlib.sha1(repr(fields).encode()).hexdigest()[:16]
    with _LOCK:
        key = digest
        n = 0
        while key in _REGISTRY and _REGISTRY[key] is not spec and not _same(_REGISTRY[key], spec):
            n += 1
            key = f"{digest}-{n}"
        _REGISTRY[key] = spec
    return key


def get_spec(key: str) -> AttentionSpec:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise RingCompileError(
            f"no attention spec registered under {key!r}: a compiled graph is being run in a process "
            "where ringcompile did not compile it; recompile with backend='ring' in this process"
        ) from None


def _mod_identity(mod: Mod | None) -> Any:
    if mod is None:
        return None
    return (mod.kind, tuple(sorted(mod.params.items())), mod.n_extras, mod.description, id(mod.fn))


def _tiles_identity(tiles: Any) -> Any:
    """Tiles as plain sorted items (mappings) so equal tiles give equal keys."""
    if isinstance(tiles, dict):
        return tuple(sorted((str(k), v) for k, v in tiles.items()))
    return tiles


def _same(a: AttentionSpec, b: AttentionSpec) -> bool:
    return a.mask is b.mask and a.score is b.score and a.group is b.group and dataclasses.astuple(
        a.replace(mask=None, score=None, group=None)) == dataclasses.astuple(
        b.replace(mask=None, score=None, group=None))
