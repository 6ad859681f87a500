"""Head dims held as two power-of-two column pieces (80 = 64 + 16, 96 = 64 + 32; issue 16 item 8):
the split policy, the generated source (no padded tile, chained dots; powers of two unchanged), and
forward plus both backward kernels under the Triton interpreter against float64 block math."""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_triton_support import assert_close, compare_block, triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.kernels import reference
from ringcompile.kernels.triton import head_split, launch, show, tiles, triton_block_kernels
from ringcompile.kernels.triton import template as tpl
from ringcompile.kernels.triton.head_split import (
    expand,
    header_lines,
    offset_lines,
    pad_dim,
    pieces,
    power_of_two_parts,
    split_widths,
)
from ringcompile.spec import AttentionSpec


@pytest.mark.parametrize("d,widths", [(80, (64, 16)), (96, (64, 32)), (160, (128, 32)), (192, (128, 64)),
                                      (48, (32, 16)), (72, None), (24, None), (112, None), (8, None),
                                      (64, None), (128, None), (256, None)])
def test_power_of_two_parts(d, widths):
    assert power_of_two_parts(d) == widths


def test_split_dims_are_the_tile_tables_split_classes():
    """A dim is split only where the tile tables measured the split kernels (head_split docstring)."""
    assert set(tiles.SPLIT_D_CLASSES) == head_split.SPLIT_DIMS
    assert split_widths(80) == (64, 16) and split_widths(96) == (64, 32)
    assert split_widths(160) is None and pieces(160)[0].padded  # no measured split row: padded


EVERY_DIM = frozenset(range(1, 1025))


@pytest.fixture
def split_every_dim(monkeypatch):
    """Every dim that has two power-of-two parts is split (what adding dims to SPLIT_DIMS would run),
    with a fresh cache of generated kernels (launch remembers them per signature, not per split)."""
    monkeypatch.setattr(head_split, "SPLIT_DIMS", EVERY_DIM)
    monkeypatch.setattr(launch, "_GENERATED", {})


@given(st.integers(1, 1024))
def test_pieces_cover_the_head_dim_exactly_or_pad_it(d):
    for split_dims in (head_split.SPLIT_DIMS, EVERY_DIM):
        with mock.patch.object(head_split, "SPLIT_DIMS", split_dims):
            ps = pieces(d)
        assert all(p.width >= 16 and p.width & (p.width - 1) == 0 for p in ps)
        if len(ps) == 1:
            assert ps[0].padded and ps[0].width == pad_dim(d) >= d and ps[0].suffix == ""
        else:
            assert len(ps) == 2 and not any(p.padded for p in ps)
            assert [p.offset for p in ps] == [0, ps[0].width] and sum(p.width for p in ps) == d
        assert (len(ps) == 2) == (d in split_dims and power_of_two_parts(d) is not None)


def strip_markers(text: str) -> str:
    """The template as it read before head-dim pieces existed: every ``@d``/``@dv``/``@D``/``@DV`` gone."""
    return re.sub(r"@(dv|d|DV|D)(?!\w)", "", text)


@pytest.mark.parametrize("d,dv", [(16, 16), (64, 64), (128, 64), (256, 256), (72, 40), (160, 48)])
def test_padded_dims_generate_the_unsplit_template(d, dv):
    """A dim held as one padded tile (every power of two) renders the template text with its markers
    removed, and the same head-dim constants and lane masks as before the split existed: the
    generated source (and so the measured tile table) of these dims is unchanged."""
    dims = {"d": pieces(d), "dv": pieces(dv)}
    for part in (tpl.HEADER, tpl.FORWARD, tpl.BACKWARD_DKDV, tpl.BACKWARD_DQ):
        assert expand(part, dims) == strip_markers(part)
    assert header_lines(dims, {"d": d, "dv": dv}) == [
        f"HEAD_DIM = tl.constexpr({d})  # query/key head dim, padded to D_PAD with masking",
        f"V_HEAD_DIM = tl.constexpr({dv})  # value head dim, padded to DV_PAD",
        f"D_PAD = tl.constexpr({pad_dim(d)})", f"DV_PAD = tl.constexpr({pad_dim(dv)})"]
    assert offset_lines(dims) == ["offs_d = tl.arange(0, D_PAD)", "offs_dv = tl.arange(0, DV_PAD)",
                                  "d_ok = offs_d < HEAD_DIM", "dv_ok = offs_dv < V_HEAD_DIM"]


