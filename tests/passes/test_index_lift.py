"""index_lift on its own: mask subgraphs become functions of indices that agree with the dense mask."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from ringcompile.passes.index_lift import IndexLifter, ModGraphBuilder, bcast_idx, toeplitz_band

B, H = 2, 2


def _mask_fn(kind: str, offset: int):
    """A (B, H, S, S) bool mask in one of several spellings, from a (B, S) key-padding input."""

    def fn(pad):
        s = pad.shape[-1]
        q = torch.arange(s)[:, None]
        kv = torch.arange(s)[None, :]
        if kind == "tril":
            m = torch.tril(torch.ones(s, s, dtype=torch.bool), offset)
        elif kind == "triu_not":
            m = ~torch.triu(torch.ones(s, s, dtype=torch.bool), offset + 1)
        elif kind == "window":
            m = (q - kv <= offset) & (kv <= q)
        elif kind == "padding":
            m = pad[:, None, None, :].expand(pad.shape[0], H, s, s)
        else:  # causal and padding, through a float additive mask compared back to bool
            bias = torch.zeros(s, s).masked_fill(kv > q, float("-inf"))
            m = (bias == 0)[None, None] & pad[:, None, None, :]
        return m.expand(pad.shape[0], H, s, s)

    return fn


def _lift_and_evaluate(fn, pad):
    gm = make_fx(fn, tracing_mode="fake")(pad)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    builder = ModGraphBuilder(with_score=False)
    lifter = IndexLifter(builder, set(), [])
    lifted = builder.finish(lifter.lift(out, tuple(builder.role(r) for r in ("b", "h", "q", "kv"))))
    s = pad.shape[-1]
    grid = (torch.arange(pad.shape[0]), torch.arange(H), torch.arange(s), torch.arange(s))
    b, h, q, kv = torch.meshgrid(*grid, indexing="ij")
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    extras = [pad if e is placeholders[0] else None for e in builder.extras]
    assert all(e is not None for e in extras), builder.extras  # only the padding input is looked up
    return lifted(b, h, q, kv, *extras), builder


@given(kind=st.sampled_from(["tril", "triu_not", "window", "padding", "bias"]), offset=st.integers(-2, 4),
       seq=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_lifted_mask_equals_the_dense_mask(kind, offset, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    pad = torch.rand(B, seq, generator=gen) > 0.3
    fn = _mask_fn(kind, offset)
    keep, builder = _lift_and_evaluate(fn, pad)
    assert torch.equal(torch.broadcast_to(keep, (B, H, seq, seq)).bool(), fn(pad))
    if kind in ("tril", "triu_not", "window"):
        assert not builder.extras  # index-only masks need no lookup: the S x S mask is never built


@st.composite
def _broadcast_pair(draw):
    out = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    rank = draw(st.integers(0, len(out)))
    operand = [draw(st.sampled_from([1, s])) for s in out[len(out) - rank:]]
    return out, operand


@given(_broadcast_pair(), st.data())
def test_bcast_idx_reads_the_broadcast_element(pair, data):
    out, operand = pair
    x = torch.randn(operand)
    idx = tuple(data.draw(st.integers(0, s - 1)) for s in out)
    assert x.expand(out)[idx] == x[bcast_idx(tuple(operand), idx)]


@given(rows=st.integers(1, 7), cols=st.integers(1, 7), lo=st.integers(-7, 7), width=st.integers(0, 6))
def test_toeplitz_band_recovers_the_band(rows, cols, lo, width):
    hi = lo + width
    d = torch.arange(cols)[None, :] - torch.arange(rows)[:, None]
    band = (d >= lo) & (d <= hi)
    found = toeplitz_band(band[None, None].float())
    kept = sorted(set(d[band].tolist()))
    if not kept:
        assert found is not None and found[0] > found[1]  # the empty band
    else:
        assert found == (kept[0], kept[-1], rows, cols)


def test_toeplitz_band_declines_a_non_band():
    m = torch.tril(torch.ones(4, 4))
    m[2, 1] = 0  # m[1, 0] and m[3, 2] on the same diagonal stay 1: not "a function of col - row"
    assert toeplitz_band(m) is None
    assert toeplitz_band(torch.full((3, 3), 0.5)) is None  # not 0/1


def test_where_of_two_numbers_keeps_a_float64_finfo_min():
    # Falcon's alibi mask: where(causal, full((), 0.0, dtype=float64), finfo(float64).min) lifted into a mod
    B = ModGraphBuilder(with_score=False)
    tiny = torch.finfo(torch.float64).min
    cond = B.call(torch.lt, B.role("kv"), B.role("q"))
    out = B.where(cond, 0.0, tiny, dtype=torch.float64)
    gm = B.finish(out)
    q, kv = torch.arange(4)[:, None], torch.arange(4)[None, :]
    got = gm(torch.zeros(()), torch.zeros(()), q, kv)
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.where(kv < q, torch.tensor(0.0, dtype=torch.float64), tiny))
    # within float32's range the emitted where stays the plain one (the Triton lowering reads it)
    plain = ModGraphBuilder(with_score=False)
    cond = plain.call(torch.lt, plain.role("kv"), plain.role("q"))
    node = plain.where(cond, 0.0, -1e9, dtype=torch.float64)
    assert node.args[1] == 0.0
