"""What each spawned gloo rank runs in the hybrid tests (importable by spawned processes): 4 ranks as a
2 x 2 DeviceMesh ("cp_outer", "cp_inner"), strategy "hybrid", against float64 on the full sequence."""

from __future__ import annotations

import torch
from multirank_bodies import HEADS, MASKS, TOL, _compare, _seed, make_case
from torch.distributed.device_mesh import init_device_mesh

import ringcompile
from ringcompile.errors import CommunicationError, ShapeMismatchError
from ringcompile.runtime.group import resolve_group
from ringcompile.runtime.layouts import shard_tensor

DIMS = ("cp_outer", "cp_inner")


def _mesh():
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=DIMS)


def _run(rank: int, mesh, mask: str, heads, seq_len: int, failures: list[str], layout: str) -> None:
    dtype = torch.float32
    seed = _seed("hybrid", mask, heads)
    (q, k, v, dout), api, ref, ref_grads = make_case(mask, heads, seq_len, dtype, seed)
    shards = [ringcompile.shard(t, 2, layout, mesh, mesh_dim=DIMS, seq_len=seq_len).requires_grad_(True)
              for t in (q, k, v)]
    out = ringcompile.ring_attention(*shards, **api, enable_gqa=True, strategy="hybrid", layout=layout,
                                     group=mesh, mesh_dim=DIMS, timeout=30.0, seq_len=seq_len, block_size=3)
    name = f"hybrid/{mask}/{heads}/rank{rank}"
    g = resolve_group(mesh, DIMS)
    fwd_tol, grad_tol = TOL[dtype]
    want = shard_tensor(ref, 2, g.world_size, g.rank, layout, seq_len)
    _compare(name + "/out", out, want, fwd_tol, failures)
    out.backward(ringcompile.shard(dout, 2, layout, mesh, mesh_dim=DIMS, seq_len=seq_len))
    for label, t, want in zip("qkv", shards, ref_grads, strict=True):
        _compare(f"{name}/d{label}", t.grad, shard_tensor(want, 2, g.world_size, g.rank, layout, seq_len),
                 grad_tol, failures)
    full_dq = ringcompile.gather(shards[0].grad, 2, layout, mesh, seq_len, mesh_dim=DIMS)
    _compare(f"{name}/gathered dq", full_dq, ref_grads[0], grad_tol, failures)


def hybrid_body(rank: int, world: int, seq_len: int, timeout: float) -> dict:
    """Every mask kind (causal ones on zigzag shards) x {MHA, GQA with 1 kv head: replicated}, fwd+bwd; then a
    rank that swaps the mesh dimensions makes every rank raise ShapeMismatchError before any exchange;
    last, rank 3 dies in the ring across nodes (only when all its own checks passed: a dead rank cannot
    report) and the others report how they failed (``killed_rank_phase``)."""
    mesh = _mesh()
    failures: list[str] = []
    for mask in MASKS:
        layout = "zigzag" if mask in ("causal", "sliding", "alibi") else "contiguous"
        for heads in (HEADS["mha"], (4, 1)):
            try:
                _run(rank, mesh, mask, heads, seq_len, failures, layout)
            except Exception as e:  # noqa: BLE001 - reported as a failure of this combination
                failures.append(f"hybrid/{mask}/{heads}: {type(e).__name__}: {e}")
    dims = DIMS[::-1] if rank == 3 else DIMS
    x = torch.randn(1, 4, 4, 8)
    try:
        ringcompile.ring_attention(x, x, x, strategy="hybrid", group=mesh, mesh_dim=dims, timeout=20.0)
        failures.append(f"rank {rank}: swapped mesh dims did not raise")
    except ShapeMismatchError as e:
        if "two-level group" not in str(e):
            failures.append(f"rank {rank}: unexpected ShapeMismatchError {e}")
    except CommunicationError as e:
        failures.append(f"rank {rank}: swapped mesh dims reached an exchange: {e}")
    try:
        _node_size_check(rank, seq_len, failures)
    except Exception as e:  # noqa: BLE001 - reported as a failure
        failures.append(f"rank {rank}: node_size on the 1-D world: {type(e).__name__}: {e}")
    try:
        _backend_check(rank, mesh, failures)
    except Exception as e:  # noqa: BLE001 - reported as a failure
        failures.append(f"rank {rank}: backend with the 2-D mesh: {type(e).__name__}: {e}")
    if rank == 3 and failures:
        return {"failures": failures, "killed": None}
    return {"failures": failures, "killed": killed_rank_phase(rank, mesh, timeout)}