def test_head_dim_80_source_has_no_padded_tile():
    src = show(AttentionSpec(mask=mods.causal(), score=mods.alibi()), head_dim=80, dtype=torch.float32)
    assert "HEAD_DIM = tl.constexpr(80)  # query/key head dim, held as 64 + 16 columns" in src
    assert "D_PAD" not in src and "128" not in src  # no 128-wide tile anywhere
    assert "d_ok" not in src and "dv_ok" not in src  # exact tiles: no head-dim lane masks
    assert "offs_d0 = tl.arange(0, 64)" in src and "offs_d1 = 64 + tl.arange(0, 16)" in src
    # QK^T as two dots chained through the accumulator, in all three kernels
    assert src.count('tl.dot(q1, kT1, tl.dot(q0, kT0, input_precision="tf32")') == 2
    assert src.count('tl.dot(k1, qT1, tl.dot(k0, qT0, input_precision="tf32")') == 1
    # dP over the value dim likewise; every output-column accumulator in two pieces
    assert "tl.dot(v1, tl.trans(do1), tl.dot(v0, tl.trans(do0)" in src
    assert "tl.dot(do1, vT1, tl.dot(do0, vT0" in src
    for acc, width in (("acc", 16), ("dk", 16), ("dv", 16), ("dq", 16)):
        assert re.search(rf"{acc}1 = tl\.zeros\(\[BLOCK_[MN], {width}\]", src), acc
        assert re.search(rf"{acc}0 = tl\.zeros\(\[BLOCK_[MN], 64\]", src), acc


def test_each_head_dim_is_split_on_its_own():
    """D=96 split, DV=72 padded (its tail would be 8): the value tiles keep DV_PAD and lane masks."""
    src = show(AttentionSpec(mask=mods.causal()), head_dim=96, v_head_dim=72)
    assert "held as 64 + 32 columns" in src and "DV_PAD = tl.constexpr(128)" in src and "D_PAD =" not in src
    assert "dv_ok = offs_dv < V_HEAD_DIM" in src and "d_ok" not in src.replace("dv_ok", "")
    assert "acc = tl.zeros([BLOCK_M, DV_PAD]" in src and "dk1 = tl.zeros([BLOCK_N, 32]" in src
    assert "tl.dot(v, tl.trans(do))" in src  # dP over the padded value dim stays one dot


def qkv(d: int, dv: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 18, d, generator=g).to(dtype)  # GQA: 4 query heads on 2 KV heads
    k = torch.randn(1, 2, 21, d, generator=g).to(dtype)
    v = torch.randn(1, 2, 21, dv, generator=g).to(dtype)
    slopes = torch.rand(4, generator=g) + 0.1
    return q, k, v, slopes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,dv", [(80, 80), (96, 96), (96, 80), (80, 72)])
def test_split_head_dims_match_float64(d, dv, dtype):
    """Causal + ALiBi, GQA 2:1, a ring step's offsets (queries after keys, partly masked): out, lse,
    dQ, dK, dV and the ALiBi slopes' gradient against float64 (bf16: bf16 tolerance)."""
    check_against_float64(d, dv, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,dv", [(48, 48), (160, 192)])
def test_other_split_dims_match_float64(d, dv, dtype, split_every_dim):
    """Dims not split by default (no measured split tiles), split: the same check."""
    assert not pieces(d)[0].padded and not pieces(dv)[0].padded
    check_against_float64(d, dv, dtype)


def check_against_float64(d: int, dv: int, dtype: torch.dtype) -> None:
    q, k, v, slopes = qkv(d, dv, dtype, seed=d * 1000 + dv)
    mask, score = mods.causal(), mods.alibi()
    kernels = triton_block_kernels(AttentionSpec(mask=mask, score=score, kernel="triton"), forced=True)
    compare_block(kernels, q, k, v, tol=3e-2 if dtype == torch.bfloat16 else 5e-5, scale=d ** -0.5,
                  q_offset=25, kv_offset=12, seq_len=45, mask=mask, score=score, score_extras=[slopes],
                  seed=d + dv)


def test_split_head_dim_with_key_padding_window_and_dropout():
    """The other template paths at D=80, DV=96: key-padding bounds, a sliding window, dropout."""
    g = torch.Generator().manual_seed(80)
    q = torch.randn(1, 2, 17, 80, generator=g)
    k = torch.randn(1, 1, 19, 80, generator=g)
    v = torch.randn(1, 1, 19, 96, generator=g)
    keep = torch.rand(1, 40, generator=g) > 0.3
    mask = mods.and_masks(mods.sliding_window(9), mods.key_padding())
    kernels = triton_block_kernels(AttentionSpec(mask=mask, kernel="triton", dropout_p=0.2), forced=True)
    compare_block(kernels, q, k, v, tol=5e-5, scale=80 ** -0.5, q_offset=20, kv_offset=10, seq_len=40,
                  mask=mask, mask_extras=[keep], seed=3, dropout_p=0.2)


def test_split_head_dim_in_float64_stays_exact():
    g = torch.Generator().manual_seed(96)
    q, k = (torch.randn(1, 2, 9, 96, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, 9, 80, generator=g, dtype=torch.float64)
    kernels = triton_block_kernels(AttentionSpec(mask=mods.causal(), kernel="triton"), forced=True)
    kw = dict(scale=0.1, q_offset=0, kv_offset=0, seq_len=9, mask=mods.causal())
    out, lse = kernels.forward(q, k, v, **kw)
    ref_out, ref_lse = reference.block_forward(q, k, v, **kw)
    assert out.dtype == torch.float64
    assert_close(out, ref_out, 1e-10, "out")
    assert_close(lse, ref_lse, 1e-10, "lse")
