"""Specialise the template for one attention site and produce readable Triton source.

A ``Specialisation`` holds everything generation depends on (head dims, dtype, GQA group
size, block-skipping structure, the lowered mods and their extras' ranks/dtypes); its hash
names the cached module. Runtime values (offsets, lengths, strides, scale) are kernel
arguments and never part of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence

import torch

from ringcompile.mods import Mod

from . import head_split, template
from .head_split import pad_dim  # noqa: F401  (the padded width, kept importable from here)
from .lower_mods import LoweredMod, lower_mod
from .padding_bounds import padding_parts

CODEGEN_VERSION = "2"
# an edited template is a new specialisation even if nobody bumps the version
_TEMPLATE_TEXT = template.HEADER + template.FORWARD + template.BACKWARD_DKDV + template.BACKWARD_DQ
_TEMPLATE_HASH = hashlib.sha256(_TEMPLATE_TEXT.encode()).hexdigest()[:12]


def template_hash() -> str:
    """Hash of the kernel template text (the tile table records the one it was measured for)."""
    return _TEMPLATE_HASH


FP32_DOT_ENV = "RINGCOMPILE_FP32_DOT"
FP32_DOT_CHOICES = ("tf32", "tf32x3", "ieee")


def fp32_dot_precision() -> str:
    """``tl.dot`` precision for fp32 inputs: TF32 by default (what FlashAttention-style kernels and
    cuBLAS with TF32 enabled use); ``RINGCOMPILE_FP32_DOT=ieee`` (or ``tf32x3``) asks for more."""
    choice = os.environ.get(FP32_DOT_ENV, "tf32").strip().lower() or "tf32"
    if choice not in FP32_DOT_CHOICES:
        from ringcompile.errors import KernelError

        raise KernelError(f"{FP32_DOT_ENV}={choice!r} is not one of {', '.join(FP32_DOT_CHOICES)}")
    return choice


@dataclasses.dataclass(frozen=True)
class BlockSkip:
    """Mask structure that lets whole tiles be skipped: causal and/or a sliding window."""

    causal: bool = False
    window: int | None = None  # sliding window width (keys within `window` of the query)
    padding: bool = False  # an AND-ed key padding part: per-batch key bounds (padding_bounds.py)


def block_skip_for(mask: Mod | None) -> BlockSkip:
    """Structure promised by the mod's kind; anything else visits every tile (still correct)."""
    if mask is None:
        return BlockSkip()
    kinds = set(mask.kinds)
    causal = "causal" in kinds
    window = None
    if "sliding_window" in kinds and isinstance(mask.params.get("window"), int):
        window = int(mask.params["window"])
        causal = causal or bool(mask.params.get("causal", True))
    return BlockSkip(causal, window, bool(padding_parts(mask)))


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """What one generated module is specialised on (see module docstring)."""

    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    groups: int
    skip: BlockSkip
    mask_lines: tuple[str, ...]
    mask_result: str | None
    score_lines: tuple[str, ...]
    score_result: str | None
    extras_sig: tuple[tuple[str, int, str], ...]  # (prefix, ndim, dtype) per extra
    dot_upcast: bool = False  # bf16 tiles computed in fp32 (the interpreter's bf16 dot is broken)
    dropout: bool = False  # attention-probability dropout (hash of global indices, kernels/dropout.py)
    fp32_dot: str = "tf32"  # tl.dot input precision for fp32 inputs (see fp32_dot_precision)

    def key(self) -> str:
        # the head-dim pieces are policy (head_split.py), not template text: they join the key
        text = repr((CODEGEN_VERSION, _TEMPLATE_HASH, dataclasses.astuple(self),
                     head_split.pieces(self.head_dim), head_split.pieces(self.v_head_dim)))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def summary(self) -> str:
        return (f"head_dim={self.head_dim} v_head_dim={self.v_head_dim} dtype={str(self.dtype)[6:]} "
                f"groups={self.groups} causal={self.skip.causal} window={self.skip.window} "
                f"extras={[e[0] + ':' + str(e[1]) + 'd:' + e[2] for e in self.extras_sig]}")