def _node_size_check(rank: int, seq_len: int, failures: list[str]) -> None:
    """The 1-D world with node_size=2 runs hybrid on 2 x 2 like the mesh does; a rank that says another
    node size makes every rank raise ShapeMismatchError before the mesh is built."""
    (q, k, v, dout), api, ref, ref_grads = make_case("causal", (4, 2), seq_len, torch.float32, _seed("ns"))
    shards = [ringcompile.shard(t, 2, "zigzag", seq_len=seq_len).requires_grad_(True) for t in (q, k, v)]
    out = ringcompile.ring_attention(*shards, **api, enable_gqa=True, strategy="hybrid", layout="zigzag",
                                     node_size=2, timeout=30.0, seq_len=seq_len)
    want = shard_tensor(ref, 2, 4, rank, "zigzag", seq_len)
    _compare(f"node_size/rank{rank}/out", out, want, TOL[torch.float32][0], failures)
    out.backward(ringcompile.shard(dout, 2, "zigzag", seq_len=seq_len))
    want_dk = shard_tensor(ref_grads[1], 2, 4, rank, "zigzag", seq_len)
    _compare(f"node_size/rank{rank}/dk", shards[1].grad, want_dk, TOL[torch.float32][1], failures)
    x = torch.randn(1, 4, 4, 8)
    try:
        ringcompile.ring_attention(x, x, x, strategy="hybrid", node_size=4 if rank == 3 else 2, timeout=20.0)
        failures.append(f"rank {rank}: node sizes that disagree did not raise")
    except ShapeMismatchError as e:
        if "node_size" not in str(e):
            failures.append(f"rank {rank}: unexpected ShapeMismatchError {e}")


def _backend_check(rank: int, mesh, failures: list[str]) -> None:
    """torch.compile(backend="ring", options={"group": mesh, "mesh_dim": DIMS, "strategy": "hybrid"}), and
    with {"node_size": 2} or a profile with 2 ranks a node on the default group, on full inputs
    (transparent mode): the output and dq equal float64 eager, and hybrid really ran."""
    import torch.nn.functional as F

    from ringcompile.runtime.strategies import hybrid

    calls = {"forward": 0, "backward": 0}
    originals = {name: getattr(hybrid, name) for name in calls}

    def counting(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return run

    for name in calls:
        setattr(hybrid, name, counting(name))
    try:
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, 4, 18, 8, generator=g, dtype=torch.float64) for _ in range(3))

        def f(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        ref_leaf = q.clone().requires_grad_(True)
        ref = f(ref_leaf, k, v)
        ref.sum().backward()
        two_level = {"mesh": {"group": mesh, "mesh_dim": DIMS}, "node_size": {"node_size": 2},
                     "profile": {"profile": _two_level_profile(rank)}}
        for label, extra in two_level.items():
            torch._dynamo.reset()
            calls.update(forward=0, backward=0)
            leaf = q.clone().requires_grad_(True)
            out = torch.compile(f, backend="ring", options={"inner": "eager", "strategy": "hybrid",
                                                             **extra})(leaf, k, v)
            out.sum().backward()
            _compare(f"backend {label}/rank{rank}/out", out, ref, 1e-10, failures)
            _compare(f"backend {label}/rank{rank}/dq", leaf.grad, ref_leaf.grad, 1e-10, failures)
            if calls["forward"] < 1 or calls["backward"] < 1:
                failures.append(f"backend {label}/rank{rank}: hybrid did not run ({calls})")
    finally:
        for name, fn in originals.items():
            setattr(hybrid, name, fn)


def _two_level_profile(rank: int) -> str:
    """A profile file with 2 ranks a node (this host's CPU numbers on both levels), for this rank."""
    import os
    import tempfile

    from ringcompile.cost_model.planner import two_level_profile
    from ringcompile.cost_model.profiles import load_profile

    prof = two_level_profile(load_profile("cpu-gloo-loopback"), 2)
    path = os.path.join(tempfile.gettempdir(), f"ringcompile_hybrid_2x2_{os.getpid()}_rank{rank}.toml")
    with open(path, "w") as fh:
        fh.write(prof.to_toml())
    return path


def killed_rank_phase(rank: int, mesh, timeout: float) -> dict:
    """Rank 3 dies at its first ring step across nodes (after the checks); the others must raise
    CommunicationError within the timeout."""
    import os
    import time

    from ringcompile.runtime import two_level

    if rank == 3:
        original = two_level.two_level_communicator

        def dying_communicator(*args, **kwargs):
            comm = original(*args, **kwargs)
            comm.outer.ring_shift = lambda *a, **kw: os._exit(0)
            return comm

        two_level.two_level_communicator = dying_communicator
    x = torch.randn(1, 4, 8, 8)
    start = time.monotonic()
    try:
        ringcompile.ring_attention(x, x, x, strategy="hybrid", group=mesh, mesh_dim=DIMS, timeout=timeout)
        return {"raised": None, "seconds": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"raised": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
