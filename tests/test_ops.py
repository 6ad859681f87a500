"""The custom op: schema/fake/autograd checks and gradients against float64 eager attention."""

import pytest
import torch

from ringcompile import mods
from ringcompile.errors import RingCompileError
from ringcompile.kernels.reference import attention_reference
from ringcompile.spec import AttentionSpec, get_spec, register_spec


def _inputs(seed, B=2, Hq=4, Hkv=2, S=19, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, S, D, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


@pytest.mark.parametrize("case", ["plain", "causal_padding_alibi_softcap"])
def test_op_matches_reference_forward_and_backward(case, monkeypatch):
    monkeypatch.setattr("ringcompile.runtime.local.DEFAULT_BLOCK", 8)
    q, k, v = _inputs(seed=11)
    B, S = q.shape[0], q.shape[2]
    if case == "plain":
        spec, me, se = AttentionSpec(scale=0.3), [], []
    else:
        key_mask = torch.rand(B, S) > 0.3
        key_mask[:, 0] = True
        slopes = torch.rand(q.shape[1], requires_grad=True)
        spec = AttentionSpec(mask=mods.and_masks(mods.causal(), mods.key_padding()),
                             score=mods.compose_scores(mods.softcap(4.0), mods.alibi()))
        me, se = [key_mask], [slopes]
    key = register_spec(spec)
    out, lse = torch.ops.ringcompile.ring_attention(q, k, v, me, se, S, key)
    ref = attention_reference(q, k, v, scale=spec.scale, mask=spec.mask, score=spec.score,
                              mask_extras=me, score_extras=se)
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=2e-5)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    wrt = [q, k, v, *[e for e in se if e.requires_grad]]
    mine = torch.autograd.grad(out, wrt, dout.float())
    theirs = torch.autograd.grad(ref, wrt, dout)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-4, rtol=5e-4)


def test_opcheck():
    q, k, v = _inputs(seed=5, S=9)
    key = register_spec(AttentionSpec(mask=mods.causal()))
    torch.library.opcheck(torch.ops.ringcompile.ring_attention.default, (q, k, v, [], [], 9, key))


def test_unknown_spec_key_is_a_clear_error():
    with pytest.raises(RingCompileError, match="recompile"):
        get_spec("no-such-key")
