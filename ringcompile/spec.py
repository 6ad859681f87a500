"""What one rewritten attention needs at run time, and the registry the custom op reads it from.

Custom ops take only tensors and scalars, so each site's static description (scale, mods,
strategy, group...) lives here under a string key that the op call carries. Keys are
content keys (``ringcompile.content_key``, no ``id()``), so a recompiled graph in a new
process finds the same key after the backend re-registers it, and every rank computes the
same key for the same site. The registry is a bounded LRU (``set_registry_size``); calling
an evicted spec raises ``SpecEvictedError`` saying how to raise the limit.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
from typing import Any

from .content_key import ContentKey, content_key
from .errors import RingCompileError, SpecEvictedError
from .mods import Mod


@dataclasses.dataclass(frozen=True, eq=False)
class DeadRowForm:
    """A finite masking constant claimed as a mask, written back as the exact score term it is.

    A claim (``passes/classify_mods``) is exact for rows that keep a key; a row whose keys are all
    masked gets, in eager, softmax over the constants themselves (uniform weights for finfo.min).
    ``mask``/``score`` compute those scores exactly (the constant as a fill or added term; ``mask``
    keeps only the -inf parts). Their extras are picked from the op's ``mask_extras + score_extras``
    by ``mask_idx``/``score_idx``. ``shift``: the form's scores are eager's minus ``shift`` (a per-row
    constant, so softmax is unchanged), which keeps a kernel's lse from absorbing ``log(n)`` into
    a huge constant (finfo.min + log 8 == finfo.min); the op's lse output adds it back.
    """

    mask: Mod | None
    score: Mod | None
    mask_idx: tuple[int, ...] = ()
    score_idx: tuple[int, ...] = ()
    shift: float = 0.0


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
    mesh_dim:  which DeviceMesh dimension, when group is a mesh; (outer, inner) for "hybrid".
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
    dead_rows: the exact bias form of a mask that claims finite constants (``DeadRowForm``), used
              for query rows with no kept key at all (``runtime.dead_rows``); None otherwise.
    """

    scale: float | None = None
    mask: Mod | None = None
    score: Mod | None = None
    dropout_p: float = 0.0
    strategy: str = "auto"
    layout: str | None = None
    group: Any = None
    mesh_dim: int | str | tuple | None = None
    kernel: str = "auto"
    timeout: float = 300.0
    block_size: int | None = None
    tiles: Any = None
    profile: str | None = None
    record_timing: bool = False
    name: str = ""
    dead_rows: DeadRowForm | None = None

    def replace(self, **changes: Any) -> AttentionSpec:
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def content(self) -> ContentKey:
        """This spec's content key (``ringcompile.content_key``): equal specs built anywhere agree."""
        fields = tuple((f.name, _group_identity(getattr(self, f.name)) if f.name == "group"
                        else _tiles_identity(getattr(self, f.name)) if f.name == "tiles"
                        else getattr(self, f.name)) for f in dataclasses.fields(self))
        return content_key(fields)


DEFAULT_REGISTRY_SIZE = int(os.environ.get("RINGCOMPILE_SPEC_REGISTRY_SIZE", "4096"))
_REGISTRY: collections.OrderedDict[str, AttentionSpec] = collections.OrderedDict()
_EVICTED: collections.OrderedDict[str, None] = collections.OrderedDict()  # recently evicted keys
_LOCK = threading.Lock()
_limit = DEFAULT_REGISTRY_SIZE


def set_registry_size(size: int) -> None:
    """Keep at most ``size`` specs (least recently used go first); also RINGCOMPILE_SPEC_REGISTRY_SIZE."""
    global _limit
    if size < 1:
        raise RingCompileError(f"the spec registry size must be at least 1, got {size}")
    with _LOCK:
        _limit = int(size)
        _evict()


def registry_size() -> int:
    return _limit


def register_spec(spec: AttentionSpec) -> str:
    """Store ``spec`` and return the key the op call should carry: its content digest.

    Two different specs with one digest (only possible when some part has no stable
    description, ``spec.content.stable`` False) get ``-1``, ``-2``... suffixes in this process.
    """
    digest = spec.content.digest
    with _LOCK:
        key, n = digest, 0
        while key in _REGISTRY and _REGISTRY[key] is not spec and not _same(_REGISTRY[key], spec):
            n += 1
            key = f"{digest}-{n}"
        if key not in _REGISTRY:
            _REGISTRY[key] = spec
        _REGISTRY.move_to_end(key)
        _EVICTED.pop(key, None)
        _evict()
    return key


def get_spec(key: str) -> AttentionSpec:
    with _LOCK:
        spec = _REGISTRY.get(key)
        if spec is not None:
            _REGISTRY.move_to_end(key)
            return spec
        evicted = key in _EVICTED
    if evicted:
        raise SpecEvictedError(
            f"the attention spec {key!r} was evicted from the spec registry, which keeps the {_limit} most "
            "recently used specs (a run with many distinct sites or options); raise the limit with "
            "ringcompile.spec.set_registry_size(n) or RINGCOMPILE_SPEC_REGISTRY_SIZE=n, or recompile "
            "(torch._dynamo.reset()) so the backend registers it again")
    raise RingCompileError(
        f"no attention spec registered under {key!r}: a compiled graph is being run in a process "
        "where ringcompile did not compile it; recompile with backend='ring' in this process"
    )


def _evict() -> None:
    """Drop least recently used specs past the limit (caller holds the lock)."""
    while len(_REGISTRY) > _limit:
        old, _ = _REGISTRY.popitem(last=False)
        _EVICTED[old] = None
    while len(_EVICTED) > 16 * _limit:
        _EVICTED.popitem(last=False)


def _group_identity(group: Any) -> Any:
    """A process group or mesh by what every rank sees alike: its ranks (and names), never its address."""
    if group is None or isinstance(group, (str, int)):
        return group
    mesh = getattr(group, "mesh", None)
    if mesh is not None and hasattr(group, "mesh_dim_names"):
        return ("mesh", getattr(group, "device_type", None), tuple(mesh.flatten().tolist()),
                tuple(mesh.shape), group.mesh_dim_names)
    try:
        import torch.distributed as dist

        return ("process_group", tuple(dist.get_process_group_ranks(group)))
    except Exception:  # not a group of the initialised world: no stable description
        return group


def _tiles_identity(tiles: Any) -> Any:
    """Tiles as plain sorted items (mappings) so equal tiles give equal keys."""
    if isinstance(tiles, dict):
        return tuple(sorted((str(k), v) for k, v in tiles.items()))
    return tiles


def _same(a: AttentionSpec, b: AttentionSpec) -> bool:
    """Equal stable content keys describe the same spec; otherwise only the same objects do."""
    if a.content.stable and a.content == b.content:
        return True
    return a.mask is b.mask and a.score is b.score and a.group is b.group and dataclasses.astuple(
        a.replace(mask=None, score=None, group=None)) == dataclasses.astuple(
        b.replace(mask=None, score=None, group=None))
