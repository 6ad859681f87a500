"""classify_mods on its own: lifted keep formulas are classified exactly, and the pointwise table agrees."""

from __future__ import annotations

import math
import operator

import pytest
import sympy
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from ringcompile.mods import KEY_PADDING_LOOKUPS
from ringcompile.passes.classify_mods import Bool, classify_keep, to_sympy
from ringcompile.passes.index_lift import ModGraphBuilder
from ringcompile.passes.pointwise import LIFTED, by_kind


def _keep_graph(spelling: str, lo: int, hi: int):
    """A lifted keep graph over (b, h, q_idx, kv_idx) keeping lo <= kv - q <= hi, in one of several forms."""
    bld = ModGraphBuilder(with_score=False)
    q, kv = bld.role("q"), bld.role("kv")
    if spelling == "difference":
        d = bld.call(operator.sub, kv, q)
        keep = bld.and_(bld.call(operator.ge, d, lo), bld.call(operator.le, d, hi))
    elif spelling == "shifted":  # q + lo <= kv and kv - hi <= q, as a where
        keep = bld.where(bld.call(operator.le, bld.call(operator.add, q, lo), kv),
                         bld.call(operator.le, bld.call(operator.sub, kv, hi), q), False, logical=True)
    else:  # not (kv - q < lo or kv - q > hi)
        d = bld.call(operator.sub, kv, q)
        keep = bld.not_(bld.or_(bld.call(operator.lt, d, lo), bld.call(operator.gt, d, hi)))
    return bld.finish(keep)


@given(spelling=st.sampled_from(["difference", "shifted", "negated"]), window=st.integers(1, 9),
       causal=st.booleans())
def test_band_masks_are_classified_with_their_window(spelling, window, causal):
    lo, hi = (-(window - 1), 0) if causal else (-(window - 1), window - 1)
    cls = classify_keep(to_sympy(_keep_graph(spelling, lo, hi)))
    if causal and window == 1:
        assert cls.kind == "sliding_window" and cls.window == 1
    elif causal:
        assert (cls.kind, cls.window, cls.params["causal"]) == ("sliding_window", window, True)
    elif window == 1:
        assert cls.kind == "sliding_window" and cls.window == 1
    else:
        assert (cls.kind, cls.window, cls.params["causal"]) == ("sliding_window", window, False)
    assert cls.index_only == "sliding_window"


@given(lo=st.integers(-6, 6), hi=st.integers(-6, 6))
def test_a_band_not_ending_at_the_diagonal_is_custom_and_the_graph_agrees(lo, hi):
    assume(not (hi == 0 or (hi > 0 and lo == -hi)))
    gm = _keep_graph("difference", lo, hi)
    assert classify_keep(to_sympy(gm)).index_only is None
    q, kv = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    keep = gm(torch.zeros(()), torch.zeros(()), q, kv)
    assert torch.equal(keep, (kv - q >= lo) & (kv - q <= hi))


def test_causal_and_padding_lookup():
    bld = ModGraphBuilder(with_score=False)
    pad = torch.fx.Graph().placeholder("pad")  # any original node stands for the looked-up input
    lookup = bld.call(operator.getitem, bld.extra(pad), (bld.role("b"), bld.role("kv")))
    keep = bld.and_(bld.call(operator.le, bld.role("kv"), bld.role("q")), lookup)
    gm = bld.finish(keep)
    cls = classify_keep(to_sympy(gm, extra_dtypes={ph: torch.bool for ph in bld.extra_dtypes} | {
        n: torch.bool for n in gm.graph.find_nodes(op="placeholder") if n.name.startswith("extra")}))
    assert cls.kind == "causal+padding" and cls.index_only is None


def _classify_with_lookup(index: str, spelling: str):
    """classify_keep of ``index`` (causal / window / none) AND a data clause over one bool extra."""
    bld = ModGraphBuilder(with_score=False)
    b, h, q, kv = (bld.role(r) for r in ("b", "h", "q", "kv"))
    pad = torch.fx.Graph().placeholder("pad")
    m = bld.extra(pad)
    data = {
        "key padding": lambda: bld.call(operator.getitem, m, (b, kv)),
        "key padding by value": lambda: bld.call(operator.ne, bld.call(operator.getitem, m, (b, kv)), 0),
        "reads the query": lambda: bld.call(operator.le, bld.call(operator.getitem, m, (b, kv)), q),
        "reads the head": lambda: bld.call(operator.gt, bld.call(operator.getitem, m, (b, kv)), h),
        "shifted lookup": lambda: bld.call(operator.getitem, m, (b, bld.call(operator.sub, kv, 1))),
        "dense": lambda: bld.call(operator.getitem, m, (b, q, kv)),
    }[spelling]()
    index_clause = {
        "causal": lambda: bld.call(operator.le, kv, q),
        "window": lambda: bld.and_(bld.call(operator.le, kv, q), bld.call(operator.lt, bld.sub(q, kv), 4)),
        "none": lambda: None,
    }[index]()
    gm = bld.finish(data if index_clause is None else bld.and_(index_clause, data))
    bools = {n: torch.bool for n in gm.graph.find_nodes(op="placeholder") if n.name.startswith("extra")}
    if spelling in ("reads the query", "reads the head", "key padding by value"):
        bools = {}  # an integer extra compared by value
    return classify_keep(to_sympy(gm, extra_dtypes=bools)), gm


