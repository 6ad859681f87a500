"""Python side of the generated kernels: the ``block_forward`` / ``block_backward`` contract.

``TritonBlocks.forward`` and ``.backward`` take exactly the arguments of
``kernels.reference.block_forward`` / ``block_backward``; they pick (or generate) the module
for the call's specialisation, compute strides and grids, and launch. When a call cannot run
as a kernel (a mod whose real extras cannot be lowered, CPU tensors without
TRITON_INTERPRET=1) the reference block path runs instead, with the reason logged once,
unless the kernels were forced, in which case ``KernelError`` says what to change.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ringcompile.errors import KernelError, ShapeMismatchError
from ringcompile.log import get_logger
from ringcompile.mods import Mod

from .. import reference
from . import cache
from .codegen import Generated, specialise
from .lower_mods import LoweringError
from .padding_bounds import kv_bounds, padding_parts
from .tiles import Tiles, candidates

if TYPE_CHECKING:
    from ..dropout import Seed

log = get_logger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# The Triton interpreter patches triton.language globally while a kernel runs, so interpreted
# launches from several threads (the simulated ring runs ranks as threads) take turns.
_INTERPRETER_LOCK = threading.RLock()


# Lowered + rendered specialisations (or why not) by call signature, shared by every site.
_GENERATED: dict[tuple, Generated | str] = {}
_GENERATED_LOCK = threading.Lock()


def _serialised(q: torch.Tensor):
    return _INTERPRETER_LOCK if q.device.type == "cpu" else contextlib.nullcontext()


INTERPRET_TILES = Tiles(16, 16, 1, 1)


def planner_tiles(spec_tiles: Any) -> Tiles | None:
    """Tiles from the planner (``AttentionSpec.tiles``: a Tiles, a mapping or an object)."""
    if spec_tiles is None:
        return None
    if isinstance(spec_tiles, Tiles):
        return spec_tiles

    def get(*names: str, default: int | None = None) -> int | None:
        for n in names:
            if isinstance(spec_tiles, Mapping) and n in spec_tiles:
                return int(spec_tiles[n])
            if hasattr(spec_tiles, n):
                return int(getattr(spec_tiles, n))
        return default

    m, n = get("block_m", "BLOCK_M"), get("block_n", "BLOCK_N")
    if m is None or n is None:
        return None
    return Tiles(m, n, get("num_warps", default=4), get("num_stages", default=2))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _extra_args(extras: Sequence[torch.Tensor], device: torch.device) -> list[Any]:
    args: list[Any] = []
    for e in extras:
        e = e.to(device)
        if e.dtype == torch.bool:
            e = e.view(torch.uint8)  # bool extras travel as bytes; the kernel compares with 0
        args += [e, *e.shape, *e.stride()]
    return args


def _padding_args(mask: Mod | None, mask_extras: Sequence[torch.Tensor], batch: int, kv_offset: int,
                  kv_len: int, seq_len: int, device: torch.device) -> list[Any]:
    """The kernels' per-batch key bounds when the mask has a key padding part (padding_bounds.py)."""
    if not padding_parts(mask):
        return []
    return [kv_bounds(mask, mask_extras, batch, kv_offset, kv_len, seq_len, device)]


