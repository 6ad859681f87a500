"""Prove what a lifted mask or bias is, so fast paths (block skipping) are only taken when exact.

A lifted mod graph is converted to sympy over integer index symbols b, h, q, kv: booleans
become formulas over relational atoms, numbers become piecewise "cases" lists, extra
lookups become undefined functions of their index expressions. The keep formula is put in
conjunctive normal form; each clause that only involves ``d = kv - q`` linearly is turned
into an exact set of integers, and their intersection decides "causal" (d <= 0) or
"sliding_window(W)" (-(W-1) <= d <= 0). Clauses of lookups indexed by (b, kv) only are
"padding", lookups indexed by both q and kv are "dense"; anything else is "custom".
What each lifted function means over sympy comes from the shared table (``passes.pointwise``).

"padding" alone does not say the clause ignores q and h (``m[b, kv] > q`` is one) nor that its
lookups stay in range (``m[b, kv - 9]``). When every non-index clause is a key padding in the
strict sense, a function of (b, kv) alone whose lookups index extras at exactly ``b`` / ``kv``,
the class states it as ``params["key_padding_lookups"]``: the (extra, index symbols) of each
lookup. The Triton launcher then evaluates the mod on the diagonal q = kv, which every index
kind keeps, to get the key padding exactly (``kernels/triton/padding_bounds.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
from sympy.logic.boolalg import Boolean, BooleanFalse, BooleanTrue

from ringcompile.mods import KEY_PADDING_LOOKUPS

from .pointwise import by_kind

SYMS = {name: sympy.Symbol(name, integer=True) for name in ("b", "h", "q_idx", "kv_idx")}
Q, KV = SYMS["q_idx"], SYMS["kv_idx"]
_ROLE_SYMS = set(SYMS.values())


class _Opaque:
    """Counter for values the converter cannot model (they make a clause 'custom')."""

    n = 0

    @classmethod
    def fresh(cls) -> sympy.Symbol:
        cls.n += 1
        return sympy.Symbol(f"_opaque{cls.n}")


@dataclasses.dataclass
class Num:
    """A numeric value as cases: value_i where cond_i (conds are disjoint and cover)."""

    cases: list[tuple[sympy.Expr, Boolean]]


@dataclasses.dataclass
class Bool:
    expr: Boolean


@dataclasses.dataclass
class Extra:
    index: int
    dtype: torch.dtype | None


def _num(v: Any) -> Num:
    if isinstance(v, Num):
        return v
    if isinstance(v, Bool):
        return Num([(sympy.Integer(1), v.expr), (sympy.Integer(0), sympy.Not(v.expr))])
    if isinstance(v, bool):
        return Num([(sympy.Integer(int(v)), sympy.true)])
    if isinstance(v, int):
        return Num([(sympy.Integer(v), sympy.true)])
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return Num([(sympy.oo if v > 0 else -sympy.oo, sympy.true)]) if not math.isnan(v) else _opaque()
        return Num([(sympy.Rational(v), sympy.true)])
    return _opaque()


def _opaque() -> Num:
    return Num([(_Opaque.fresh(), sympy.true)])


def _bool(v: Any) -> Bool:
    if isinstance(v, Bool):
        return v
    if isinstance(v, bool):
        return Bool(sympy.true if v else sympy.false)
    n = _num(v)
    return Bool(sympy.Or(*[sympy.And(c, sympy.Ne(e, 0)) for e, c in n.cases]))


def _combine(fn: Any, *vals: Any) -> Num:
    nums = [_num(v) for v in vals]
    cases = []
    for combo in itertools.product(*[n.cases for n in nums]):
        cond = sympy.And(*[c for _, c in combo])
        if cond is sympy.false:
            continue
        try:
            cases.append((fn(*[e for e, _ in combo]), cond))
        except (TypeError, ValueError, ZeroDivisionError):
            return _opaque()
    return Num(cases)


def _compare(rel: Any, x: Any, y: Any) -> Bool:
    nx, ny = _num(x), _num(y)
    parts = []
    for (ex, cx), (ey, cy) in itertools.product(nx.cases, ny.cases):
        parts.append(sympy.And(cx, cy, rel(ex, ey)))
    return Bool(sympy.Or(*parts))


def _where(c: Any, x: Any, y: Any) -> Any:
    c = _bool(c).expr
    if isinstance(x, (Bool, bool)) and isinstance(y, (Bool, bool)):
        return Bool(sympy.Or(sympy.And(c, _bool(x).expr), sympy.And(sympy.Not(c), _bool(y).expr)))
    nx, ny = _num(x), _num(y)
    cases = [(e, sympy.And(c, cc)) for e, cc in nx.cases] + [(e, sympy.And(sympy.Not(c), cc))
                                                            for e, cc in ny.cases]
    return Num([(e, cc) for e, cc in cases if cc is not sympy.false])


# the sympy meaning of each lifted function, from the shared pointwise table (None there: opaque)
def _meanings(kind: str) -> dict[Any, Any]:
    return {fn: op.sympy for fn, op in by_kind(kind).items() if op.sympy is not None}


_SYMPY_UNARY = _meanings("unary")
_ARITH = _meanings("arith")
_RELS = _meanings("compare")
_LOGICAL = _meanings("logical")


def to_sympy(gm: fx.GraphModule, node: fx.Node | None = None,
             extra_dtypes: dict[fx.Node, torch.dtype] | None = None) -> Any:
    """Convert a lifted mod graph's output (or ``node``) into Num/Bool over the index symbols."""
    extra_dtypes = extra_dtypes or {}
    env: dict[fx.Node, Any] = {}
    names = {"b": "b", "h": "h", "q_idx": "q_idx", "kv_idx": "kv_idx"}
    n_extra = 0
    target = node
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.name in names:
                env[n] = Num([(SYMS[n.name], sympy.true)])
            elif n.name == "score":
                env[n] = Num([(sympy.Symbol("score"), sympy.true)])
            else:
                env[n] = Extra(n_extra, extra_dtypes.get(n))
                n_extra += 1
            continue
        if n.op == "output":
            if target is None:
                target = n.args[0]
            break
        env[n] = _convert(n, env)
        if n is node:
            break
    if node is not None and node not in env:
        raise KeyError(f"{node} is not in the mod graph")
    return target if not isinstance(target, fx.Node) else env[target]


