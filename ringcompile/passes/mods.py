"""Extract scale, mask and score modifications from an attention's score chain.

Discovery hands us the raw ``q @ k^T`` node and the node fed to softmax (or an SDPA
``attn_mask``). Everything between is lifted into index functions (see ``index_lift``):
the constant factor at the head of the chain becomes the scale, the parts that set scores
to -inf / finfo.min (masked_fill, where, additive 0/-inf masks) become one keep-mask Mod,
and the rest (biases, ALiBi, softcap) becomes one score Mod. Mods are FX graphs over
global indices, so they stay correct on any shard and the S x S mask is never rebuilt.
Classification (``classify_mods``) proves "causal"/"sliding_window" before claiming it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ringcompile.errors import UnsupportedPatternError
from ringcompile.log import get_logger
from ringcompile.mods import Mod, index_grid
from ringcompile.spec import DeadRowForm

from .aten import CASTS, IDENTITY, RESHAPES, reads_only_metadata
from .classify_mods import (
    Bool,
    MaskClass,
    classify_bias,
    classify_keep,
    exp_underflow_limit,
    masking_margin,
    masks_exactly,
    to_sympy,
)
from .index_lift import (
    POINTWISE,
    SHAPE_ONLY,
    Expr,
    IndexLifter,
    ModGraphBuilder,
    NotLiftable,
    bcast_idx,
    creation_value,
    dtype_of,
    is_huge_negative,
    is_one,
    packet_of,
    real_constant,
    shape_of,
    static_number,
    tensor_val,
    toeplitz_band,
)

log = get_logger(__name__)
aten = torch.ops.aten

FINFO_NOTE = ("scores are masked with a large finite negative constant (finfo.min or similar): rows with "
              "every key masked return 0 here, where eager returns uniform weights")
DEAD_ROWS_NOTE = ("scores are masked with a large finite negative constant (finfo.min or similar): rows with "
                  "every key masked are recomputed with the constant as an exact score term")
BIAS_NOTE = ("a finite negative constant ({c:g}) is kept as an exact score bias, not a mask: with scores "
             "bounded only by |s| <= {bound:.3g} it does not provably underflow exp() in {dtype} "
             "(needs c + {k}*bound < {limit:.2f})")


@dataclasses.dataclass
class ExtractedMods:
    """What the score chain / attn_mask means, ready for AttentionSpec and the rewrite."""

    scale: float | None = None
    mask: Mod | None = None
    score: Mod | None = None
    mask_extras: list[fx.Node] = dataclasses.field(default_factory=list)
    score_extras: list[fx.Node] = dataclasses.field(default_factory=list)
    consumed: set[fx.Node] = dataclasses.field(default_factory=set)
    notes: list[str] = dataclasses.field(default_factory=list)
    claims: list[list] = dataclasses.field(default_factory=list)  # [c, additive, bound, factor] per claim
    dead_rows: DeadRowForm | None = None


# ---------------------------------------------------------------------------- public API


def extract_score_chain(score: fx.Node, softmax_input: fx.Node, *, dims: tuple[str, ...],
                        additive: Sequence[fx.Node] = (), merged_heads: bool = False) -> ExtractedMods:
    """Lift the pointwise chain from the raw ``score`` (q @ k^T) to ``softmax_input``.

    ``merged_heads``: ``score`` is (B*H, S, S) while ``dims`` and the softmax input are 4-D (DeBERTa adds
    its relative-position bias before the head split): the score is read at (b*H + h, q, kv), and the
    chain's split of that offset gives back (b, h) (``IndexLifter._reshape_idx``)."""
    return _with_dead_rows(
        lambda claim: _extract_score_chain(score, softmax_input, dims, additive, merged_heads, claim))


def _extract_score_chain(score: fx.Node, softmax_input: fx.Node, dims: tuple[str, ...],
                         additive: Sequence[fx.Node], merged_heads: bool,
                         claim_finite: bool) -> ExtractedMods:
    ex = _Extraction(dims, dtype_of(softmax_input), claim_finite=claim_finite)
    path = _chain_path(score, softmax_input)
    if merged_heads:
        ex.merge_heads(shape_of(score), shape_of(softmax_input))
    for a in additive:
        if _depends_on(a, score):
            raise UnsupportedPatternError(f"additive term {a.name} depends on the score itself")
        if not _broadcasts_to(a, score):
            raise UnsupportedPatternError(
                f"additive term {a.name} {tuple(shape_of(a))} does not broadcast to the score "
                f"{score.name} {tuple(shape_of(score))}; pass the score node it is added to")
    ex.path, ex.roots = path, list(additive)
    try:
        with _real_tensors():
            return ex.run_chain(path, score, list(additive))
    except NotLiftable as e:
        raise UnsupportedPatternError(f"score chain cannot be expressed over indices: {e}") from e
    except UnsupportedPatternError:
        raise
    except Exception as e:  # a bug here must cost one site, not the whole graph
        log.warning("mods: internal error extracting the score chain of %s: %r", softmax_input.name, e)
        raise UnsupportedPatternError(f"internal error in mask/score extraction: {e!r}") from e