class TritonBlocks:
    """Generated-kernel block functions for one site (see module docstring)."""

    def __init__(self, forced: bool, tiles: Tiles | None = None, name: str = ""):
        self.forced = forced
        self.tiles = tiles
        self.name = name
        self._chosen: dict[tuple, Tiles] = {}  # per kernel and shape class: the tiles that launched
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ selection

    def generated(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mod | None,
                  score: Mod | None, mask_extras: Sequence[torch.Tensor],
                  score_extras: Sequence[torch.Tensor], dropout: bool = False) -> Generated:
        """The specialisation for this call (raises LoweringError, remembered per signature)."""
        sig = (q.shape[-1], v.shape[-1], q.dtype, q.shape[1] // k.shape[1], mask, score,
               cache.interpret_mode(), dropout,
               tuple((e.dim(), e.dtype) for e in mask_extras),
               tuple((e.dim(), e.dtype) for e in score_extras))
        with _GENERATED_LOCK:
            hit = _GENERATED.get(sig)
            if hit is None:
                try:
                    hit = specialise(mask, score, head_dim=q.shape[-1], v_head_dim=v.shape[-1], dtype=q.dtype,
                                     groups=q.shape[1] // k.shape[1], mask_extras=mask_extras,
                                     score_extras=score_extras, interpret=cache.interpret_mode(),
                                     dropout=dropout)
                except LoweringError as exc:
                    hit = str(exc)
                _GENERATED[sig] = hit
        if isinstance(hit, str):
            raise LoweringError(hit)
        return hit

    def _cannot_run(self, q: torch.Tensor) -> tuple[str | None, bool]:
        """(why the kernels cannot run this call, whether that is an error even when forced)."""
        if q.dtype not in SUPPORTED_DTYPES:
            return f"dtype {q.dtype} is not supported by the Triton kernels", True
        if q.device.type == "cpu" and not cache.interpret_mode():
            return ("Triton kernels need CUDA tensors; to run them on CPU tensors set TRITON_INTERPRET=1 "
                    "in the environment before starting Python"), True
        if q.device.type == "cpu" and not cache.interpreter_ready():
            return ("TRITON_INTERPRET=1 was set after Triton was imported (torch.compile and torch._dynamo "
                    "import it); set it in the environment before starting Python"), True
        if q.dtype == torch.float64 and q.device.type != "cpu":
            # float64 tl.dot is not available on every GPU/Triton pair; exactness matters more here
            return "float64 inputs run on the PyTorch block path on GPUs", False
        return None, True

    def _module(self, q, k, v, mask, score, mask_extras, score_extras, dropout=False):
        """(kernel module, its extra tensors in parameter order: the mods' extras and the tensors they
        close over), or (None, None) after logging why the reference path runs instead."""
        reason, hard = self._cannot_run(q)
        gen = None
        if reason is None:
            try:
                gen = self.generated(q, k, v, mask, score, mask_extras, score_extras, dropout)
                kernel_extras = gen.kernel_extras(mask_extras, score_extras)
            except LoweringError as exc:
                reason = str(exc)
        if reason is not None:
            if self.forced and hard:
                raise KernelError(f"kernel='triton' was requested but cannot run: {reason}")
            if reason not in self._warned:
                self._warned.add(reason)
                log.info("site %s: running the PyTorch block path instead of Triton: %s", self.name, reason)
            return None, None
        return cache.load(gen.key, gen.source), kernel_extras

    def _launch_opts(self, q: torch.Tensor, tiles: Tiles) -> dict[str, int]:
        opts = {"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n}
        if q.device.type != "cpu":
            opts.update(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        return opts

    # ------------------------------------------------------------------ forward

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, q_offset: int = 0,
        kv_offset: int = 0, seq_len: int | None = None, mask: Mod | None = None, score: Mod | None = None,
        mask_extras: Sequence[torch.Tensor] = (), score_extras: Sequence[torch.Tensor] = (),
        dropout_p: float = 0.0, dropout_seed: Seed | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of one block pair, fp32 (fp64 for fp64 inputs); see reference.block_forward."""
        _check_shapes(q, k, v)
        drop = _dropout_args(dropout_p, dropout_seed, q.device)
        module, kernel_extras = self._module(q, k, v, mask, score, mask_extras, score_extras, bool(drop))
        if module is None:
            return blocked_reference_forward(q, k, v, scale=scale, q_offset=q_offset, kv_offset=kv_offset,
                                             seq_len=seq_len, mask=mask, score=score, mask_extras=mask_extras,
                                             score_extras=score_extras, dropout_p=dropout_p,
                                             dropout_seed=dropout_seed)
        k, v = k.to(q.dtype), v.to(q.dtype)
        B, Hq, Sq, _ = q.shape
        Sk = k.shape[2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.empty(B, Hq, Sq, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.empty(B, Hq, Sq, dtype=acc, device=q.device)
        if out.numel() == 0 or lse.numel() == 0:
            return out.zero_(), lse.fill_(float("-inf"))
        seq = int(seq_len) if seq_len is not None else int(kv_offset) + Sk
        extras = _padding_args(mask, mask_extras, B, int(kv_offset), Sk, seq, q.device) \
            + _extra_args(kernel_extras, q.device)

        def run(tiles: Tiles) -> None:
            grid = (_cdiv(Sq, tiles.block_m), B * Hq)
            module.block_fwd[grid](
                q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                Hq, Sq, Sk, int(q_offset), int(kv_offset), seq, float(scale), *drop, *extras,
                **self._launch_opts(q, tiles))

        with _serialised(q):
            self._launch("fwd", q, k, run, tune=True, tile_class=getattr(module, "TILE_CLASS", "heavy"))
        return out, lse

    def _launch(self, kernel: str, q: torch.Tensor, k: torch.Tensor, run, tune: bool = False,
                tile_class: str = "heavy") -> None:
        """Run ``kernel`` with its tiles: the interpreter's small tiles on CPU; on a GPU the kernel's
        own candidates (``tiles.candidates``; the planner's tiles lead for the forward only), the
        first that the device accepts, retrying smaller ones on Triton's OutOfResources."""
        if q.device.type == "cpu":
            run(self.tiles or INTERPRET_TILES)
            return
        key = (kernel, tile_class, q.shape[-1], q.dtype, q.shape[2] // 1024, k.shape[2] // 1024)
        known = self._chosen.get(key)
        if known is not None:
            run(known)
            return
        cands = candidates(kernel, q.shape[-1], q.dtype, self.tiles if kernel == "fwd" else None,
                           tile_class=tile_class)
        if tune and q.dtype in (torch.bfloat16, torch.float16) and self.tiles is None:
            cands = (_autotune(run, cands), *cands)
        too_big = _out_of_resources_error()
        for i, tiles in enumerate(cands):
            try:
                run(tiles)
            except too_big as exc:
                if i == len(cands) - 1:
                    raise KernelError(f"site {self.name}: no tile choice of the {kernel} kernel fits this "
                                      f"GPU (last tried {tiles}): {exc}") from exc
                log.info("site %s: %s kernel tiles %s do not fit (%s); trying smaller ones", self.name,
                         kernel, tiles, exc)
                continue
            self._chosen[key] = tiles
            log.info("site %s: %s kernel tiles %s", self.name, kernel, tiles)
            return

    # ------------------------------------------------------------------ backward

    def backward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
        lse: torch.Tensor, *, scale: float, q_offset: int = 0, kv_offset: int = 0, seq_len: int | None = None,
        mask: Mod | None = None, score: Mod | None = None, mask_extras: Sequence[torch.Tensor] = (),
        score_extras: Sequence[torch.Tensor] = (), delta: torch.Tensor | None = None,
        dropout_p: float = 0.0, dropout_seed: Seed | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """(dq, dk, dv, d_score_extras) of one block pair; see reference.block_backward."""
        _check_shapes(q, k, v)
        drop = _dropout_args(dropout_p, dropout_seed, q.device)
        module, kernel_extras = self._module(q, k, v, mask, score, mask_extras, score_extras, bool(drop))
        if module is None:
            return blocked_reference_backward(
                q, k, v, out, dout, lse, scale=scale, q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len,
                mask=mask, score=score, mask_extras=mask_extras, score_extras=score_extras, delta=delta,
                dropout_p=dropout_p, dropout_seed=dropout_seed)
        k, v = k.to(q.dtype), v.to(q.dtype)
        B, Hq, Sq, D = q.shape
        Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(B, Hq, Sq, D, dtype=acc, device=q.device)
        dk = torch.zeros(B, Hkv, Sk, D, dtype=acc, device=q.device)
        dv = torch.zeros(B, Hkv, Sk, Dv, dtype=acc, device=q.device)
        d_extras: list[torch.Tensor | None] = [
            torch.zeros(e.shape, dtype=acc, device=q.device) if e.is_floating_point() else None
            for e in score_extras]
        if q.numel() == 0 or k.numel() == 0:
            return dq, dk, dv, d_extras
        if delta is None:
            delta = (dout.to(acc) * out.to(acc)).sum(-1)
        delta = delta.to(device=q.device, dtype=acc).contiguous()
        lse = lse.to(acc).contiguous()
        dout = dout.to(q.dtype)
        seq = int(seq_len) if seq_len is not None else int(kv_offset) + Sk
        extras = _padding_args(mask, mask_extras, B, int(kv_offset), Sk, seq, q.device) \
            + _extra_args(kernel_extras, q.device)
        grads: list[Any] = []
        for g in d_extras:
            if g is not None:
                grads += [g, *g.stride()]
        common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
        runtime = (Sq, Sk, int(q_offset), int(kv_offset), seq, float(scale), *drop)

        def run_dkdv(tiles: Tiles) -> None:
            module.block_bwd_dkdv[(_cdiv(Sk, tiles.block_n), B * Hkv)](
                q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), Hkv, *runtime,
                *extras, **self._launch_opts(q, tiles))

        def run_dq(tiles: Tiles) -> None:
            module.block_bwd_dq[(_cdiv(Sq, tiles.block_m), B * Hq)](
                q, k, v, dout, lse, delta, dq, *common, *dq.stride(), Hq, *runtime, *extras, *grads,
                **self._launch_opts(q, tiles))

        with _serialised(q):
            self._launch("dkdv", q, k, run_dkdv, tile_class=getattr(module, "TILE_CLASS", "heavy"))
            self._launch("dq", q, k, run_dq, tile_class=getattr(module, "TILE_CLASS", "heavy"))
        return dq, dk, dv, d_extras


# ---------------------------------------------------------------------- fallback for whole chunks

FALLBACK_BLOCK = 512  # tokens per reference block pair when a call cannot run as a kernel


def _fallback_pairs(q: torch.Tensor, k: torch.Tensor, q_offset: int, kv_offset: int, seq_len: int | None,
                    mask: Mod | None):
    """(query slice, key slice) of the reference pairs to compute, skipping pairs past ``seq_len``
    and, for masks with a causal part, pairs wholly above the diagonal."""
    causal = mask is not None and "causal" in mask.kinds
    for qs in range(0, q.shape[2], FALLBACK_BLOCK):
        qe = min(qs + FALLBACK_BLOCK, q.shape[2])
        for ks in range(0, k.shape[2], FALLBACK_BLOCK):
            k0 = kv_offset + ks
            if (seq_len is not None and k0 >= seq_len) or (causal and k0 > q_offset + qe - 1):
                continue
            yield slice(qs, qe), slice(ks, min(ks + FALLBACK_BLOCK, k.shape[2]))


def _seed_read_once(kw: dict) -> dict:
    """``kw`` with a dropout seed tensor read into an int once, not once per reference pair (each read
    waits for the device); a head offset stays beside it."""
    if kw.get("dropout_p", 0) > 0 and kw.get("dropout_seed") is not None:
        from .. import dropout

        return {**kw, "dropout_seed": dropout.seed_to_int(kw["dropout_seed"])}
    return kw


def blocked_reference_forward(q, k, v, *, q_offset: int = 0, kv_offset: int = 0, seq_len=None, mask=None,
                              **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.block_forward`` a ``FALLBACK_BLOCK`` pair at a time: the runtime hands these
    kernels whole chunks, which the reference math would materialise as one S x S score block."""
    if q.shape[2] <= FALLBACK_BLOCK and k.shape[2] <= FALLBACK_BLOCK:
        return reference.block_forward(q, k, v, q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len,
                                       mask=mask, **kw)
    kw = _seed_read_once(kw)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for r, c in _fallback_pairs(q, k, q_offset, kv_offset, seq_len, mask):
        o, s = reference.block_forward(q[:, :, r], k[:, :, c], v[:, :, c], q_offset=q_offset + r.start,
                                       kv_offset=kv_offset + c.start, seq_len=seq_len, mask=mask, **kw)
        merged = reference.merge_partials(out[:, :, r], lse[:, :, r], o.to(acc), s.to(acc))
        out[:, :, r], lse[:, :, r] = merged
    return out, lse


def blocked_reference_backward(q, k, v, out, dout, lse, *, q_offset: int = 0, kv_offset: int = 0,
                               seq_len=None, mask=None, score_extras=(), delta=None, **kw):
    """``reference.block_backward`` a ``FALLBACK_BLOCK`` pair at a time (see the forward)."""
    if q.shape[2] <= FALLBACK_BLOCK and k.shape[2] <= FALLBACK_BLOCK:
        return reference.block_backward(q, k, v, out, dout, lse, q_offset=q_offset, kv_offset=kv_offset,
                                        seq_len=seq_len, mask=mask, score_extras=score_extras, delta=delta,
                                        **kw)
    kw = _seed_read_once(kw)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if delta is None:
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=q.device) for x in (q, k, v))
    d_extras: list[torch.Tensor | None] = [None] * len(score_extras)
    for r, c in _fallback_pairs(q, k, q_offset, kv_offset, seq_len, mask):
        g = reference.block_backward(q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r], dout[:, :, r],
                                     lse[:, :, r], q_offset=q_offset + r.start, kv_offset=kv_offset + c.start,
                                     seq_len=seq_len, mask=mask, score_extras=score_extras,
                                     delta=delta[:, :, r], **kw)
        dq[:, :, r] += g[0]
        dk[:, :, c] += g[1]
        dv[:, :, c] += g[2]
        reference.add_extra_grads(d_extras, g[3])
    return dq, dk, dv, d_extras


def _out_of_resources_error() -> type[BaseException]:
    """Triton's OutOfResources (raised at launch when a compiled kernel needs more shared memory
    or registers than the device has); its module moved across Triton versions."""
    for path in ("triton.runtime.errors", "triton.runtime.autotuner", "triton.compiler.errors"):
        try:
            module = __import__(path, fromlist=["OutOfResources"])
            return module.OutOfResources
        except (ImportError, AttributeError):
            continue
    return type("NeverRaised", (Exception,), {})


def _dropout_args(p: float, seed: Seed | None, device: torch.device) -> tuple:
    """Kernel arguments (seed tensor, head offset, threshold, 1/(1-p)) for dropout, or () without it.

    The kernel reads the seed itself (``seed_row_base``): the op's seed tensor goes in as a pointer,
    so a launch never waits for the device (issue 16.6); an int seed becomes a device tensor once
    per (device, value)."""
    if not p or p <= 0:
        return ()
    from .. import dropout

    dropout.check_dropout(p, seed)
    h0 = dropout.head_offset(seed)  # a head group's first global head (ulysses, hybrid), else 0
    seed = dropout.base_seed(seed)  # the seed as given: an int or the op's tensor (not read here)
    if isinstance(seed, torch.Tensor):
        if seed.numel() == 0 or seed.is_floating_point() or seed.is_complex():
            raise KernelError(f"dropout_seed must be an integer tensor with one element, got {seed.dtype} "
                              f"of shape {tuple(seed.shape)}")
        first = seed.reshape(-1)[:1]
        if first.device != device or first.dtype != torch.int64:
            first = first.to(device=device, dtype=torch.int64)  # a device-side copy, no host read
        return (first, h0, dropout.threshold(p), 1.0 / (1.0 - p))
    return (_seed_tensor(int(seed), device), h0, dropout.threshold(p), 1.0 / (1.0 - p))


@functools.lru_cache(maxsize=64)
def _seed_tensor(seed: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([seed], dtype=torch.int64, device=device)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeMismatchError(f"block kernels take (B, H, S, D) tensors, got {tuple(q.shape)}, "
                                 f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ShapeMismatchError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ShapeMismatchError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")


def _autotune(run, candidates: Sequence[Tiles]) -> Tiles:
    """The fastest candidate by triton.testing.do_bench (GPU only; failures are skipped)."""
    from triton.testing import do_bench

    best, best_ms = candidates[0], float("inf")
    for tiles in candidates:
        try:
            ms = do_bench(lambda t=tiles: run(t), warmup=5, rep=20)
        except Exception as exc:  # e.g. out of shared memory for this tile shape
            log.debug("tiles %s failed: %s", tiles, exc)
            continue
        if ms < best_ms:
            best, best_ms = tiles, ms
    return best