def _arg(a: Any, env: dict) -> Any:
    if isinstance(a, fx.Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_arg(x, env) for x in a)
    return a


def _convert(n: fx.Node, env: dict) -> Any:
    args = [_arg(a, env) for a in n.args]
    kwargs = {k: _arg(v, env) for k, v in n.kwargs.items()}
    t = n.target
    if n.op == "call_method" and t == "to":
        dtype = args[1]
        x = args[0]
        if dtype == torch.bool:
            return _bool(x)
        nx = _num(x)
        if dtype.is_floating_point or all(e.is_integer for e, _ in nx.cases):
            return nx
        return _opaque()
    if n.op != "call_function":
        return _opaque()
    if t is operator.getitem and isinstance(args[0], Extra):
        ex: Extra = args[0]
        f = sympy.Function(f"extra{ex.index}")
        idx = [_num(i) for i in args[1]]
        cases = []
        for combo in itertools.product(*[i.cases for i in idx]):
            cond = sympy.And(*[c for _, c in combo])
            if cond is not sympy.false:
                cases.append((f(*[e for e, _ in combo]), cond))
        val = Num(cases)
        return _bool(val) if ex.dtype == torch.bool else val
    if t in _ARITH:
        return _combine(_ARITH[t], args[0], args[1])
    if t in _SYMPY_UNARY:
        return _combine(_SYMPY_UNARY[t], args[0])
    if t in _RELS:
        return _compare(_RELS[t], args[0], args[1])
    if t in _LOGICAL:
        if all(isinstance(a, (Bool, bool)) for a in args[:2]):
            return Bool(_LOGICAL[t](_bool(args[0]).expr, _bool(args[1]).expr))
        return _opaque()
    if t is operator.invert:
        return Bool(sympy.Not(args[0].expr)) if isinstance(args[0], Bool) else _opaque()
    if t is torch.where:
        return _where(*args[:3])
    if t is torch.clamp:
        lo, hi = kwargs.get("min"), kwargs.get("max")
        v = _num(args[0])
        if lo is not None:
            v = _combine(sympy.Max, v, lo)
        if hi is not None:
            v = _combine(sympy.Min, v, hi)
        return v
    return _opaque()


