"""Tiles per kernel (forward, dK/dV, dQ), chosen from what Triton's compiler reports.

Each kernel has its own candidates, most preferred first (``CANDIDATES``). Which of them to
launch on a GPU was decided offline, not at call time: ``tile_search`` compiled them for sm_90
(``offline.resources``: ``metadata.shared`` and ``ptxas -v`` spill counts) for a plain and a
heavy specialisation and wrote what it measured to ``tiles_sm90.py``. ``chosen`` is the first
measured candidate whose shared memory is within the limit and that spills nothing;
``tests/kernels/test_tile_resources.py`` compiles the chosen ones again and asserts both. At
launch, a candidate that still does not fit (``OutOfResources``: another GPU or Triton version)
is dropped and the next, smaller one runs. The dK/dV kernel's kv tile (BLOCK_N) is the M
dimension of its dots and the dQ kernel's q tile (BLOCK_M) of its dots: the candidates keep
them at 64 or 128 (Hopper wgmma) before falling back to smaller tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ringcompile.log import get_logger

log = get_logger(__name__)

KERNELS = ("fwd", "dkdv", "dq")
# what tile_search measures, and what a generated module declares itself as (its TILE_CLASS):
# "plain" = index-only mask, no score mod, no dropout; "heavy" = anything else
TILE_CLASSES = ("plain", "heavy")
# Shared memory per block on sm_90 with the opt-in attribute (227 KB on H100/H200); the same
# number is the h100 profiles' ``shared_memory`` (cost_model/profiles).
SM90_SHARED_LIMIT = 232448
H100_SHARED_MEMORY = SM90_SHARED_LIMIT  # old name
# head dims the table is measured at: powers of two, and the common ones that are not (80, 96), which
# run as two power-of-two column pieces (64 + 16, 64 + 32: head_split.py) and are measured on their own
SPLIT_D_CLASSES = (80, 96)
D_CLASSES = (64, 80, 96, 128, 256)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch settings for one kernel."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def _t(*rows: tuple[int, int, int, int]) -> tuple[Tiles, ...]:
    return tuple(Tiles(*r) for r in rows)


# (BLOCK_M, BLOCK_N, warps, stages), most preferred first: big tiles on the kernel's M dimension
CANDIDATES: dict[str, tuple[Tiles, ...]] = {
    "fwd": _t((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
              (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)),
    "dkdv": _t((64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2),
               (32, 64, 4, 2), (16, 64, 4, 2), (16, 64, 8, 1), (16, 32, 4, 1), (16, 32, 8, 1),
               (16, 16, 4, 1)),
    "dq": _t((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2),
             (64, 32, 4, 2), (64, 16, 4, 2), (32, 16, 4, 1), (32, 16, 8, 1), (16, 16, 4, 1),
             (16, 16, 8, 1)),
}
# D=256: an [M, 256] fp32 accumulator alone is 128 registers a thread at M=64 and 4 warps, so the
# big tiles of the lists above all spill (measured: 1.3-13.6 KB for the forward); start at 8 warps
CANDIDATES_D256: dict[str, tuple[Tiles, ...]] = {
    "fwd": _t((64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (32, 16, 4, 1),
              (16, 16, 4, 1)),
    "dkdv": _t((32, 64, 8, 2), (16, 64, 8, 2), (16, 64, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1), (16, 32, 4, 1),
               (16, 16, 4, 1)),
    "dq": _t((64, 32, 8, 2), (64, 16, 8, 2), (64, 16, 8, 1), (32, 16, 8, 2), (32, 16, 8, 1), (32, 16, 4, 1),
             (16, 16, 4, 1), (16, 16, 8, 1)),
}
SMALLEST = Tiles(16, 16, 4, 1)


def candidate_order(kernel: str, head_dim: int) -> tuple[Tiles, ...]:
    """``kernel``'s candidates for ``head_dim``'s class, most preferred first."""
    return (CANDIDATES_D256 if d_class(head_dim) == 256 else CANDIDATES)[kernel]


def d_class(head_dim: int) -> int:
    """The measured head-dim class a head dim runs as: itself for 80 and 96, else its padded power of
    two (at least 64; other dims use that power of two's row, which was not measured for them: padded
    ones, e.g. 112, carry lane masks, split ones, e.g. 48 or 160, hold fewer columns than the row's)."""
    if head_dim in SPLIT_D_CLASSES:
        return head_dim
    padded = 16
    while padded < head_dim:
        padded *= 2
    return min(max(padded, 64), 256)


def dtype_class(dtype: torch.dtype) -> str:
    return "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"


@dataclasses.dataclass(frozen=True)
class Measured:
    """One candidate as the offline compile saw it: {specialisation: (shared, registers, spills)}."""

    tiles: Tiles
    resources: dict

    def fits(self, limit: int = SM90_SHARED_LIMIT, tile_class: str = "heavy") -> bool:
        """Within ``limit`` bytes of shared memory and spill-free for ``tile_class``: "plain" kernels
        (index-only masks, no score mod, no dropout) need the plain measurement to pass, every other
        kernel the heavy one as well."""
        need = ("plain",) if tile_class == "plain" else TILE_CLASSES
        return (set(self.resources) >= set(need)
                and all(self.resources[c][0] <= limit and self.resources[c][2] == 0 for c in need))

    def failed(self, limit: int = SM90_SHARED_LIMIT, tile_class: str = "heavy") -> bool:
        """Some specialisation ``tile_class`` needs was measured over ``limit`` or spilling."""
        need = ("plain",) if tile_class == "plain" else TILE_CLASSES
        return any(self.resources[c][0] > limit or self.resources[c][2] != 0
                   for c in need if c in self.resources)

    @property
    def shared(self) -> int:
        return max(s for s, _, _ in self.resources.values())


@functools.cache
def _table() -> dict[tuple[str, int, str], tuple[Measured, ...]]:
    """The shipped measurements, checked against the running Triton and template (logged, not fatal:
    launches still retry smaller tiles on OutOfResources)."""
    from . import tiles_sm90
    from .codegen import template_hash

    try:
        import triton

        version = triton.__version__
    except ImportError:
        version = None
    if version is not None and version != tiles_sm90.TRITON_VERSION:
        log.info("Triton tiles were measured with triton %s, this is %s: the launch-time OutOfResources "
                 "retry covers differences", tiles_sm90.TRITON_VERSION, version)
    if tiles_sm90.TEMPLATE_HASH != template_hash():
        log.warning("kernels/triton/tiles_sm90.py was measured for another kernel template; regenerate "
                    "it with python -m ringcompile.kernels.triton.tile_search")
    cells = dict(tiles_sm90.MEASURED)
    cells.update(_version_cells(version))
    return {key: tuple(Measured(Tiles(*t), res) for t, res in rows) for key, rows in cells.items()}


def _version_cells(version: str | None) -> dict:
    """Cells re-measured with another Triton (``tiles_sm90_triton36.py`` for 3.6.x), where it
    allocates differently: they replace the main table's cells when that Triton runs."""
    if not version:
        return {}
    import importlib

    name = "tiles_sm90_triton" + "".join(version.split(".")[:2])
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return {}
    log.info("Triton %s: %d tile table cells from %s", version, len(module.MEASURED), name)
    return dict(module.MEASURED)


def measured(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[Measured, ...]:
    return _table().get((kernel, d_class(head_dim), dtype_class(dtype)), ())


def chosen_measured(kernel: str, head_dim: int, dtype: torch.dtype, limit: int = SM90_SHARED_LIMIT,
                    tile_class: str = "heavy") -> Measured | None:
    """The most preferred measured candidate that fits ``limit`` without spills, or None."""
    return next((m for m in measured(kernel, head_dim, dtype) if m.fits(limit, tile_class)), None)


def candidates(kernel: str, head_dim: int, dtype: torch.dtype, preferred: Tiles | None = None,
               limit: int = SM90_SHARED_LIMIT, tile_class: str = "heavy") -> tuple[Tiles, ...]:
    """Tiles to try for ``kernel``, best first: the measured choice, then the smaller candidates after
    it (fallbacks for OutOfResources). A planner/user ``preferred`` tile leads but is still subject to
    the same launch-time resource check and fallbacks."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    order = candidate_order(kernel, head_dim)
    rows = measured(kernel, head_dim, dtype)
    pick = chosen_measured(kernel, head_dim, dtype, limit, tile_class)
    if pick is not None and pick.tiles in order:
        table = (pick.tiles, *order[order.index(pick.tiles) + 1:])
    else:  # a cell the search did not finish: skip what it measured as not fitting
        failed = {m.tiles for m in rows if m.failed(limit, tile_class)}
        table = tuple(t for t in order if t not in failed)
    lead = (preferred,) if preferred is not None and preferred not in table else ()
    out = (*lead, *table)
    return out if SMALLEST in out else (*out, SMALLEST)


def chosen(kernel: str, head_dim: int, dtype: torch.dtype, tile_class: str = "heavy") -> Tiles:
    """The tiles a GPU launch of ``kernel`` uses first (what the offline test checks)."""
    return candidates(kernel, head_dim, dtype, tile_class=tile_class)[0]
