"""What each spawned gloo rank runs in the dropout tests (importable by spawned processes): attention
dropout through the op (``ringcompile::ring_attention`` with a seed, as the backend's rewrite calls it)
under several strategies on one group, fwd+bwd, against float64 eager attention with the same keep mask
on the full sequence (= one process with the same seed), and the strategies against each other."""

from __future__ import annotations

import torch
from multirank_bodies import _compare, _seed

import ringcompile  # noqa: F401 - registers the ops
from ringcompile.kernels.reference import attention_reference
from ringcompile.runtime.group import resolve_group
from ringcompile.runtime.layouts import shard_tensor
from ringcompile.runtime.user_spec import build_spec
from ringcompile.spec import register_spec

P, SEED, TOL = 0.3, 97531, 1e-9
DIMS = ("cp_outer", "cp_inner")


def _case(heads: tuple[int, int], seq_len: int, causal: bool, B: int = 2, D: int = 4):
    g = torch.Generator().manual_seed(_seed("dropout", heads, seq_len, causal))
    q, k, v = (torch.randn(B, h, seq_len, D, generator=g, dtype=torch.float64) for h in heads + heads[1:])
    dout = torch.randn(B, heads[0], seq_len, D, generator=g, dtype=torch.float64)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    mask = ringcompile.mods.causal() if causal else None
    ref = attention_reference(*full, mask=mask, dropout_p=P, dropout_seed=SEED)
    plain = attention_reference(*full, mask=mask)
    assert not torch.allclose(ref, plain)  # dropout does something
    return (q, k, v, dout), ref.detach(), torch.autograd.grad(ref, full, dout)


def _run(strategy: str, layout: str, causal: bool, inputs, seq_len: int, group, mesh_dim):
    g = resolve_group(group, mesh_dim)
    spec = build_spec(is_causal=causal, strategy=strategy, group=group, mesh_dim=mesh_dim, layout=layout,
                      timeout=20.0).replace(dropout_p=P)
    q, k, v, dout = (shard_tensor(t, 2, g.world_size, g.rank, layout, seq_len) for t in inputs)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, _ = torch.ops.ringcompile.ring_attention(q, k, v, [], [], seq_len, register_spec(spec),
                                                  torch.tensor([SEED]))
    grads = torch.autograd.grad(out, [q, k, v], dout)
    return out.detach(), grads


def _check_group(rank: int, seq_len: int, strategies: tuple[str, ...], group, mesh_dim,
                 head_cases: tuple[tuple[int, int], ...], failures: list[str]) -> None:
    """Every strategy in ``strategies`` x ``head_cases`` x {causal (zigzag shards), none (contiguous)}:
    this rank's output and gradient shards equal float64's, and every strategy equals the first one."""
    g = resolve_group(group, mesh_dim)
    for heads in head_cases:
        for causal in (True, False):
            layout = "zigzag" if causal else "contiguous"
            inputs, ref, ref_grads = _case(heads, seq_len, causal)
            want = [shard_tensor(t, 2, g.world_size, g.rank, layout, seq_len) for t in (ref, *ref_grads)]
            first = None
            for strategy in strategies:
                name = f"N={g.world_size}/{strategy}/{heads}/{'causal' if causal else 'none'}/rank{rank}"
                try:
                    out, grads = _run(strategy, layout, causal, inputs, seq_len, group, mesh_dim)
                except Exception as e:  # noqa: BLE001 - reported as a failure of this combination
                    failures.append(f"{name}: {type(e).__name__}: {e}")
                    continue
                for label, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), want, strict=True):
                    _compare(f"{name}/{label}", got, w, TOL, failures)
                if first is None:
                    first = (strategy, (out, *grads))
                else:
                    for label, got, w in zip(("out", "dq", "dk", "dv"), (out, *grads), first[1], strict=True):
                        _compare(f"{name}/{label} vs {first[0]}", got, w, TOL, failures)


def dropout_body(rank: int, world: int, seq_len: int) -> dict:
    """4 ranks, one spawn: first two 2-rank groups ({0, 1}, {2, 3}) run ring, ulysses and allgather on
    {MHA, GQA 4/2}; then the 2 x 2 DeviceMesh runs hybrid, and ulysses and ring on the flattened group
    (heads that divide by 4: MHA, GQA 8/4)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    failures: list[str] = []
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    _check_group(rank, seq_len, ("ring", "ulysses", "allgather"), pairs[rank // 2], None,
                 ((4, 4), (4, 2)), failures)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=DIMS)
    _check_group(rank, seq_len, ("hybrid", "ulysses", "ring"), mesh, DIMS, ((4, 4), (8, 4)), failures)
    return {"failures": failures}