# ---------------------------------------------------------------------------- mask classification


@dataclasses.dataclass
class MaskClass:
    kind: str                    # "causal", "sliding_window", "padding", "dense", "custom", joined by "+"
    description: str
    params: dict[str, Any]
    index_only: str | None       # "causal"/"sliding_window" when the mask is exactly that (no other clause)
    window: int | None = None
    always_true: bool = False


_INF = math.inf


def _ge_set(alpha: sympy.Expr, gamma: sympy.Expr) -> list[tuple[float, float]]:
    """Integers d with alpha*d + gamma >= 0, as closed intervals (alpha != 0)."""
    bound = -gamma / alpha
    if alpha > 0:
        return [(int(sympy.ceiling(bound)), _INF)]
    return [(-_INF, int(sympy.floor(bound)))]


def _union(sets: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    ivs = sorted(iv for s in sets for iv in s if iv[0] <= iv[1])
    out: list[tuple[float, float]] = []
    for lo, hi in ivs:
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _linear_in_d(e: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr] | None:
    """(alpha, gamma) when e == alpha*(kv - q) + gamma with integer alpha, gamma."""
    if e.free_symbols - {Q, KV} or not e.free_symbols:
        return None
    try:
        poly = sympy.Poly(sympy.expand(e), KV, Q)
    except sympy.PolynomialError:
        return None
    if poly.total_degree() != 1:
        return None
    a = poly.coeff_monomial(KV)
    c = poly.coeff_monomial(Q)
    g = poly.coeff_monomial(1)
    if a == 0 or a != -c or not (a.is_integer and g.is_integer):
        return None
    return a, g


def _literal_set(rel: Any, positive: bool) -> list[tuple[float, float]] | None:
    """The integer set of d a literal allows, or None when it is not a relation on d."""
    if not isinstance(rel, sympy.core.relational.Relational):
        return None
    e = rel.lhs - rel.rhs
    lin = _linear_in_d(e)
    if lin is None:
        return None
    a, g = lin
    kind = type(rel)
    if kind in (sympy.Lt, sympy.Gt, sympy.Ne):
        positive = not positive
        kind = {sympy.Lt: sympy.Ge, sympy.Gt: sympy.Le, sympy.Ne: sympy.Eq}[kind]
    if kind is sympy.Le:
        a, g = -a, -g
        kind = sympy.Ge
    if kind is sympy.Ge:
        return _ge_set(a, g) if positive else _ge_set(-a, -g - 1)
    # equality a*d + g == 0
    point = -g / a
    pts = [(int(point), int(point))] if point.is_integer else []
    if positive:
        return pts
    if not pts:
        return [(-_INF, _INF)]
    p = pts[0][0]
    return [(-_INF, p - 1), (p + 1, _INF)]


def _lookup_roles(expr: Any) -> set[sympy.Symbol] | None:
    """Index symbols used by the extra lookups in ``expr``; None when it has no lookup."""
    funcs = [f for f in expr.atoms(sympy.core.function.AppliedUndef) if str(f.func).startswith("extra")]
    if not funcs:
        return None
    roles: set[sympy.Symbol] = set()
    for f in funcs:
        roles |= f.free_symbols & _ROLE_SYMS
    return roles


def _cnf_clauses(expr: Boolean) -> list[list[tuple[Any, bool]]] | None:
    """The CNF of ``expr`` as clauses of (relational or atom, polarity)."""
    rels = sorted(expr.atoms(sympy.core.relational.Relational), key=sympy.default_sort_key)
    canon = {r: _canonical_atom(r) for r in rels}
    bases = sorted({c for c, _ in canon.values()}, key=sympy.default_sort_key)
    symbol_of = {a: sympy.Symbol(f"_p{i}") for i, a in enumerate(bases)}
    back = {v: k for k, v in symbol_of.items()}
    props = {r: (symbol_of[c] if pol else sympy.Not(symbol_of[c])) for r, (c, pol) in canon.items()}
    prop = expr.xreplace(props)
    if len(bases) <= 8:
        cnf = sympy.simplify_logic(prop, form="cnf", force=True)
    else:
        cnf = sympy.to_cnf(prop, simplify=False)
    if cnf is sympy.true or isinstance(cnf, BooleanTrue):
        return []
    if cnf is sympy.false or isinstance(cnf, BooleanFalse):
        return [[]]
    clauses = cnf.args if isinstance(cnf, sympy.And) else (cnf,)
    out = []
    for cl in clauses:
        lits = cl.args if isinstance(cl, sympy.Or) else (cl,)
        row = []
        for lit in lits:
            if isinstance(lit, sympy.Not):
                row.append((back.get(lit.args[0], lit.args[0]), False))
            else:
                row.append((back.get(lit, lit), True))
        out.append(row)
    return out


def _canonical_atom(rel: Any) -> tuple[Any, bool]:
    """(base relation, polarity) so that complementary relations share one base.

    Bases are ``Ge(e, 0)`` or ``Eq(e, 0)``; over integers ``e < 0`` is ``not (e >= 0)`` and
    ``e >= 0`` is ``not (-e - 1 >= 0)``, so the sign of ``e`` is normalised too.
    """
    kind = type(rel)
    e = sympy.expand(rel.lhs - rel.rhs)
    if kind in (sympy.Eq, sympy.Ne):
        e = min(e, -e, key=sympy.default_sort_key)
        return sympy.Eq(e, 0, evaluate=False), kind is sympy.Eq
    if kind in (sympy.Le, sympy.Lt):
        e = -e
    positive = kind in (sympy.Ge, sympy.Le)
    if kind in (sympy.Gt, sympy.Lt):  # e > 0  ==  not (-e >= 0)
        e, positive = -e, False
    if e.is_integer:
        alt = sympy.expand(-e - 1)
        if sympy.default_sort_key(alt) < sympy.default_sort_key(e):
            e, positive = alt, not positive
    return sympy.Ge(e, 0, evaluate=False), positive


def classify_keep(keep: Bool) -> MaskClass:
    """Classify a keep formula exactly (see module docstring)."""
    expr = keep.expr
    clauses = _cnf_clauses(expr)
    if clauses is None:
        return MaskClass("custom", "custom", {}, None)
    if not clauses:
        return MaskClass("custom", "none", {}, None, always_true=True)
    d_set: list[tuple[float, float]] = [(-_INF, _INF)]
    other: list[str] = []
    has_d = False
    for clause in clauses:
        sets = [_literal_set(atom, pol) for atom, pol in clause]
        if clause and all(s is not None for s in sets):
            u = _union(sets)  # type: ignore[arg-type]
            if u == [(-_INF, _INF)]:
                continue
            has_d = True
            d_set = _intersect(d_set, u)
            continue
        other.append(_clause_kind(clause))
    kinds: list[str] = []
    descs: list[str] = []
    params: dict[str, Any] = {}
    index_kind = None
    window = None
    if has_d:
        if len(d_set) == 1:
            lo, hi = d_set[0]
            if hi == 0 and lo == -_INF:
                index_kind = "causal"
            elif hi == 0 and lo != -_INF and lo <= 0:
                index_kind, window = "sliding_window", int(1 - lo)
                params = {"window": window, "causal": True}
            elif hi > 0 and lo == -hi:
                index_kind, window = "sliding_window", int(hi + 1)
                params = {"window": window, "causal": False}
        if index_kind is None:
            kinds.append("custom")
            descs.append("custom")
        else:
            kinds.append(index_kind)
            descs.append("causal" if index_kind == "causal" else f"sliding_window({window})")
    for k in ("padding", "dense", "custom"):
        if k in other and k not in kinds:
            kinds.append(k)
            descs.append(k)
    only = index_kind if (index_kind is not None and not other) else None
    if other and set(kinds) <= {"causal", "sliding_window", "padding"}:
        lookups = key_padding_lookups([c for c in clauses if not _is_d_clause(c)])
        if lookups is not None:
            params = {**params, KEY_PADDING_LOOKUPS: lookups}
    return MaskClass("+".join(kinds), " & ".join(descs), params, only, window)


_B = SYMS["b"]
_ROLE_NAMES = {_B: "b", KV: "kv"}


def _is_d_clause(clause: list[tuple[Any, bool]]) -> bool:
    """A clause of relations linear in ``kv - q`` only (what the index part is made of)."""
    return bool(clause) and all(_literal_set(atom, pol) is not None for atom, pol in clause)


Lookups = tuple[tuple[int, tuple[str, ...]], ...]


def key_padding_lookups(clauses: list[list[tuple[Any, bool]]]) -> Lookups | None:
    """((extra index, index symbol names), ...) of every lookup in ``clauses`` when each clause is a
    strict key padding: every atom a function of b and kv alone, holding a lookup, and every lookup
    indexing an extra at exactly the symbols ``b`` / ``kv`` (so within an extra of >= B rows and
    >= kv_end columns it is in range); None otherwise."""
    found: set[tuple[int, tuple[str, ...]]] = set()
    for clause in clauses:
        if not clause:
            return None
        for atom, _ in clause:
            if not isinstance(atom, sympy.Basic) or not atom.free_symbols <= {_B, KV}:
                return None
            funcs = atom.atoms(sympy.core.function.AppliedUndef)
            if not funcs:
                return None
            for f in funcs:
                name = str(f.func)
                if not name.startswith("extra") or not name[len("extra"):].isdigit():
                    return None
                if not all(a in _ROLE_NAMES for a in f.args):
                    return None
                found.add((int(name[len("extra"):]), tuple(_ROLE_NAMES[a] for a in f.args)))
    return tuple(sorted(found)) if found else None


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return _union([out])


def _clause_kind(clause: list[tuple[Any, bool]]) -> str:
    if not clause:
        return "custom"  # keeps nothing
    kinds = set()
    for atom, _ in clause:
        if any(str(s).startswith("_opaque") for s in atom.free_symbols):
            return "custom"
        roles = _lookup_roles(atom)
        if roles is None:
            kinds.add("index")
        elif Q in roles and KV in roles:
            kinds.add("dense")
        elif roles <= {SYMS["b"], KV}:
            kinds.add("padding")
        else:
            kinds.add("custom")
    if "dense" in kinds:
        return "dense"  # a dense tensor decides this clause (maybe together with indices)
    return "padding" if kinds == {"padding"} else "custom"


# ---------------------------------------------------------------------------- bias classification


def classify_bias(value: Any) -> tuple[str, str]:
    """(kind, description) of an additive score term: "alibi", "bias" (dense lookup),
    "padding_bias" (a function of a lookup by (b, kv) only: an additive key padding whose
    constant does not provably mask) or "custom"."""
    if _is_key_lookup_only(value):
        return "padding_bias", "padding bias"
    if not isinstance(value, Num) or len(value.cases) != 1:
        return "custom", "custom bias"
    e = value.cases[0][0]
    if any(str(s).startswith("_opaque") for s in e.free_symbols):
        return "custom", "custom bias"
    roles = _lookup_roles(e)
    if roles is not None and Q in roles and KV in roles:
        return "bias", "dense bias"
    slope = sympy.diff(e, KV)
    if slope != 0 and sympy.diff(e, KV, 2) == 0 and not (slope.free_symbols & {Q, KV, SYMS["b"]}):
        rest = sympy.expand(e - slope * KV)
        if KV not in rest.free_symbols and SYMS["h"] in slope.free_symbols | _arg_syms(slope):
            return "alibi", "alibi"
    return "custom", "custom bias"


def _arg_syms(e: sympy.Expr) -> set:
    out: set = set()
    for f in e.atoms(sympy.core.function.AppliedUndef):
        out |= f.free_symbols
    return out


# ---------------------------------------------------------------------------- finite "masking" constants


def exp_underflow_limit(dtype: torch.dtype | None) -> float:
    """x below which ``exp(x)`` rounds to exactly 0 in ``dtype``, and in float32 too.

    Softmax may run in float32 for 16-bit inputs, so the stricter (more negative) of the two
    limits is used: ``log(smallest subnormal / 2)`` (-103.97 for float32, -745.13 for float64).
    """
    dtypes = [torch.float32] + ([dtype] if dtype is not None and dtype.is_floating_point else [])
    return min(math.log(fi.smallest_normal) + math.log(fi.eps) - math.log(2)
               for fi in map(torch.finfo, dtypes))


def score_premise(dtype: torch.dtype | None) -> float:
    """The bound on |kept scores| assumed when nothing bounds them: a quarter of the dtype's
    range, i.e. scores that can be doubled and summed without overflowing."""
    dt = dtype if dtype is not None and dtype.is_floating_point else torch.float32
    return torch.finfo(dt).max / 4


def masking_margin(c: float, *, additive: bool, dtype: torch.dtype | None, bound: float | None) -> float:
    """Upper bound of ``x_masked - rowmax`` for a pair that gets the constant ``c`` (<= 0).

    With ``|kept score| <= B`` (``bound``, or ``score_premise(dtype)`` when None) and at least
    one kept key in the row (so rowmax >= -B): a fill (``masked_fill(s, m, c)``,
    ``where(m, s, c)``) gives ``x = c`` and ``x - rowmax <= c + B``; an additive term gives
    ``x = s + c`` and ``x - rowmax <= c + 2B``.
    """
    B = score_premise(dtype) if bound is None else bound
    return c + (2 * B if additive else B)


def masks_exactly(c: float, *, additive: bool, dtype: torch.dtype | None, bound: float | None) -> bool:
    """``c`` provably sends the pair's softmax weight to exactly 0 (so it may be treated as masked).

    The condition is ``masking_margin(...) < exp_underflow_limit(dtype)``. -inf always qualifies;
    finfo.min does under the premise; -10000 (BERT) or -1e9 only when the scores are provably
    bounded (a softcap before the mask): otherwise they stay an exact score bias.
    """
    if math.isnan(c) or c > 0:
        return False
    if math.isinf(c):
        return True
    return masking_margin(c, additive=additive, dtype=dtype, bound=bound) < exp_underflow_limit(dtype)


def _is_key_lookup_only(value: Any) -> bool:
    """``value`` is an additive key padding: a function of extra lookups indexed by (b, kv)
    only, with a large negative constant (<= -1e4) in it."""
    if not isinstance(value, Num):
        return False
    looked_up = huge = False
    for e, cond in value.cases:
        for part in (e, cond):
            if not isinstance(part, sympy.Basic):
                continue
            if any(str(s).startswith("_opaque") for s in part.free_symbols):
                return False
            if part.free_symbols - {SYMS["b"], KV}:
                return False
            roles = _lookup_roles(part)
            if roles is not None:
                if not roles <= {SYMS["b"], KV}:
                    return False
                looked_up = True
            huge = huge or any(a.is_number and a.is_real and a <= -10000 for a in part.atoms(sympy.Number))
    return looked_up and huge
