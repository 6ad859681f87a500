"""kernels/generic.py (the non-CPU PyTorch path) and the device rule of kernels/select.py.

CUDA is not needed: selection only looks at the device it is handed, and the generic kernels
are plain torch ops, checked here on CPU tensors against a float64 oracle of their own.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from ringcompile import mods
from ringcompile.kernels import cpu, generic, select
from ringcompile.kernels import triton as triton_kernels
from ringcompile.kernels.dropout import keep_mask
from ringcompile.spec import AttentionSpec

CUDA = torch.device("cuda", 0)
DATA_DEPENDENT = mods.from_callable(lambda b, h, q, kv: kv <= q if int(q.max()) > 3 else kv >= q, True)
SIN_SCORE = mods.from_callable(lambda s, b, h, q, kv: torch.sin(s), is_mask=False)


def _is_cpu_only(kernels) -> bool:
    return kernels.forward is cpu.block_forward or kernels.backward is cpu.block_backward


@pytest.mark.parametrize("spec", [
    AttentionSpec(mask=DATA_DEPENDENT),                 # Triton lowering declines the mask
    AttentionSpec(score=SIN_SCORE),                     # ... or the score mod
    AttentionSpec(mask=mods.causal(), kernel="cpu"),    # the user asked for no Triton
    AttentionSpec(score=SIN_SCORE, kernel="cpu"),
], ids=["unlowerable-mask", "unlowerable-score", "kernel-cpu", "kernel-cpu-unlowerable"])
@pytest.mark.parametrize("device", [CUDA, torch.device("meta")], ids=["cuda", "meta"])
def test_non_cpu_devices_never_select_the_cpu_only_kernels(spec, device):
    kernels = select.block_kernels(spec, device)
    assert not _is_cpu_only(kernels)
    assert kernels.name in ("generic", "triton")
    if spec.kernel == "cpu" or device.type == "meta":
        assert kernels.name == "generic"


def test_missing_triton_on_cuda_selects_the_generic_kernels(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_triton_missing", lambda: "triton cannot be imported (test)")
    kernels = select.block_kernels(AttentionSpec(mask=mods.sliding_window(7), name="missing-triton"), CUDA)
    assert kernels.name == "generic" and not _is_cpu_only(kernels)


def test_cpu_tensors_keep_the_cpu_kernels():
    assert _is_cpu_only(select.block_kernels(AttentionSpec(mask=DATA_DEPENDENT), torch.device("cpu")))
    assert _is_cpu_only(select.block_kernels(AttentionSpec(kernel="cpu"), torch.device("cpu")))


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_generic_kernels_call_no_cpu_only_op():
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    kw = dict(scale=0.3, mask=mods.causal(), q_offset=2, kv_offset=0)
    with _OpNames() as seen:
        out, lse = generic.block_forward(q, k, v, **kw)
        generic.block_backward(q, k, v, out, torch.randn_like(out), lse, **kw)
    assert seen.names and not [n for n in seen.names if "for_cpu" in n or "flash" in n]


# ------------------------------------------------------------------- numerics vs a float64 oracle


def _case(name: str, B: int, Hq: int, S: int, gen: torch.Generator):
    """(mask, score, mask_extras, score_extras, keep(b,h,q,kv) bool (B,Hq,S,S), score fn on float64)."""
    b, h, qi, ki = (x.expand(B, Hq, S, S) for x in torch.meshgrid(
        torch.arange(B), torch.arange(Hq), torch.arange(S), torch.arange(S), indexing="ij"))
    keep = torch.ones(B, Hq, S, S, dtype=torch.bool)
    mask = score = None
    mask_extras: list[torch.Tensor] = []
    score_extras: list[torch.Tensor] = []

    def score_fn(s, extras):
        return s

    if "causal" in name:
        mask = mods.causal()
        keep &= ki <= qi
    if "sliding" in name:
        mask = mods.sliding_window(3, is_causal=False)
        keep &= (qi - ki).abs() < 3
    if "padding" in name:
        key_mask = torch.rand(B, S, generator=gen) > 0.3
        mask = mods.and_masks(mask, mods.key_padding()) if mask is not None else mods.key_padding()
        mask_extras = [key_mask]
        keep &= key_mask[b, ki]
    if "alibi" in name:
        score = mods.alibi()
        score_extras = [torch.rand(Hq, generator=gen, dtype=torch.float64) + 0.1]

        def score_fn(s, extras):  # ALiBi: slope_h * (kv - q)
            return s + extras[0].view(1, -1, 1, 1) * (ki - qi).to(s.dtype)
    return mask, score, mask_extras, score_extras, keep, score_fn


def _oracle(q, k, v, keep, score_fn, score_extras, scale, drop):
    """Full-sequence float64 attention with GQA by repetition; rows with no kept key give 0."""
    groups = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = score_fn(q @ kr.transpose(-2, -1) * scale, score_extras).masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p * drop) @ vr, torch.logsumexp(s, dim=-1)


@given(case=st.sampled_from(["none", "causal", "sliding", "causal+padding", "alibi", "causal+alibi"]),
       groups=st.sampled_from([1, 2]), S=st.integers(3, 20), rows_per_chunk=st.integers(1, 7),
       dropout=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_generic_matches_float64_oracle_forward_and_backward(case, groups, S, rows_per_chunk, dropout, seed):
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, D = 2, 2, 8
    Hq = Hkv * groups
    q = torch.randn(B, Hq, S, D, generator=gen)
    k = torch.randn(B, Hkv, S, D, generator=gen)
    v = torch.randn(B, Hkv, S, D, generator=gen)
    mask, score, mask_extras, score_extras, keep, score_fn = _case(case, B, Hq, S, gen)
    p = 0.25 if dropout else 0.0
    grid = mods.index_grid(B, Hq, 0, S, 0, S)
    drop = keep_mask(seed, *grid, p).double() / (1 - p) if dropout else torch.ones(())
    scale = D ** -0.5
    kw = dict(scale=scale, mask=mask, score=score, mask_extras=mask_extras,
              score_extras=[e.float() for e in score_extras], dropout_p=p,
              dropout_seed=seed if dropout else None, tile_elements=B * Hq * S * rows_per_chunk)

    out, lse = generic.block_forward(q, k, v, **kw)
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    x64 = [e.clone().requires_grad_(True) for e in score_extras]
    ref_out, ref_lse = _oracle(q64, k64, v64, keep, score_fn, x64, scale, drop)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=2e-5, rtol=2e-5)
    finite = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse.detach()[finite], atol=2e-5, rtol=2e-5)

    dout = torch.randn(out.shape, generator=gen)
    dq, dk, dv, d_extras = generic.block_backward(q, k, v, out, dout, lse, **kw)
    wanted = [q64, k64, v64, *x64]
    ref = torch.autograd.grad(ref_out, wanted, dout.double(), allow_unused=True)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[:3], strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5, msg=name)
    for got, want in zip(d_extras, ref[3:], strict=True):
        torch.testing.assert_close(got.double(), want, atol=5e-5, rtol=5e-5)