@dataclasses.dataclass
class Generated:
    """A specialisation with its lowered mods and full source."""

    spec: Specialisation
    mask: LoweredMod | None
    score: LoweredMod | None
    source: str

    @property
    def key(self) -> str:
        return self.spec.key()

    def kernel_extras(self, mask_extras: Sequence[torch.Tensor], score_extras: Sequence[torch.Tensor]
                      ) -> list[torch.Tensor]:
        """The extra tensors in kernel-parameter order: each mod's own extras, then the tensors it
        closes over (their current values; raises LoweringError if one changed rank or dtype)."""
        out: list[torch.Tensor] = []
        for low, extras in ((self.mask, mask_extras), (self.score, score_extras)):
            out += list(extras)
            if low is not None:
                out += low.captured_now()
        return out


def specialise(
    mask: Mod | None, score: Mod | None, *, head_dim: int, v_head_dim: int, dtype: torch.dtype, groups: int,
    mask_extras: Sequence[torch.Tensor], score_extras: Sequence[torch.Tensor], interpret: bool = False,
    dropout: bool = False,
) -> Generated:
    """Lower the mods (raises LoweringError) and generate the module source."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    low_mask = lower_mod(mask, mask_extras, "mask", acc) if mask is not None else None
    low_score = lower_mod(score, score_extras, "score", acc, with_grad=True) if score is not None else None
    extras_sig = tuple(
        (e.prefix, e.ndim, str(e.dtype)[6:])
        for low in (low_mask, low_score) if low is not None for e in low.extras
    )
    spec = Specialisation(
        head_dim, v_head_dim, dtype, groups, block_skip_for(mask),
        tuple(low_mask.lines) if low_mask else (), low_mask.result if low_mask else None,
        tuple(low_score.lines + low_score.grad_lines + [ln for _, lines, e in low_score.extra_grads
                                                         for ln in (*lines, e)]) if low_score else (),
        low_score.result if low_score else None, extras_sig, interpret and dtype == torch.bfloat16, dropout,
        fp32_dot_precision() if dtype == torch.float32 else "ieee")
    return Generated(spec, low_mask, low_score, render(spec, low_mask, low_score))


# ---------------------------------------------------------------------------- rendering


PAD_LOAD = ["kv_lo = tl.load(kv_bounds_ptr + 2 * b)  # this batch row's kept keys: [kv_lo, kv_hi)",
            "kv_hi = tl.load(kv_bounds_ptr + 2 * b + 1)"]


def _kv_bounds(skip: BlockSkip) -> list[str]:
    lines = []
    if skip.padding:
        lines += [*PAD_LOAD, "kv_start = tl.maximum(kv_start, kv_lo - kv_offset)  # padded keys: not visited",
                  "kv_stop = tl.minimum(kv_stop, kv_hi - kv_offset)"]
    if skip.causal:
        lines.append("kv_stop = tl.minimum(kv_stop, q_last - kv_offset + 1)  # causal: keys <= last query")
    if skip.window is not None:
        w = skip.window
        lines.append(f"kv_start = tl.maximum(kv_start, q_first - {w - 1} - kv_offset)  # q - kv < {w}")
        if not skip.causal:
            lines.append(f"kv_stop = tl.minimum(kv_stop, q_last + {w} - kv_offset)  # kv - q < {w}")
    return lines


def _q_bounds(skip: BlockSkip) -> list[str]:
    lines = []
    if skip.padding:  # a kv tile this batch row pads fully: no query tile to visit
        lines.append("q_stop = tl.where((kv_first < kv_hi) & (kv_last >= kv_lo), q_stop, 0)")
    if skip.causal:
        lines.append("q_start = tl.maximum(q_start, kv_first - q_offset)  # causal: queries >= first key")
    if skip.window is not None:
        w = skip.window
        lines.append(f"q_stop = tl.minimum(q_stop, kv_last + {w} - q_offset)  # q - kv < {w}")
        if not skip.causal:
            lines.append(f"q_start = tl.maximum(q_start, kv_first - {w - 1} - q_offset)  # kv - q < {w}")
    return lines


def _comment(text: str) -> str:
    return "\n".join("#   " + line for line in text.splitlines())


def _extra_params(lows: Sequence[LoweredMod | None]) -> str:
    params = [p for low in lows if low is not None for e in low.extras for p in e.params()]
    return "".join(f"\n    {p}," for p in params)


def _grad_params(score: LoweredMod | None) -> str:
    if score is None:
        return ""
    params = []
    for e in score.extras:
        if e.dtype.is_floating_point and not e.captured:  # captured tensors get no gradient
            params += [f"{e.prefix}_grad_ptr", *[f"{e.prefix}_gstride{d}" for d in range(e.ndim)]]
    return "".join(f"{p},\n    " for p in params)


def _hoisted(axes: frozenset, hoist: bool = True) -> str | None:
    """The accumulator shape of an extra's gradient that the dQ kernel sums over its kv loop and
    adds once after it (loads indexed by batch/head/query only: their address is loop-invariant),
    or None when the load varies along kv (or ``hoist`` is off) and each tile adds its own part."""
    if not hoist:
        return None
    if axes == frozenset():
        return "[1, 1]"
    if axes == frozenset({"q"}):
        return "[BLOCK_M, 1]"
    return None


def hoist_extra_grads(dtype: torch.dtype) -> bool:
    """Whether the dQ kernel accumulates loop-invariant extra gradients over its kv loop (measured,
    BENCHMARKS.md): fp32 needs it for a spill-free tile at D=128/256; for 16-bit tiles the three
    loop-carried values (sum, address, mask) cost D=256 its best spill-free tile instead."""
    return dtype not in (torch.bfloat16, torch.float16)


def _extra_grad_init(score: LoweredMod | None, hoist: bool = True) -> list[str]:
    """Before the dQ kernel's kv loop: zero accumulators (and a masked-off address, for an empty loop)."""
    if score is None:
        return []
    lines: list[str] = []
    for load, _, _ in score.extra_grads:
        shape = _hoisted(load.axes, hoist)
        if shape is not None:
            g = f"g_{load.node_name}"
            prefix = score.extras[load.extra].prefix
            lines += [f"{g}_acc = tl.zeros({shape}, tl.float32)",
                      f"{g}_at = {prefix}_grad_ptr + tl.zeros({shape}, tl.int32)",
                      f"{g}_at_ok = tl.zeros({shape}, tl.int32) != 0"]
    return lines


