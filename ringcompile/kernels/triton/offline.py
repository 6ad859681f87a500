"""Compile generated kernels for a GPU target without a GPU: a CI check that the source is
valid for Triton's real compiler (the interpreter accepts some programs the compiler rejects).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types

from .tiles import Tiles

KERNELS = ("block_fwd", "block_bwd_dkdv", "block_bwd_dq")
KERNEL_NAMES = {"fwd": "block_fwd", "dkdv": "block_bwd_dkdv", "dq": "block_bwd_dq"}
TILE_ARGS = ("Q", "K", "V", "DO")
DEFAULT_TILES = Tiles(64, 64, 4, 2)


def signature(fn, dtype: str, extra_dtypes: dict[str, str]) -> dict[str, str]:
    """Triton signature strings for a generated kernel's parameters (tiles in ``dtype``)."""
    sig: dict[str, str] = {}
    for name in fn.arg_names:
        if name in ("BLOCK_M", "BLOCK_N"):
            sig[name] = "constexpr"
        elif name in TILE_ARGS:
            sig[name] = f"*{dtype}"
        elif name == "kv_bounds_ptr":
            sig[name] = "*i32"  # per-batch kept-key bounds (padding_bounds.py)
        elif name == "drop_seed_ptr":
            sig[name] = "*i64"  # the op's seed tensor, read by the kernel
        elif name.endswith("_ptr"):
            sig[name] = extra_dtypes.get(name.removesuffix("_ptr"), "*fp32")
        elif name[0].isupper():
            sig[name] = "*fp32"  # Out, Lse, Delta, DQ, DK, DV: fp32 accumulators
        elif name in ("sm_scale", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_module(module: types.ModuleType, *, dtype: str = "bf16", capability: int = 90,
                   tiles: Tiles = DEFAULT_TILES, extra_dtypes: dict[str, str] | None = None) -> dict:
    """Compile every kernel of a generated module to a cubin for ``cuda:capability``.

    Returns {kernel name: compiled kernel}; raises triton's CompilationError on invalid source.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    out = {}
    for name in KERNELS:
        fn = getattr(module, name)
        sig = signature(fn, dtype, extra_dtypes or {})
        names = list(fn.arg_names)
        consts = {(names.index("BLOCK_M"),): tiles.block_m, (names.index("BLOCK_N"),): tiles.block_n}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        out[name] = triton.compile(src, target=target, options={"num_warps": tiles.num_warps,
                                                                "num_stages": tiles.num_stages})
    return out


@dataclasses.dataclass(frozen=True)
class Resources:
    """What the compiler reports for one kernel at one tile choice."""

    shared: int  # bytes of shared memory per block (``metadata.shared``)
    registers: int | None  # per thread (ptxas), None without ptxas
    spill_bytes: int | None  # spill stores + loads (ptxas), None without ptxas


def ptxas_path(capability: int = 90) -> str | None:
    """The ptxas Triton uses for ``capability`` (the API differs across Triton 3.x), or None."""
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError:
        return None
    tool = None
    try:
        tool = nv.get_ptxas(capability)  # triton >= 3.7: a knob per architecture
    except TypeError:
        tool = nv.get_ptxas()  # triton 3.6
    except Exception:
        tool = None
    path = getattr(tool, "path", tool)
    if isinstance(path, str) and os.path.exists(path):
        return path
    return shutil.which("ptxas")


def ptxas_version(capability: int = 90) -> str | None:
    """``ptxas --version``'s release line, or None without ptxas."""
    path = ptxas_path(capability)
    if path is None:
        return None
    run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    m = re.search(r"release ([\d.]+), (V[\d.]+)", run.stdout)
    return f"{m.group(1)} ({m.group(2)}, {os.path.basename(path)})" if m else None


def ptxas_report(ptx: str, capability: int = 90) -> tuple[int, int] | None:
    """(registers, spill bytes) from ``ptxas -v`` on the PTX, or None when ptxas is unavailable."""
    path = ptxas_path(capability)
    if path is None:
        return None
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    # ptxas takes seconds on a big kernel: its verdict is kept per (PTX, ptxas, arch) on disk
    from .cache import cache_dir

    key = hashlib.sha256(f"{path}\0{os.path.getmtime(path)}\0{arch}\0{ptx}".encode()).hexdigest()[:32]
    memo = cache_dir() / "ptxas" / f"{key}.txt"
    if memo.exists():
        regs_text, _, spill_text = memo.read_text().partition(" ")
        return int(regs_text), int(spill_text)
    report = _run_ptxas(path, arch, ptx)
    if report is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(f"{report[0]} {report[1]}")
    return report


def _run_ptxas(path: str, arch: str, ptx: str) -> tuple[int, int] | None:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([path, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        return None  # e.g. a ptxas older than the PTX version: no report rather than a wrong one
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    return (int(regs.group(1)) if regs else 0, int(spills.group(1)) + int(spills.group(2)) if spills else 0)


def resources(module: types.ModuleType, kernel: str, *, dtype: str = "bf16", capability: int = 90,
              tiles: Tiles = DEFAULT_TILES, extra_dtypes: dict[str, str] | None = None) -> Resources:
    """Compile one kernel (``fwd``/``dkdv``/``dq``) offline and report its shared memory and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(module, KERNEL_NAMES.get(kernel, kernel))
    names = list(fn.arg_names)
    consts = {(names.index("BLOCK_M"),): tiles.block_m, (names.index("BLOCK_N"),): tiles.block_n}
    src = ASTSource(fn=fn, signature=signature(fn, dtype, extra_dtypes or {}), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    shared = int(getattr(compiled.metadata, "shared", 0))
    report = ptxas_report(compiled.asm["ptx"], capability) if "ptx" in compiled.asm else None
    return Resources(shared, *(report if report is not None else (None, None)))