@pytest.mark.parametrize("index", ["causal", "window", "none"])
def test_a_strict_key_padding_states_its_lookups(index):
    """Index clauses AND a function of (b, kv) alone, looked up at exactly b / kv: the class says so,
    which lets the Triton launcher evaluate the mask alone for per-batch key bounds."""
    for spelling in ("key padding", "key padding by value"):
        cls, _ = _classify_with_lookup(index, spelling)
        kind = {"causal": "causal+padding", "window": "sliding_window+padding", "none": "padding"}[index]
        assert cls.kind == kind
        assert cls.params[KEY_PADDING_LOOKUPS] == ((0, ("b", "kv")),)


@pytest.mark.parametrize("spelling", ["reads the query", "reads the head", "shifted lookup", "dense"])
def test_data_clauses_that_only_look_like_a_key_padding_state_no_lookups(spelling):
    """``m[b, kv] <= q`` and ``m[b, kv] > h`` are called "padding" (the lookup is by b and kv) but
    depend on q / h; ``m[b, kv - 1]`` is out of range at kv = 0 on a GPU; a dense lookup is no
    padding: none of them states the lookups, so no kernel evaluates them as a key padding."""
    cls, _ = _classify_with_lookup("causal", spelling)
    if spelling in ("reads the query", "reads the head", "shifted lookup"):
        assert cls.kind == "causal+padding"  # the kind alone would have claimed a key padding
    assert KEY_PADDING_LOOKUPS not in cls.params


def test_always_true_and_opaque():
    bld = ModGraphBuilder(with_score=False)
    kv = bld.role("kv")
    assert classify_keep(Bool(sympy.true)).always_true
    gm = bld.finish(bld.call(operator.lt, bld.call(torch.sigmoid, kv), 0.5))  # sigmoid: opaque to sympy
    assert classify_keep(to_sympy(gm)).kind == "custom"


# ---------------------------------------------------------------------------- the shared pointwise table

_FOLD_AND_SYMPY = sorted((op for op in LIFTED.values() if op.fold is not None and op.sympy is not None),
                         key=lambda op: op.fn.__name__)


@pytest.mark.parametrize("op", _FOLD_AND_SYMPY, ids=lambda op: op.fn.__name__)
@given(x=st.integers(-20, 20), y=st.integers(-20, 20))
def test_fold_and_sympy_meanings_agree(op, x, y):
    args = (x, y)[:op.arity]
    if op.fn in (operator.truediv, operator.floordiv, operator.mod):
        assume(y != 0)
    if op.fn is operator.pow:
        assume(y >= 0 and x != 0)
    if op.fn in (torch.log, torch.sqrt):
        assume(x > 0)
    if op.kind == "logical":
        args = tuple(bool(a % 2) for a in args)
    folded = op.fold(*(float(a) if op.kind == "unary" else a for a in args))
    meaning = op.sympy(*(sympy.true if a is True else sympy.false if a is False else sympy.Integer(a)
                         for a in args))
    if isinstance(folded, bool):
        assert bool(meaning) == folded
    else:
        assert math.isclose(float(meaning), folded, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("op", sorted(by_kind("unary").values(), key=lambda op: op.fn.__name__),
                         ids=lambda op: op.fn.__name__)
@given(x=st.floats(0.1, 5.0))
def test_the_lifted_function_computes_the_fold_on_tensors(op, x):
    if op.fold is None:
        return  # emitted as a graph call even on constants: nothing to compare
    assert math.isclose(float(op.fn(torch.tensor(x, dtype=torch.float64))), op.fold(x), rel_tol=1e-12)


def test_every_one_to_one_aten_op_is_pointwise():
    for op in LIFTED.values():
        for packet in op.aten:
            assert any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads()), packet