def _extra_grad_lines(score: LoweredMod | None, hoist: bool = True) -> list[str]:
    """Per kv tile: d(loss)/d(looked-up extra value). Loop-invariant addresses accumulate in
    registers (one atomic add per program after the loop: an atomic per tile costs the fp32 dQ
    kernel its spill-free tiles); addresses that vary along kv are atomically added per tile."""
    if score is None:
        return []
    lines: list[str] = []
    for load, dlines, dexpr in score.extra_grads:
        prefix = score.extras[load.extra].prefix
        offs = " + ".join(f"({ix}) * {prefix}_gstride{d}" for d, ix in enumerate(load.indices))
        g = f"g_{load.node_name}"
        lines += [f"# gradient of {prefix} through `{load.node_name}`", *dlines,
                  f"{g} = tl.where(keep, ds * ({dexpr}), 0.0)",
                  f"{g}_ptr = {prefix}_grad_ptr + {offs}"]
        shape = _hoisted(load.axes, hoist)
        if shape is not None and load.axes == frozenset():
            lines += [f"{g}_acc += tl.sum(tl.sum({g}, 1)[:, None], 0)[None, :]"]
        elif shape is not None:
            lines += [f"{g}_acc += tl.sum({g}, 1)[:, None]"]
        elif load.axes == frozenset():
            lines.append(f"tl.atomic_add({g}_ptr, tl.sum(tl.sum({g}, 1)[:, None], 0)[None, :], "
                         f"mask={load.in_bounds})")
        elif load.axes == frozenset({"q"}):
            lines.append(f"tl.atomic_add({g}_ptr, tl.sum({g}, 1)[:, None], mask={load.in_bounds})")
        elif load.axes == frozenset({"kv"}):
            lines.append(f"tl.atomic_add({g}_ptr, tl.sum({g}, 0)[None, :], mask={load.in_bounds})")
        else:
            lines.append(f"{g}_full = {g}_ptr + tl.zeros([BLOCK_M, BLOCK_N], tl.int32)")
            lines.append(f"tl.atomic_add({g}_full, {g}, mask={load.in_bounds} & keep)")
        if shape is not None:
            lines += [f"{g}_at = {g}_ptr + tl.zeros({shape}, tl.int32)",
                      f"{g}_at_ok = ({load.in_bounds}) & (tl.zeros({shape}, tl.int32) == 0)"]
    return lines


