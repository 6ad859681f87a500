"""Hypothesis: random compositions of the supported index ops, lowered to Triton, equal the
PyTorch block path (float64) on the same inputs, forward and backward (gradients of float
extras included), with and without dropout."""

from __future__ import annotations

import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_triton_support import compare_block, triton_interpreter  # noqa: F401

from ringcompile.kernels.triton import triton_block_kernels
from ringcompile.mods import Mod
from ringcompile.spec import AttentionSpec

# Each atom: (name, needs an extra of kind, builder(param) -> fn(b, h, q, kv, extra?))
MASK_ATOMS = {
    "causal": (None, lambda p: lambda b, h, q, kv: kv <= q),
    "window": (None, lambda p: lambda b, h, q, kv: (q - kv < p) & (kv - q < p + 1)),
    "block_causal": (None, lambda p: lambda b, h, q, kv: torch.div(q, p, rounding_mode="floor")
                     >= kv // p),
    "stride": (None, lambda p: lambda b, h, q, kv: (kv % (p + 1)) != 1),
    "even_heads_or_causal": (None, lambda p: lambda b, h, q, kv: (h % 2 == 0) | (kv <= q)),
    "padding": ("key_mask", lambda p: lambda b, h, q, kv, m: m[b, kv]),
    "document": ("doc", lambda p: lambda b, h, q, kv, d: d[b, q] == d[b, kv]),
}
SCORE_ATOMS = {
    "alibi": ("slopes", lambda p: lambda s, b, h, q, kv, sl: s + sl[h] * (kv - q)),
    "softcap": (None, lambda p: lambda s, b, h, q, kv: torch.tanh(s / (p * 0.5)) * (p * 0.5)),
    "affine": (None, lambda p: lambda s, b, h, q, kv: s * 0.5 + (q - kv) * 0.01 * p),
    "where": (None, lambda p: lambda s, b, h, q, kv: torch.where(kv > q, s - 1.0, s * 1.5)),
    "rel_bias": ("rel", lambda p: lambda s, b, h, q, kv, r: s + r[h, torch.clamp(q - kv, -p, p) + p]),
    "sigmoid_gate": (None, lambda p: lambda s, b, h, q, kv: s * torch.sigmoid(s) + torch.abs(s) * 0.1),
}


def compose(atoms, table, is_mask, combine):
    parts = [(table[name][0], table[name][1](p)) for name, p in atoms]
    n_extras = sum(kind is not None for kind, _ in parts)

    def fn(*args):
        lead = 4 if is_mask else 5
        fixed, extras = list(args[:lead]), list(args[lead:])
        out = None
        for kind, f in parts:
            extra = [extras.pop(0)] if kind is not None else []
            if is_mask:
                val = f(*fixed, *extra)
                out = val if out is None else combine(out, val)
            else:
                fixed[0] = f(*fixed, *extra)
                out = fixed[0]
        return out

    desc = ("&" if is_mask else " then ").join(f"{n}({p})" for n, p in atoms)
    return Mod(fn, is_mask, "custom", n_extras=n_extras, description=desc), [k for k, _ in parts if k]


atom = st.tuples(st.sampled_from(sorted(MASK_ATOMS)), st.integers(1, 6))
score_atom = st.tuples(st.sampled_from(sorted(SCORE_ATOMS)), st.integers(1, 6))


@settings(max_examples=int(os.environ.get("RING_TRITON_EXAMPLES", "8")))
@given(mask_atoms=st.lists(atom, min_size=0, max_size=3), use_or=st.booleans(),
       score_atoms=st.lists(score_atom, min_size=0, max_size=2),
       B=st.integers(1, 2), Hkv=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]),
       Sq=st.integers(1, 24), Sk=st.integers(1, 24), D=st.sampled_from([16, 24]),
       q_offset=st.integers(0, 24), kv_offset=st.integers(0, 24), seq_cut=st.integers(0, 6),
       dropout_p=st.sampled_from([0.0, 0.0, 0.25]), seed=st.integers(0, 2**16))
def test_random_mods_match_block_path(mask_atoms, use_or, score_atoms, B, Hkv, groups, Sq, Sk, D, q_offset,
                                      kv_offset, seq_cut, dropout_p, seed):
    combine = (lambda a, b: a | b) if use_or else (lambda a, b: a & b)
    mask, mkinds = compose(mask_atoms, MASK_ATOMS, True, combine) if mask_atoms else (None, [])
    score, skinds = compose(score_atoms, SCORE_ATOMS, False, None) if score_atoms else (None, [])
    g = torch.Generator().manual_seed(seed)
    Hq = Hkv * groups
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    total = max(q_offset + Sq, kv_offset + Sk)
    seq_len = max(1, kv_offset + Sk - seq_cut)
    make = {
        "key_mask": lambda: torch.rand(B, total, generator=g) > 0.3,
        "doc": lambda: torch.randint(0, 3, (B, total), generator=g).sort(dim=1).values,
        "slopes": lambda: torch.rand(Hq, generator=g),
        "rel": lambda: torch.randn(Hq, 13, generator=g) * 0.5,
    }
    me = [make[kind]() for kind in mkinds]
    se = [make[kind]() for kind in skinds]
    kernels = triton_block_kernels(AttentionSpec(mask=mask, score=score, kernel="triton"), forced=True)
    compare_block(kernels, q, k, v, tol=5e-5, scale=D ** -0.5, q_offset=q_offset, kv_offset=kv_offset,
                  seq_len=seq_len, mask=mask, score=score, mask_extras=me, score_extras=se, seed=seed,
                  dropout_p=dropout_p)