def extract_attn_mask(mask: fx.Node, *, dims: tuple[str, ...]) -> ExtractedMods:
    """SDPA ``attn_mask``: bool (True = keep) or additive float (0/-inf/finfo.min or any bias)."""
    return _with_dead_rows(lambda claim: _extract_attn_mask(mask, dims, claim))


def _with_dead_rows(extract: Any) -> ExtractedMods:
    """``extract(claim_finite=True)``, plus the exact bias form of its finite mask claims.

    A claim is exact for rows that keep a key; rows with none need the constants as score terms
    (``runtime.dead_rows``). The form is the extraction without claims, its scores shifted by the
    largest claimed constant; its extras must be among the claimed extraction's (else that
    extraction is returned instead: exact everywhere, without block skipping)."""
    ex = extract(True)
    if not ex.claims or _keeps_the_diagonal(ex.mask):
        return ex
    try:
        exact = extract(False)
    except UnsupportedPatternError as e:
        ex.notes.append(f"{DEAD_ROWS_NOTE}: no exact bias form ({e})")
        log.warning("mods: finite masking constants without an exact bias form: %s", e)
        return ex
    every = list(ex.mask_extras) + list(ex.score_extras)
    needed = list(exact.mask_extras) + list(exact.score_extras)
    if exact.scale != ex.scale or exact.score is None or any(n not in every for n in needed):
        exact.notes.append("finite masking constants kept as exact score biases (their bias form needs "
                           "inputs the mask form does not carry)")
        return exact
    shift = max(c * f for c, _additive, _bound, f in ex.claims)
    ex.dead_rows = DeadRowForm(mask=exact.mask, score=_shifted(exact.score, shift),
                               mask_idx=tuple(every.index(n) for n in exact.mask_extras),
                               score_idx=tuple(every.index(n) for n in exact.score_extras), shift=shift)
    ex.notes = [n for n in ex.notes if n != FINFO_NOTE] + [DEAD_ROWS_NOTE]
    return ex


def _keeps_the_diagonal(mask: Mod | None) -> bool:
    """A proven causal / sliding-window mask keeps (q, q): no row can lose every key."""
    return mask is not None and set(mask.kinds) <= {"causal", "sliding_window"}


def _shifted(score: Mod, shift: float) -> Mod:
    """``score`` minus a constant (the same for every pair, so softmax is unchanged)."""
    fn = score.fn

    def shifted(s, *args):
        return fn(s, *args) - shift

    return Mod(shifted, False, "custom", n_extras=score.n_extras,
               description=f"({score.describe()}) - {shift:g}")


def _extract_attn_mask(mask: fx.Node, dims: tuple[str, ...], claim_finite: bool) -> ExtractedMods:
    dt = dtype_of(mask)
    ex = _Extraction(dims, dt if dt is not None and dt.is_floating_point else None, claim_finite=claim_finite)
    ex.roots = [mask]
    try:
        with _real_tensors():
            if dtype_of(mask) == torch.bool:
                ex.add_keep(ex.mask_l.lift_broadcast(mask, ex.idx_m))
            else:
                ex.add_additive(mask, scale=1.0)
            return ex.result(None)
    except NotLiftable as e:
        raise UnsupportedPatternError(f"attn_mask cannot be expressed over indices: {e}") from e
    except UnsupportedPatternError:
        raise
    except Exception as e:  # a bug here must cost one site, not the whole graph
        log.warning("mods: internal error extracting attn_mask %s: %r", mask.name, e)
        raise UnsupportedPatternError(f"internal error in attn_mask extraction: {e!r}") from e


@contextlib.contextmanager
def _real_tensors() -> Iterator[None]:
    """Extraction inspects real buffers and probes mods numerically: leave any ambient
    fake/proxy mode of the caller (Dynamo's backend context) for its duration."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        yield


# ---------------------------------------------------------------------------- chain walking


def _chain_path(score: fx.Node, softmax_input: fx.Node) -> list[fx.Node]:
    """Nodes after ``score`` up to and including ``softmax_input``, each with one running operand."""
    if softmax_input is score:
        return []
    order = {n: i for i, n in enumerate(score.graph.nodes)}
    limit = order[softmax_input]
    downstream = _downstream(score, limit, order)
    if softmax_input not in downstream:
        raise UnsupportedPatternError(f"{softmax_input.name} does not depend on the score {score.name}")
    path = []
    cur = softmax_input
    while cur is not score:
        if cur.op != "call_function":
            raise UnsupportedPatternError(f"{cur.name} in the score chain is not an op")
        running = {a for a in cur.all_input_nodes if a is score or a in downstream}
        if len(running) != 1 or any(a in running for a in cur.kwargs.values()
                                    if isinstance(a, fx.Node)):
            raise UnsupportedPatternError(
                f"{cur.name} ({cur.target}) uses the score in more than one operand; not a pointwise chain")
        (prev,) = running
        if sum(1 for a in cur.args if a is prev) != 1:
            raise UnsupportedPatternError(f"{cur.name} ({cur.target}) uses the score twice")
        p = packet_of(cur)
        if p is aten.max and len(cur.args) == 2:
            p = aten.maximum  # torch.max(a, b) is torch.maximum(a, b)
        if p not in POINTWISE and p not in CASTS and p not in IDENTITY and p not in RESHAPES:
            raise UnsupportedPatternError(
                f"{cur.name} ({cur.target}) in the score chain is not a pointwise op")
        path.append(cur)
        cur = prev
    path.reverse()
    return path


def _downstream(src: fx.Node, limit: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes whose *values* depend on ``src`` (shape-only uses do not count), up to ``limit``."""
    seen: set[fx.Node] = set()
    stack = [src]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen or order.get(u, limit + 1) > limit:
                continue
            if packet_of(u) in SHAPE_ONLY or tensor_val(u) is None or reads_only_metadata(u, n):
                continue
            seen.add(u)
            stack.append(u)
    return seen