def _extra_grad_flush(score: LoweredMod | None, hoist: bool = True) -> list[str]:
    """After the dQ kernel's kv loop: one atomic add per hoisted accumulator."""
    if score is None:
        return []
    return [f"tl.atomic_add(g_{load.node_name}_at, g_{load.node_name}_acc, mask=g_{load.node_name}_at_ok)"
            for load, _, _ in score.extra_grads if _hoisted(load.axes, hoist) is not None]


def _indent_or_empty(lines: list[str], spaces: int) -> str:
    """Lines for a hole that sits on a line of its own: nothing at all when there are none."""
    return "".join(" " * spaces + line + "\n" for line in lines)


def _dscore_lines(score: LoweredMod | None) -> list[str]:
    if score is None or score.d_score is None:
        return []
    return ["# chain rule through the score mod: ds_raw = ds_mod * d(score_mod)/d(score)",
            *score.grad_lines, f"ds = tl.where(keep, ds * ({score.d_score}), 0.0)"]


def _drop_dp(dropout: bool, spaces: int) -> str:
    """dP of the undropped probabilities: the dropped entries' gradient is zero, kept ones scale."""
    return f"\n{' ' * spaces}dp = tl.where(drop_keep, dp * drop_scale, 0.0)" if dropout else ""


def _drop_lines(dropout: bool) -> list[str]:
    return template.DROPOUT_KEEP.splitlines() if dropout else ["p_v = p"]


_TL_TILE = {torch.float32: "tl.float32", torch.float64: "tl.float64", torch.float16: "tl.float16",
            torch.bfloat16: "tl.bfloat16"}


