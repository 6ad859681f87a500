"""Offline search for each kernel's tiles: compile candidates for sm_90, keep the first that fits.

For every head-dim class x dtype x kernel (forward, dK/dV, dQ) the candidates of
``tiles.CANDIDATES`` are compiled in order, most preferred first, for two specialisations: a
plain causal one and a heavy one (causal + key padding, ALiBi + softcap, dropout, GQA 4:1,
whose extra loads and atomics cost registers). A candidate is accepted when, for both, the
compiler's ``metadata.shared`` is within ``tiles.SM90_SHARED_LIMIT`` and ``ptxas -v`` reports
zero spill bytes. What was measured is written to ``tiles_sm90.py`` (a generated module that
ships with the package), so a launch never compiles candidates to choose.

Run: ``python -m ringcompile.kernels.triton.tile_search [--out kernels/triton/tiles_sm90.py]``
(no GPU needed; ptxas comes with Triton). Must not run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from . import cache, offline
from .codegen import Generated, specialise, template_hash
from .tiles import D_CLASSES, DTYPES, KERNELS, SM90_SHARED_LIMIT, TILE_CLASSES, Tiles, candidate_order

SPECS = TILE_CLASSES


def generated(spec: str, head_dim: int, dtype: torch.dtype) -> tuple[Generated, dict[str, str]]:
    """The specialisation measured as ``spec`` and the pointer dtypes of its extras."""
    from ringcompile import mods

    if spec == "plain":
        return specialise(mods.causal(), None, head_dim=head_dim, v_head_dim=head_dim, dtype=dtype, groups=1,
                          mask_extras=[], score_extras=[]), {}
    gen = specialise(mods.and_masks(mods.causal(), mods.key_padding()),
                     mods.compose_scores(mods.alibi(), mods.softcap(30.0)), head_dim=head_dim,
                     v_head_dim=head_dim, dtype=dtype, groups=4,
                     mask_extras=[torch.ones(2, 8, dtype=torch.bool)], score_extras=[torch.rand(4)],
                     dropout=True)
    return gen, {"mask_x0": "*u8"}


def measure(spec: str, kernel: str, head_dim: int, dtype: str, tiles: Tiles) -> offline.Resources:
    gen, extra = generated(spec, head_dim, DTYPES[dtype])
    module = cache.load(gen.key, gen.source)
    return offline.resources(module, kernel, dtype=dtype, tiles=tiles, extra_dtypes=extra)


def accepted(r: offline.Resources, limit: int = SM90_SHARED_LIMIT) -> bool:
    return r.shared <= limit and r.spill_bytes == 0


def search(kernel: str, d: int, dtype: str, log=print) -> list[tuple]:
    """Measured rows ``(tiles tuple, {spec: (shared, registers, spills)})`` up to the first accepted one."""
    rows = []
    for tiles in candidate_order(kernel, d):
        res = {}
        for spec in SPECS:
            t0 = time.time()
            r = measure(spec, kernel, d, dtype, tiles)
            res[spec] = (r.shared, r.registers, r.spill_bytes)
            log(f"{kernel:5s} D={d:3d} {dtype} {spec:5s} {tiles}: shared {r.shared} regs {r.registers} "
                f"spills {r.spill_bytes} ({time.time() - t0:.1f}s)")
            if not accepted(r):
                break
        rows.append((dataclass_tuple(tiles), res))
        if len(res) == len(SPECS) and all(accepted(offline.Resources(*v)) for v in res.values()):
            break
    return rows


def dataclass_tuple(t: Tiles) -> tuple[int, int, int, int]:
    return (t.block_m, t.block_n, t.num_warps, t.num_stages)


def render(measured: dict, elapsed: float) -> str:
    import triton

    ptxas = offline.ptxas_version() or "unknown"
    lines = [
        '"""Tiles measured offline for sm_90 by ``python -m ringcompile.kernels.triton.tile_search``.',
        '',
        'Generated: do not edit. Per (kernel, head-dim class, dtype): the candidates compiled, in',
        'preference order, with {specialisation: (shared bytes, registers, spill bytes)}, up to the',
        'first that fits for both specialisations (see ``tiles.chosen``); a cell without such a row',
        'was not finished (launches then skip the rows measured as not fitting)."""',
        "",
        f"TRITON_VERSION = {triton.__version__!r}",
        f"PTXAS_VERSION = {ptxas!r}",
        f"TEMPLATE_HASH = {template_hash()!r}",
        f"SHARED_LIMIT = {SM90_SHARED_LIMIT}",
        f"GENERATED = {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')!r}  "
        f"# {platform.node()}, {elapsed:.0f} s",
        "",
        "MEASURED = {",
    ]
    for key, rows in measured.items():
        lines.append(f"    {key!r}: [")
        lines += [f"        ({t!r}, {res!r})," for t, res in rows]
        lines.append("    ],")
    lines.append("}")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """The shipped table's choices as Markdown (for BENCHMARKS.md)."""
    from . import tiles, tiles_sm90

    out = [f"triton {tiles_sm90.TRITON_VERSION}, ptxas {tiles_sm90.PTXAS_VERSION}, measured "
           f"{tiles_sm90.GENERATED}, limit {tiles_sm90.SHARED_LIMIT} B", "",
           "| D | dtype | kernel | plain: tiles (M, N, warps, stages) | shared | regs | spills "
           "| heavy: tiles | shared | regs | spills | candidates compiled |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for dtype in DTYPES:
        for d in D_CLASSES:
            for kernel in KERNELS:
                cells = []
                for cls in TILE_CLASSES:
                    m = tiles.chosen_measured(kernel, d, DTYPES[dtype], tile_class=cls)
                    if m is None:
                        rows = tiles.measured(kernel, d, DTYPES[dtype])
                        exhausted = len(rows) == len(candidate_order(kernel, d)) and all(
                            r.failed(SM90_SHARED_LIMIT, cls) for r in rows)
                        cells += ["no spill-free candidate" if exhausted else "not finished", "", "", ""]
                        continue
                    s, r, sp = m.resources[cls]
                    t = m.tiles
                    cells += [f"{t.block_m}, {t.block_n}, {t.num_warps}, {t.num_stages}",
                              f"{s / 1024:.1f} KB", str(r), str(sp)]
                n = len(tiles.measured(kernel, d, DTYPES[dtype]))
                out.append(f"| {d} | {dtype} | {kernel} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--markdown"] or argv == ["--markdown"]:
        print(markdown())
        return 0
    if cache.interpret_mode():
        print("tile_search compiles for a GPU target: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    if offline.ptxas_path() is None:
        print("ptxas is not available: spills cannot be checked", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("tiles_sm90.py")))
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--dims", default=",".join(str(d) for d in D_CLASSES))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    args = p.parse_args(argv)
    t0 = time.time()
    measured = {}
    for dtype in args.dtypes.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            for kernel in args.kernels.split(","):
                measured[(kernel, d, dtype)] = search(kernel, d, dtype, log=lambda s: print(s, flush=True))
    Path(args.out).write_text(render(measured, time.time() - t0))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