def _depends_on(n: fx.Node, src: fx.Node) -> bool:
    order = {x: i for i, x in enumerate(n.graph.nodes)}
    return n is src or n in _downstream(src, order[n], order)


def _running_index(n: fx.Node, prev: fx.Node) -> int:
    return next(i for i, a in enumerate(n.args) if a is prev)


# ---------------------------------------------------------------------------- the extraction


class _Extraction:
    """State while walking one chain: two graph builders (mask, score) and what was found."""

    def __init__(self, dims: tuple[str, ...], dtype: torch.dtype | None = None, claim_finite: bool = True):
        dims = tuple(dims)
        if len(dims) < 2 or dims[-2:] != ("q", "kv") or any(d not in ("b", "h", "q", "kv") for d in dims):
            raise UnsupportedPatternError(f"score dims {dims} must end with ('q', 'kv') and use b/h/q/kv")
        self.dims = dims
        self.consumed: set[fx.Node] = set()
        self.notes: list[str] = []
        self.mask_b = ModGraphBuilder(with_score=False)
        self.score_b = ModGraphBuilder(with_score=True)
        self.mask_l = IndexLifter(self.mask_b, self.consumed, self.notes)
        self.score_l = IndexLifter(self.score_b, self.consumed, self.notes)
        self.idx_m = tuple(self.mask_b.role(d) for d in dims)
        self.idx_s = tuple(self.score_b.role(d) for d in dims)
        self.keep: Expr = True
        self.cur: Expr = self.score_b.score
        self.parts: list[tuple[str, str, dict, Any]] = []  # (kind, description, params, bias node)
        self.masked = False
        self.path: list[fx.Node] = []     # chain nodes: always replaced by the rewrite
        self.roots: list[fx.Node] = []    # attn_mask / additive nodes: dead if the site is their only user
        self.dtype = dtype                # dtype of the scores fed to exp (softmax input)
        self.bound: float | None = None   # proven bound of |running score| (None: the premise only)
        self.factor = 1.0                 # constant factor additive terms are multiplied by (head scale)
        self.claims: list[list] = []      # [c, additive, bound, later factor] of each finite mask claim
        self.claim_finite = claim_finite  # False: finite constants stay exact score terms

    def merge_heads(self, score_shape: tuple, split_shape: tuple) -> None:
        """Index the (B*H, S, S) score by the flat offset of the 4-D roles (see extract_score_chain)."""
        try:
            self.idx_m = self.mask_l._reshape_idx(score_shape, split_shape, self.idx_m)
            self.idx_s = self.score_l._reshape_idx(score_shape, split_shape, self.idx_s)
        except NotLiftable as e:
            raise UnsupportedPatternError(f"merged-head scores cannot be indexed by (b, h): {e}") from e

    # mask terms ---------------------------------------------------------------------------
    def add_keep(self, keep: Expr) -> None:
        self.keep = self.mask_b.and_(self.keep, keep)
        self.masked = True

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def keep_const(self, v: Any, *, additive: bool = True) -> Expr | None:
        """True for 0, False for a constant that provably masks (``masks_exactly``), else None.

        ``additive``: the constant is added to the score (else it replaces the score)."""
        if v is None or isinstance(v, bool):
            return None
        if v == 0:
            return True
        if is_huge_negative(v):
            if math.isinf(v):
                return False
            c = float(v) * (self.factor if additive else 1.0)
            if not self.claim_finite:
                return None
            if not masks_exactly(c, additive=additive, dtype=self.dtype, bound=self.bound):
                self._bias_note(c, additive)
                return None
            self.claims.append([c, additive, self.bound, 1.0])
            self.note(FINFO_NOTE)
            return False
        return None

    def _bias_note(self, c: float, additive: bool) -> None:
        from .classify_mods import score_premise

        bound = self.bound if self.bound is not None else score_premise(self.dtype)
        dtype = str(self.dtype or torch.float32).replace("torch.", "")
        self.note(BIAS_NOTE.format(c=c, bound=bound, dtype=dtype, k=2 if additive else 1,
                                   limit=exp_underflow_limit(self.dtype)))

    def scale_running(self, f: float) -> None:
        """The running score (masked entries included) is multiplied by ``f``."""
        if self.bound is not None:
            self.bound *= abs(f)
        for claim in self.claims:
            claim[3] *= f

    def check_claims(self) -> None:
        """Finite mask claims must still underflow after the factors applied after them."""
        from .classify_mods import score_premise

        limit = exp_underflow_limit(self.dtype)
        for c, additive, bound, f in self.claims:
            if bound is not None:
                margin = f * masking_margin(c, additive=additive, dtype=self.dtype, bound=bound)
            else:  # the premise bounds the final scores
                margin = f * c + (2 if additive else 1) * score_premise(self.dtype)
            if not margin < limit:
                raise UnsupportedPatternError(
                    f"the masking constant {c:g} is scaled by {f:g} after masking and no longer provably "
                    "underflows exp(); apply the scale before the mask")

    def keep_of(self, n: Any, idx: tuple) -> Expr | None:
        """Keep-expression when ``n[idx]`` is provably 0 (kept) or hugely negative (masked)."""
        if not isinstance(n, fx.Node) or tensor_val(n) is None:
            return self.keep_const(static_number(n))
        v = creation_value(n)
        if v is None:
            v = static_number(n)
        if v is not None:
            return self.keep_const(v)
        B, L = self.mask_b, self.mask_l
        if n.op in ("placeholder", "get_attr"):
            return self._keep_of_constant(n, idx)
        try:
            remapped = L.remap(n, idx)
        except NotLiftable:
            return None
        if remapped is not None:
            out = self.keep_of(*remapped)
            if out is not None:
                self.consumed.add(n)
            return out
        p = packet_of(n)
        a = n.args
        out: Expr | None = None
        if p in CASTS:
            dt_out, dt_in = dtype_of(n), dtype_of(a[0])
            if all(dt is not None and dt.is_floating_point for dt in (dt_out, dt_in)):
                out = self.keep_of(a[0], idx)
        elif p is aten.where:
            kx = self.keep_of(a[1], _bidx(a[1], idx))
            ky = self.keep_of(a[2], _bidx(a[2], idx)) if kx is not None else None
            if kx is not None and ky is not None:
                out = B.where(L.lift_broadcast(a[0], idx), kx, ky, logical=True)
        elif p is aten.masked_fill:
            x, m, fill = a[0], a[1], static_number(a[2])
            kf = self.keep_const(fill)
            if kf is False and _is_nonzero_test(m, x):
                out = B.not_(L.lift_broadcast(m, idx))  # 0 where x == 0, huge elsewhere
            elif kf is not None:
                kx = self.keep_of(x, _bidx(x, idx))
                if kx is not None:
                    out = B.where(L.lift_broadcast(m, idx), kf, kx, logical=True)
        elif p is aten.add and _alpha_is_one(n):
            kx = self.keep_of(a[0], _bidx(a[0], idx))
            ky = self.keep_of(a[1], _bidx(a[1], idx)) if kx is not None else None
            if kx is not None and ky is not None:
                out = B.and_(kx, ky)
        elif p is aten.mul:
            for z, c in ((a[0], a[1]), (a[1], a[0])):
                cv = static_number(c) if not isinstance(c, fx.Node) or tensor_val(c) is None \
                    or tensor_val(c).dim() == 0 else creation_value(c)
                if cv is None and isinstance(c, fx.Node):
                    cv = creation_value(c)
                if cv is None or isinstance(cv, bool):
                    continue
                if is_huge_negative(cv) and _is_integral(z) and self.keep_const(cv) is False:
                    self.note(f"{n.name}: additive mask (m * {cv:g}) assumes m is a 0/1 indicator")
                    out = B.call(operator.eq, L.lift_broadcast(z, idx), 0)
                    break
                if cv >= 1:
                    out = self.keep_of(z, _bidx(z, idx))
                    if out is not None:
                        break
        elif p in (aten.triu, aten.tril):
            kx = self.keep_of(a[0], idx)
            diag = a[1] if len(a) > 1 else 0
            if kx is not None and isinstance(diag, int):
                d = B.sub(idx[-1], idx[-2])
                cond = B.call(operator.ge if p is aten.triu else operator.le, d, diag)
                out = B.where(cond, kx, True, logical=True)
        if out is not None:
            self.consumed.add(n)
        return out

    def _keep_of_constant(self, n: fx.Node, idx: tuple) -> Expr | None:
        const = real_constant(n)
        if const is None or not const.is_floating_point():
            return None
        zero = const == 0
        if not bool((zero | (const <= -1e4)).all()):
            return None
        if const.dim() == 0:
            return self.keep_const(const.item())
        if not bool(zero.all()) and self.keep_const(float(const[~zero].max())) is not False:
            return None
        band = toeplitz_band(zero)
        if band is None:
            return None
        if not bool(torch.isinf(const[~zero]).all()):
            self.note(FINFO_NOTE)
        lo, hi, rows, cols = band
        B = self.mask_b
        self.note(f"{n.meta.get('ringcompile_source', n.name)}: additive mask buffer assumed constant "
                  f"(keeps kv-q in [{lo}, {hi}])")
        d = B.sub(idx[-1], idx[-2])
        cond: Expr = lo <= hi
        if lo > -(rows - 1):
            cond = B.and_(cond, B.call(operator.ge, d, lo))
        if hi < cols - 1:
            cond = B.and_(cond, B.call(operator.le, d, hi))
        return cond

    def split_terms(self, n: Any, idx: tuple, L: IndexLifter) -> list[tuple[Any, tuple]]:
        """Flatten a sum of tensors (through index remaps) into its terms at their indices."""
        if isinstance(n, fx.Node) and tensor_val(n) is not None and n.op == "call_function":
            if packet_of(n) is aten.add and _alpha_is_one(n) and all(
                    isinstance(a, fx.Node) and tensor_val(a) is not None for a in n.args[:2]):
                return (self.split_terms(n.args[0], _bidx(n.args[0], idx), L)
                        + self.split_terms(n.args[1], _bidx(n.args[1], idx), L))
            try:
                remapped = L.remap(n, idx)
            except NotLiftable:
                remapped = None
            if remapped is not None:
                return self.split_terms(*remapped, L)
        return [(n, idx)]

    def add_additive(self, n: fx.Node, *, scale: float, idx: tuple[tuple, tuple] | None = None) -> None:
        """Add an additive operand: 0/-inf parts become mask terms, the rest score biases.

        ``idx`` = (mask, score) index tuples of the value it is added to (default: the
        running score's current ones)."""
        idx_m, idx_s = idx if idx is not None else (self.idx_m, self.idx_s)
        terms_m = self.split_terms(n, _bidx(n, idx_m), self.mask_l)
        terms_s = self.split_terms(n, _bidx(n, idx_s), self.score_l)
        for (tm, im), (ts, is_) in zip(terms_m, terms_s, strict=True):
            self.factor = scale
            try:
                keep = self.keep_of(tm, im) if scale > 0 else None
            finally:
                self.factor = 1.0
            if keep is not None:
                if isinstance(tm, fx.Node):
                    self.consumed.add(tm)
                self.add_keep(keep)
                continue
            bias = self.score_l.lift(ts, is_) if isinstance(ts, fx.Node) else ts
            if scale != 1.0:
                bias = self.score_b.mul(bias, scale)
            self.cur = self.score_b.add(self.cur, bias)
            self.bound = None  # an unbounded term joins the running score
            self.parts.append(("bias", "", {}, bias))
        for t in (n, *[t for t, _ in terms_m]):
            if isinstance(t, fx.Node) and t.op == "call_function" and packet_of(t) is aten.add:
                self.consumed.add(t)

    # the chain ----------------------------------------------------------------------------
    def run_chain(self, path: list[fx.Node], score: fx.Node, additive: list[fx.Node]) -> ExtractedMods:
        scale, i, found = 1.0, 0, False
        prev = score
        raw_idx = (self.idx_m, self.idx_s)  # the additive terms are added to the raw score
        while i < len(path):  # head: casts and constant factors
            n = path[i]
            p = packet_of(n)
            if p in CASTS or p in IDENTITY or p in RESHAPES:
                if p in RESHAPES:
                    self._chain_view(n, prev)
                prev, i = n, i + 1
                continue
            factor = _constant_factor(n, prev)
            if factor is None:
                break
            scale *= factor
            found = True
            prev, i = n, i + 1
        self.consumed.update(path[:i])
        if not found:
            scale = 1.0
        for a in additive:
            self.add_additive(a, scale=scale, idx=raw_idx)
        # softcap right after the head: tanh(raw * k) * c  ==  scale k*c, tanh(s / c) * c
        if (i + 1 < len(path) and packet_of(path[i]) is aten.tanh and not additive
                and _constant_factor(path[i + 1], path[i]) is not None
                and packet_of(path[i + 1]) is aten.mul):
            cap = _constant_factor(path[i + 1], path[i])
            if cap > 0:
                scale *= cap
                found = True
                self._softcap(cap)
                self.consumed.update(path[i:i + 2])
                prev, i = path[i + 1], i + 2
        while i < len(path):
            n = path[i]
            step = self._chain_op(n, prev, path[i + 1:])
            self.consumed.update(path[i:i + step])
            prev = path[i + step - 1]
            i += step
        return self.result(scale if found else None)

    def _softcap(self, cap: float) -> None:
        B = self.score_b
        self.cur = B.mul(B.call(torch.tanh, B.call(operator.truediv, self.cur, cap)), cap)
        self.bound = abs(cap)  # |cap * tanh(s / cap)| <= cap
        self.parts.append(("softcap", f"softcap({cap:g})", {"cap": cap}, None))

    def _chain_op(self, n: fx.Node, prev: fx.Node, rest: list[fx.Node]) -> int:
        """Apply one chain op (or a recognised run of ops); returns how many nodes it used."""
        p = packet_of(n)
        a = n.args
        ri = _running_index(n, prev)
        if p in CASTS or p in IDENTITY:
            return 1
        if p in RESHAPES:
            self._chain_view(n, prev)
            return 1
        if p is aten.masked_fill and ri == 0:
            fill = static_number(a[2])
            kf = self.keep_const(fill, additive=False)
            if kf is False:
                self.add_keep(self.mask_b.not_(self.mask_l.lift_broadcast(a[1], self.idx_m)))
                return 1
        if p is aten.where and ri in (1, 2):
            other = a[3 - ri]
            ov = static_number(other) if not isinstance(other, fx.Node) or tensor_val(other) is None \
                or tensor_val(other).dim() == 0 else creation_value(other)
            if ov is None and isinstance(other, fx.Node):
                ov = creation_value(other)
            if self.keep_const(ov, additive=False) is False:
                cond = self.mask_l.lift_broadcast(a[0], self.idx_m)
                self.add_keep(cond if ri == 1 else self.mask_b.not_(cond))
                return 1
        if p is aten.add and _alpha_is_one(n) and isinstance(a[1 - ri], fx.Node) \
                and tensor_val(a[1 - ri]) is not None:
            self.add_additive(a[1 - ri], scale=1.0)
            return 1
        factor = _constant_factor(n, prev)
        if factor is not None:
            # softcap: s / c -> tanh -> * c
            if (len(rest) >= 2 and packet_of(rest[0]) is aten.tanh
                    and _running_index(rest[0], n) == 0 and _constant_factor(rest[1], rest[0]) is not None):
                cap = _constant_factor(rest[1], rest[0])
                if cap > 0 and math.isclose(factor * cap, 1.0, rel_tol=1e-9):
                    self._require_unmasked(rest[0])
                    self._softcap(cap)
                    return 3
            if self.masked and factor <= 0:
                raise UnsupportedPatternError(
                    f"{n.name}: multiplying masked scores by {factor:g} would unmask them")
            self.cur = self.score_b.mul(self.cur, factor)
            self.scale_running(factor)
            self.parts.append(("custom", "custom", {}, None))
            return 1
        if self._floor_clamp(n, ri):
            return 1
        # any other pointwise op on the running score
        self._require_unmasked(n)
        handler = POINTWISE[aten.maximum if p is aten.max else p]
        self.bound = None
        args = [self.cur if j == ri else self._score_operand(x) for j, x in enumerate(a)]
        kwargs = {k: self._score_operand(x) for k, x in n.kwargs.items()}
        self.cur = handler(self.score_b, args, kwargs, [dtype_of(x) for x in a])
        self.parts.append(("custom", "custom", {}, None))
        return 1

    def _floor_clamp(self, n: fx.Node, ri: int) -> bool:
        """``max(s, c)`` / ``clamp_min(s, c)`` with ``c <= finfo(dtype).min`` (XGLM, OPT): the identity
        on every finite score; it only turns -inf into finfo.min, which still masks."""
        p = packet_of(n)
        if p in (aten.maximum, aten.max) and len(n.args) == 2:
            other = n.args[1 - ri]
        elif p is aten.clamp_min and ri == 0:
            other = n.args[1]
        else:
            return False
        dt = dtype_of(n)
        follow = (aten.detach_, aten.detach, aten.lift_fresh_copy, aten.clone, aten.alias, aten._to_copy)
        while isinstance(other, fx.Node) and packet_of(other) in follow:
            other = other.args[0]  # torch.tensor(c) as Dynamo records it: a lifted, detached constant
        c = static_number(other)
        if dt is None or not dt.is_floating_point or c is None or isinstance(c, bool):
            return False
        if not c <= torch.finfo(dt).min:
            return False
        self.note(f"{n.name}: max(scores, {c:g}) is the identity on finite scores (a finfo.min floor)")
        return True

    def _chain_view(self, n: fx.Node, prev: fx.Node) -> None:
        """A reshape of the running score (e.g. (B*H, S, S) <-> (B, H, S, S)): re-index its dims."""
        if len(n.args) < 1 or n.args[0] is not prev:
            raise UnsupportedPatternError(f"{n.name}: unexpected reshape in the score chain")
        try:
            self.idx_m = self.mask_l._reshape_idx(shape_of(n), shape_of(prev), self.idx_m)
            self.idx_s = self.score_l._reshape_idx(shape_of(n), shape_of(prev), self.idx_s)
        except NotLiftable as e:
            raise UnsupportedPatternError(f"{n.name}: reshape of the score chain is not index-liftable: {e}"
                                          ) from e

    def _score_operand(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            return self.score_l.lift_broadcast(x, self.idx_s)
        if isinstance(x, (list, tuple)):
            return type(x)(self._score_operand(e) for e in x)
        return x

    def _require_unmasked(self, n: fx.Node) -> None:
        if self.masked:
            raise UnsupportedPatternError(
                f"{n.name} ({n.target}) is applied after masking and would change masked scores; "
                "move the mask after it")

    # result -------------------------------------------------------------------------------
    def result(self, scale: float | None) -> ExtractedMods:
        self.check_claims()
        mask, mask_extras = self._mask_mod()
        score, score_extras = self._score_mod()
        consumed = self._dead_after_rewrite() - set(mask_extras) - set(score_extras)
        for text in self.notes:
            log.info("mods: %s", text)
        return ExtractedMods(scale, mask, score, mask_extras, score_extras, consumed, list(self.notes),
                             [list(c) for c in self.claims])

    def _dead_after_rewrite(self) -> set[fx.Node]:
        """Lifted nodes with no users left once this site is rewritten (shared masks stay)."""
        dead = set(self.path)
        dead.update(r for r in self.roots if len(r.users) <= 1)
        candidates = self.consumed - dead
        if not candidates:
            return {n for n in dead if n.op == "call_function"}
        order = {n: i for i, n in enumerate(next(iter(candidates)).graph.nodes)}
        for n in sorted(candidates, key=order.__getitem__, reverse=True):
            if n.users and all(u in dead for u in n.users):
                dead.add(n)
        return {n for n in dead if n.op == "call_function"}

    def _mask_mod(self) -> tuple[Mod | None, list[fx.Node]]:
        if self.keep is True:
            return None, []
        gm = self.mask_b.finish(self.keep)
        extras = list(self.mask_b.extras)
        try:
            cls = classify_keep(_as_bool(to_sympy(gm, extra_dtypes=self.mask_b.extra_dtypes)))
        except Exception as e:  # classification only enables fast paths: unknown is always safe
            log.info("mods: could not classify the mask (%r); treated as custom", e)
            cls = MaskClass("custom", "custom", {}, None)
        if cls.always_true:
            return None, []
        if cls.index_only is not None:
            canon = canonical_mask(cls.index_only, cls.window, cls.params.get("causal", True))
            if not extras and _probe_equal(gm, canon.fn):
                return canon, []
            if not extras:
                log.warning("mods: mask proved %s but a numeric probe disagrees; treated as custom",
                            cls.description)
                self.note(f"mask proved {cls.description} but the probe disagreed: kept as custom")
                return Mod(clamp_lookups(gm), True, "custom", {}, 0, "custom",
                           aten_graph(gm, True, extras)), extras
        if "dense" in cls.kind.split("+"):
            self.note("mask kept dense: it is not a function of indices, a tensor input is indexed instead")
        return Mod(clamp_lookups(gm), True, cls.kind, cls.params, len(extras), cls.description,
                   aten_graph(gm, True, extras)), extras

    def _score_mod(self) -> tuple[Mod | None, list[fx.Node]]:
        if self.cur is self.score_b.score:
            return None, []
        gm = self.score_b.finish(self.cur)
        extras = list(self.score_b.extras)
        kinds: list[str] = []
        descs: list[str] = []
        params: dict[str, Any] = {}
        for kind, desc, prm, bias in self.parts:
            if kind == "bias":
                try:
                    val = to_sympy(gm, bias, self.score_b.extra_dtypes) if isinstance(bias, fx.Node) else None
                    kind, desc = classify_bias(val) if val is not None else ("custom", "custom bias")
                except Exception as e:  # description only; the graph is exact either way
                    log.info("mods: could not classify a bias term (%r)", e)
                    kind, desc = "custom", "custom bias"
            if kinds and kinds[-1] == kind == "custom":
                continue
            kinds.append(kind)
            descs.append(desc)
            params.update(prm)
        return Mod(clamp_lookups(gm), False, "+".join(kinds), params, len(extras), " then ".join(descs),
                   aten_graph(gm, False, extras)), extras


# ---------------------------------------------------------------------------- helpers


def _bidx(n: Any, idx: tuple) -> tuple:
    if not isinstance(n, fx.Node) or tensor_val(n) is None:
        return ()
    return bcast_idx(shape_of(n), idx)


def _broadcasts_to(a: Any, target: fx.Node) -> bool:
    """``a`` broadcasts to ``target``'s shape by PyTorch's rules (provably, for symbolic sizes)."""
    if not isinstance(a, fx.Node) or tensor_val(a) is None:
        return True
    sa, st = shape_of(a), shape_of(target)
    if len(sa) > len(st):
        return False
    for x, y in zip(reversed(sa), reversed(st), strict=False):
        if not (is_one(x) or (x == y if isinstance(x, int) and isinstance(y, int)
                              else statically_known_true(x == y))):
            return False
    return True


def _alpha_is_one(n: fx.Node) -> bool:
    alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
    return alpha == 1


def _constant_factor(n: fx.Node, prev: fx.Node) -> float | None:
    """c when ``n`` is ``prev * c`` or ``prev / c`` with a static scalar c."""
    p = packet_of(n)
    if p not in (aten.mul, aten.div) or n.kwargs.get("rounding_mode") or len(n.args) > 2:
        return None
    ri = _running_index(n, prev)
    other = n.args[1 - ri]
    if p is aten.div and ri != 0:
        return None
    if isinstance(other, fx.Node) and tensor_val(other) is not None and tensor_val(other).dim() != 0:
        return None
    v = static_number(other)
    if v is None or isinstance(v, bool):
        return None
    v = float(v)
    if p is aten.div:
        return None if v == 0 else 1.0 / v
    return v


def _is_nonzero_test(m: Any, x: Any) -> bool:
    """m == (x != 0): ``x.to(bool)`` or ``x.ne(0)``."""
    if not isinstance(m, fx.Node) or m.op != "call_function":
        return False
    p = packet_of(m)
    if p in CASTS and m.args[0] is x and dtype_of(m) == torch.bool:
        return True
    return p is aten.ne and m.args[0] is x and static_number(m.args[1]) == 0


def _is_integral(n: Any, depth: int = 0) -> bool:
    """The value is integer-valued (derived from bool/int tensors by casts, 1 - x, views)."""
    if depth > 30:
        return False
    if not isinstance(n, fx.Node) or tensor_val(n) is None:
        v = static_number(n)
        return v is not None and float(v).is_integer()
    dt = dtype_of(n)
    if dt is not None and not dt.is_floating_point:
        return True
    v = creation_value(n)
    if v is not None:
        return float(v).is_integer()
    p = packet_of(n)
    if p in CASTS or p in IDENTITY or p in RESHAPES or p in (aten.slice, aten.select, aten.unsqueeze,
                                                             aten.squeeze, aten.expand, aten.permute,
                                                             aten.transpose):
        return _is_integral(n.args[0], depth + 1)
    if p in (aten.add, aten.sub, aten.rsub, aten.mul):
        return all(_is_integral(a, depth + 1) for a in n.args[:2])
    if p is aten.where:
        return _is_integral(n.args[1], depth + 1) and _is_integral(n.args[2], depth + 1)
    return False


def _as_bool(v: Any) -> Bool:
    from .classify_mods import _bool

    return _bool(v)


def canonical_mask(kind: str, window: int | None = None, is_causal: bool = True) -> Mod:
    """The library mask (``mods.causal()`` / ``mods.sliding_window(w)``) with an FX graph attached."""
    B = ModGraphBuilder(with_score=False)
    q, kv = B.role("q"), B.role("kv")
    if kind == "causal":
        out = B.call(operator.le, kv, q)
        gm = B.finish(out)
        return Mod(gm, True, "causal", {}, 0, "causal", aten_graph(gm, True, []))
    assert window is not None
    if is_causal:
        out = B.and_(B.call(operator.le, kv, q), B.call(operator.lt, B.sub(q, kv), window))
    else:
        out = B.and_(B.call(operator.lt, B.sub(q, kv), window), B.call(operator.lt, B.sub(kv, q), window))
    gm = B.finish(out)
    return Mod(gm, True, "sliding_window", {"window": window, "causal": is_causal}, 0,
               f"sliding_window({window})", aten_graph(gm, True, []))


def clamp_lookups(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose extra lookups clamp indices to the extra's size.

    Mods index full-length extras with global indices; a runtime that pads the sequence
    (S not divisible by the ranks) evaluates them at q/kv >= S too. Those pairs are masked
    or discarded anyway, so clamping (upper bound only: negative indices keep PyTorch's
    wrap-around meaning) changes nothing in range and avoids index errors out of range.
    The Triton path bounds-checks its loads itself, so ``Mod.graph`` stays unclamped.
    """
    lookups = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem
               and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"
               and isinstance(n.args[1], tuple)]
    if not lookups:
        return gm
    out = copy.deepcopy(gm)
    g = out.graph
    for n in [n for n in g.nodes if n.op == "call_function" and n.target is operator.getitem
              and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"
              and isinstance(n.args[1], tuple)]:
        extra, idx = n.args
        new_idx = []
        with g.inserting_before(n):
            for d, i in enumerate(idx):
                if isinstance(i, fx.Node):
                    last = g.call_function(operator.sub, (g.call_method("size", (extra, d)), 1))
                    i = g.call_function(torch.clamp, (i,), {"max": last})
                new_idx.append(i)
        n.args = (extra, tuple(new_idx))
    g.lint()
    out.recompile()
    return out


def aten_graph(gm: fx.GraphModule, is_mask: bool, extras: Sequence[fx.Node]) -> fx.GraphModule | None:
    """``gm`` re-traced to aten ops with dtype metadata (what kernel lowering reads), or None.

    ``gm`` itself (Python operators, any shapes) stays the Mod's ``fn``; this copy is traced
    on a small example grid with zero-filled extras of the right rank and dtype.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    key = (gm.code, is_mask, tuple((v.dim(), v.dtype) if (v := tensor_val(e)) is not None else None
                                   for e in extras))
    if key not in _ATEN_CACHE:
        if len(_ATEN_CACHE) > 256:
            _ATEN_CACHE.clear()
        _ATEN_CACHE[key] = _trace_aten(gm, is_mask, extras, make_fx)
    return _ATEN_CACHE[key]


_ATEN_CACHE: dict[Any, fx.GraphModule | None] = {}  # identical mods (one per layer) trace once


def _trace_aten(gm: fx.GraphModule, is_mask: bool, extras: Sequence[fx.Node], make_fx: Any
                ) -> fx.GraphModule | None:
    args: list[torch.Tensor] = [] if is_mask else [torch.zeros(2, 4, 8, 8)]
    args += list(index_grid(2, 4, 0, 8, 0, 8))
    for e in extras:
        val = tensor_val(e)
        if val is None:
            return None
        sizes = [s if isinstance(s, int) else 8 for s in val.shape]
        args.append(torch.zeros(sizes, dtype=val.dtype))
    try:
        traced = make_fx(gm, tracing_mode="fake")(*args)
    except Exception as exc:  # the lifted graph always runs eagerly; lowering just falls back
        log.info("mods: could not re-trace the mod graph to aten ops: %s", exc)
        return None
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip([n for n in traced.graph.nodes if n.op == "placeholder"], names, strict=True):
        node.target = node.name = name
    traced.recompile()
    return traced


def _probe_equal(a: Any, b: Any) -> bool:
    """Numeric sanity check of two index-only masks on a few offset grids (never the proof)."""
    for q0, k0 in ((0, 0), (37, 5), (5, 70), (300, 290)):
        grid = index_grid(1, 1, q0, 48, k0, 48)
        ka = torch.as_tensor(a(*grid)).to(torch.bool).expand(1, 1, 48, 48)
        kb = torch.as_tensor(b(*grid)).to(torch.bool).expand(1, 1, 48, 48)
        if not torch.equal(ka, kb):
            return False
    return True
