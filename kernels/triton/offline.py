"""Compile generated kernels for a GPU target without a GPU: a CI check that the source is
valid for Triton's real compiler (the interpreter accepts some programs the compiler rejects).
"""

from __future__ import annotations

import types

from .launch import Tiles

KERNELS = ("block_fwd", "block_bwd_dkdv", "block_bwd_dq")
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
        elif name.endswith("_ptr"):
            sig[name] = extra_dtypes.get(name.removesuffix("_ptr"), "*fp32")
        elif name[0].isupper():
            sig[name] = "*fp32"  # Out, Lse, Delta, DQ, DK, DV: fp32 accumulators
        elif name in ("sm_scale", "drop_scale"):
            sig[name] = "fp32"
        elif name == "drop_row_base":
            sig[name] = "i64"  # a 32-bit hash value: Triton passes values >= 2**31 as i64
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