def render(spec: Specialisation, mask: LoweredMod | None, score: LoweredMod | None) -> str:
    """The module source: header constants plus the forward and both backward kernels."""
    if spec.dtype == torch.float64 or spec.dot_upcast:
        dot_args = ', input_precision="ieee"'
    elif spec.dtype == torch.float32:
        dot_args = f', input_precision="{spec.fp32_dot}"'
    else:
        dot_args = ""
    exact = spec.dtype == torch.float64
    # head dims as column pieces (head_split.py): the template's head-dim statements, once per piece
    dims = {"d": head_split.pieces(spec.head_dim), "dv": head_split.pieces(spec.v_head_dim)}
    hoist = hoist_extra_grads(spec.dtype)
    tile_cast = (".to(tl.bfloat16).to(tl.float32)" if spec.dot_upcast  # bf16 rounding, fp32 interpreter dot
                 else f".to({_TL_TILE[spec.dtype]})")
    keep = f" & {mask.result}" if mask is not None else ""
    holes = {
        "VERSION": CODEGEN_VERSION,
        "SPEC": spec.summary(),
        "MASK_ORIGIN": _comment(mask.origin) if mask else "#   none",
        "SCORE_ORIGIN": _comment(score.origin) if score else "#   none",
        "HEAD_DIMS": "\n".join(head_split.header_lines(dims, {"d": spec.head_dim, "dv": spec.v_head_dim})),
        "HEAD_OFFS": _indent_or_empty(head_split.offset_lines(dims), 4),
        "GROUPS": str(spec.groups),
        "ACC": "tl.float64" if spec.dtype == torch.float64 else "tl.float32",
        "DOT_ARGS": dot_args,
        "TILE_CAST": tile_cast,
        "LOG2E": "1.0" if exact else "1.4426950408889634", "LN2": "1.0" if exact else "0.6931471805599453",
        "EXP": "tl.exp" if exact else "tl.exp2", "LOG": "tl.log" if exact else "tl.log2",
        # log2(e) joins the QK scale unless a score mod must see natural-log scores (then it follows the mod)
        "QK_SCALE": "sm_scale" if score or exact else "(sm_scale * LOG2E)",
        "SCORE_LOG2": (f"{score.result} * LOG2E" if not exact else score.result) if score else "score",
        "LOAD_CAST": ".to(tl.float32)" if spec.dot_upcast else "",
        # the key bounds (before the mods' extras) when a key padding part is AND-ed in
        "EXTRA_PARAMS": ("\n    kv_bounds_ptr," if spec.skip.padding else "") + _extra_params([mask, score]),
        "GRAD_PARAMS": _grad_params(score),
        "KV_BOUNDS": template.indent(_kv_bounds(spec.skip), 4),
        "Q_BOUNDS": template.indent(_q_bounds(spec.skip), 4),
        "SCORE_LINES": template.indent(["# score mod", *score.lines] if score else [], 8),
        "MASK_LINES": template.indent(["# mask mod", *mask.lines] if mask else [], 8),
        "SCORE_LINES2": template.indent(["# score mod", *score.lines] if score else [], 12),
        "MASK_LINES2": template.indent(["# mask mod", *mask.lines] if mask else [], 12),
        "KEEP": keep,
        "DSCORE_LINES": template.indent(_dscore_lines(score), 8),
        "DSCORE_LINES2": template.indent(_dscore_lines(score), 12),
        "EXTRA_GRAD_INIT": _indent_or_empty(_extra_grad_init(score, hoist), 4),
        "EXTRA_GRAD_LINES": template.indent(_extra_grad_lines(score, hoist), 8),
        "EXTRA_GRAD_FLUSH": _indent_or_empty(_extra_grad_flush(score, hoist), 4),
        "PAD_INIT": _indent_or_empty(PAD_LOAD if spec.skip.padding else [], 4),
        "KV_COL_LO": " & (cols >= kv_lo - kv_offset)" if spec.skip.padding else "",
        "KV_COL_PAD": (" & (kv_offset + offs_n >= kv_lo) & (kv_offset + offs_n < kv_hi)"
                       if spec.skip.padding else ""),
        "DROP_PARAMS": ("\n    drop_seed_ptr, drop_head_offset, drop_threshold, drop_scale,"
                        if spec.dropout else ""),
        "DROP_INIT": "    drop_row_base = seed_row_base(drop_seed_ptr)\n" if spec.dropout else "",
        "DROP_HELPERS": template.DROPOUT_HELPERS if spec.dropout else "",
        "DROP_FWD": template.indent(_drop_lines(spec.dropout), 8),
        "DROP_BWD": template.indent(_drop_lines(spec.dropout), 8),
        "DROP_BWD2": template.indent(_drop_lines(spec.dropout), 12),
        "DROP_DP": _drop_dp(spec.dropout, 8),
        "DROP_DP2": _drop_dp(spec.dropout, 12),
    }
    source = "".join(template.fill(head_split.expand(part, dims), holes) for part in
                     (template.HEADER, template.FORWARD, template.BACKWARD_DKDV, template.BACKWARD_DQ))
    return source + f"\n\n# which row of the measured tile table launches use (kernels/triton/tiles.py)\n" \
        f"TILE_CLASS = {tile_class(spec)!r}\n"


def tile_class(spec: Specialisation) -> str:
    """"plain" when the kernels carry no extra loads, score mod or dropout (tiles.TILE_CLASSES)."""
    heavy = spec.extras_sig or spec.score_result or spec.score_lines or spec.dropout
    return "heavy" if heavy else "plain"
