"""What each spawned rank runs in the multi-rank tests (importable by spawned processes).

Every rank builds the same full inputs from a per-combination seed, computes the float64
reference on the full sequence, runs ``ringcompile.ring_attention`` on its shard and
compares its shard of the output and of the gradients. Bodies return a list of failure
strings (empty = pass) so one spawn can check many combinations.
"""

from __future__ import annotations

import os
import time
import zlib

import torch
import torch.distributed as dist

import ringcompile
from ringcompile import mods
from ringcompile.errors import CommunicationError, OptionError, ShapeMismatchError
from ringcompile.kernels.reference import attention_reference
from ringcompile.runtime import timing
from ringcompile.runtime.group import resolve_group
from ringcompile.runtime.layouts import shard_tensor

MASKS = ("none", "causal", "sliding", "padding", "alibi")
STRATEGIES = ("ring", "zigzag", "allgather", "ulysses")
HEADS = {"mha": (4, 4), "gqa": (8, 4)}
# (forward atol, gradient atol) against float64 on the full sequence; rtol is the same
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 6e-2)}
WINDOW = 5


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_case(mask: str, heads: tuple[int, int], seq_len: int, dtype: torch.dtype, seed: int, B: int = 2,
              D: int = 8):
    """Full inputs (cast to dtype), user-level mods, and the float64 reference mods."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    q, k, v = (torch.randn(B, h, seq_len, D, generator=g).to(dtype) for h in (hq, hkv, hkv))
    dout = torch.randn(B, hq, seq_len, D, generator=g).to(dtype)
    api = {"is_causal": mask in ("causal", "alibi")}
    ref_mask, ref_score, me, se = (mods.causal() if api["is_causal"] else None), None, [], []
    if mask == "sliding":
        api["mask_mod"] = lambda b, h, qi, kv: (kv <= qi) & (qi - kv < WINDOW)
        ref_mask = mods.sliding_window(WINDOW)
    elif mask == "padding":
        key_mask = torch.rand(B, seq_len, generator=g) > 0.3
        key_mask[:, 0] = True
        api["mask_mod"] = lambda b, h, qi, kv: key_mask[b, kv]
        ref_mask, me = mods.key_padding(), [key_mask]
    elif mask == "alibi":
        slopes = torch.rand(hq, generator=g, dtype=torch.float64)
        api["score_mod"] = lambda s, b, h, qi, kv: s + slopes[h].to(s.dtype) * (kv - qi)
        ref_score, se = mods.alibi(), [slopes]
    full = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*full, mask=ref_mask, score=ref_score, mask_extras=me, score_extras=se)
    ref_grads = torch.autograd.grad(ref, full, dout.double())
    return (q, k, v, dout), api, ref.detach(), ref_grads


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, failures: list[str]) -> float:
    err = (got.double() - want).abs()
    bad = err > atol + atol * want.abs()
    if bad.any() or not torch.isfinite(got).all():
        failures.append(f"{name}: max abs error {err.max().item():.3g} (atol {atol:g})")
    return err.max().item()


def run_one(rank: int, world: int, strategy: str, mask: str, heads: tuple[int, int], dtype: torch.dtype,
            seq_len: int, failures: list[str], group=None, mesh_dim=None, seed_extra=0,
            tag: str = "", block_size: int | None = None) -> float:
    layout = "zigzag" if strategy == "zigzag" else "contiguous"
    seed = _seed(strategy, mask, heads, str(dtype), seq_len, seed_extra)
    (q, k, v, dout), api, ref, ref_grads = make_case(mask, heads, seq_len, dtype, seed)
    locals_ = [ringcompile.shard(t, 2, layout, group, mesh_dim=mesh_dim, seq_len=seq_len).requires_grad_(True)
               for t in (q, k, v)]
    out = ringcompile.ring_attention(*locals_, **api, enable_gqa=True, strategy=strategy, layout=layout,
                                     group=group, mesh_dim=mesh_dim, timeout=30.0, seq_len=seq_len,
                                     block_size=block_size)
    name = f"{tag}{strategy}/{mask}/{'gqa' if heads[0] != heads[1] else 'mha'}/{dtype}/rank{rank}"
    fwd_tol, grad_tol = TOL[dtype]
    resolved = resolve_group(group, mesh_dim)
    n, r = resolved.world_size, resolved.rank
    worst = _compare(name + "/out", out, shard_tensor(ref, 2, n, r, layout, seq_len), fwd_tol, failures)
    out.backward(ringcompile.shard(dout, 2, layout, group, mesh_dim=mesh_dim, seq_len=seq_len))
    for label, t, want in zip("qkv", locals_, ref_grads, strict=True):
        worst = max(worst, _compare(f"{name}/d{label}", t.grad, shard_tensor(want, 2, n, r, layout, seq_len),
                                    grad_tol, failures))
    full_dq = ringcompile.gather(locals_[0].grad, 2, layout, group, seq_len, mesh_dim=mesh_dim)
    _compare(f"{name}/gathered dq", full_dq, ref_grads[0], grad_tol, failures)
    return worst


def combinations_body(rank: int, world: int, seq_len: int) -> dict:
    """Every strategy x mask x {MHA, GQA} x {fp32, bf16}, forward and backward, plus error cases."""
    failures: list[str] = []
    worst = {str(d): 0.0 for d in TOL}
    for strategy in STRATEGIES:
        for mask in MASKS:
            for heads in HEADS.values():
                for dtype in TOL:
                    try:
                        err = run_one(rank, world, strategy, mask, heads, dtype, seq_len, failures)
                        worst[str(dtype)] = max(worst[str(dtype)], err)
                    except Exception as e:  # noqa: BLE001 - reported as a failure of this combination
                        failures.append(f"{strategy}/{mask}/{heads}/{dtype}: {type(e).__name__}: {e}")
    for mask in ("causal", "padding"):  # "auto": the cost model (or the heuristic) picks per call
        run_one(rank, world, "auto", mask, HEADS["gqa"], torch.float32, seq_len, failures)
    failures += _local_strategy_check(rank, seq_len)
    failures += _error_checks(rank, world)
    failures += _timing_check(rank, world, seq_len)
    return {"failures": failures, "worst": worst}


def _local_strategy_check(rank: int, seq_len: int) -> list[str]:
    """'local': every rank passes the full sequence and gets the full answer, no communication."""
    failures: list[str] = []
    case = make_case("causal", HEADS["gqa"], seq_len, torch.float32, _seed("l"))
    (q, k, v, dout), api, ref, ref_grads = case
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = ringcompile.ring_attention(*full, **api, enable_gqa=True, strategy="local")
    _compare(f"local/rank{rank}/out", out, ref, TOL[torch.float32][0], failures)
    out.backward(dout)
    for label, t, want in zip("qkv", full, ref_grads, strict=True):
        _compare(f"local/rank{rank}/d{label}", t.grad, want, TOL[torch.float32][1], failures)
    return failures


def _expect(failures: list[str], name: str, exc_type, needle: str, fn) -> None:
    try:
        fn()
    except exc_type as e:
        if needle not in str(e):
            failures.append(f"{name}: message {str(e)!r} lacks {needle!r}")
        return
    except Exception as e:  # noqa: BLE001
        failures.append(f"{name}: raised {type(e).__name__}: {e}")
        return
    failures.append(f"{name}: no error raised")


def _error_checks(rank: int, world: int) -> list[str]:
    failures: list[str] = []
    g = torch.Generator().manual_seed(3)
    # Ulysses needs query AND kv heads divisible by N
    hq, hkv = (world * 2 + 1, 1) if world > 2 else (3, 1)
    q, k, v = (torch.randn(1, h, 4, 8, generator=g) for h in (hq, hkv, hkv))
    _expect(failures, "ulysses heads", OptionError, "divisible by",
            lambda: ringcompile.ring_attention(q, k, v, enable_gqa=True, strategy="ulysses", timeout=10.0))
    q2, k2, v2 = (torch.randn(1, h, 4, 8, generator=g) for h in (world, world // 2 or 1, world // 2 or 1))
    if (world // 2 or 1) % world:
        _expect(failures, "ulysses kv heads", OptionError, f"kv heads ({world // 2 or 1})",
                lambda: ringcompile.ring_attention(q2, k2, v2, enable_gqa=True, strategy="ulysses",
                                                   timeout=10.0))
    # GQA without enable_gqa, like SDPA
    _expect(failures, "gqa flag", ShapeMismatchError, "enable_gqa",
            lambda: ringcompile.ring_attention(q, k, v, strategy="ring", timeout=10.0))
    # ranks that disagree on the local length: every rank names the odd one, before any ring step
    odd = world - 1
    length = 6 if rank == odd else 4
    q3, k3, v3 = (torch.randn(1, 2, length, 8, generator=g) for _ in range(3))
    _expect(failures, "shape mismatch", ShapeMismatchError, f"rank {odd} has local query length 6",
            lambda: ringcompile.ring_attention(q3, k3, v3, strategy="ring", timeout=10.0))
    # ... and on dtype
    dtype = torch.bfloat16 if rank == 1 else torch.float32
    q4, k4, v4 = (torch.randn(1, 2, 4, 8, generator=g).to(dtype) for _ in range(3))
    _expect(failures, "dtype mismatch", ShapeMismatchError, "rank 1 has dtype torch.bfloat16",
            lambda: ringcompile.ring_attention(q4, k4, v4, strategy="allgather", timeout=10.0))
    # a rank whose own inputs are invalid raises its own error; the others name it at once, not after
    # waiting out the timeout
    kv_len = 3 if rank == odd else 4
    q5, k5, v5 = torch.randn(1, 2, 4, 8, generator=g), *(torch.randn(1, 2, kv_len, 8, generator=g)
                                                        for _ in range(2))
    start = time.monotonic()
    if rank == odd:
        _expect(failures, "invalid local inputs", ShapeMismatchError, "equal local q and k/v lengths",
                lambda: ringcompile.ring_attention(q5, k5, v5, strategy="ring", timeout=20.0))
    else:
        _expect(failures, "peer with invalid inputs", ShapeMismatchError, f"rank {odd} has valid inputs no",
                lambda: ringcompile.ring_attention(q5, k5, v5, strategy="ring", timeout=20.0))
    if time.monotonic() - start > 10.0:
        failures.append("invalid inputs on one rank: the others waited for the timeout")
    # a mismatch on a LATER call (after a call with these shapes succeeded) is still named at once
    q6, k6, v6 = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    ringcompile.ring_attention(q6, k6, v6, strategy="ring", timeout=20.0)
    q7, k7, v7 = (torch.randn(1, 2, 6 if rank == odd else 4, 8, generator=g) for _ in range(3))
    start = time.monotonic()
    _expect(failures, "later-call mismatch", ShapeMismatchError, f"rank {odd} has local query length 6",
            lambda: ringcompile.ring_attention(q7, k7, v7, strategy="ring", timeout=20.0))
    if time.monotonic() - start > 10.0:
        failures.append("later-call mismatch: ranks waited for the timeout")
    # the group still works afterwards
    dist.barrier()
    return failures


def _timing_check(rank: int, world: int, seq_len: int) -> list[str]:
    failures: list[str] = []
    (q, k, v, dout), api, _, _ = make_case("causal", HEADS["mha"], seq_len, torch.float32, _seed("t"))
    locals_ = [ringcompile.shard(t, 2, "zigzag", seq_len=seq_len).requires_grad_(True) for t in (q, k, v)]
    with timing.record() as records:
        out = ringcompile.ring_attention(*locals_, **api, strategy="zigzag", seq_len=seq_len)
        out.backward(ringcompile.shard(dout, 2, "zigzag", seq_len=seq_len))
    phases = sorted(r.phase for r in records)
    if phases != ["backward", "forward"]:
        failures.append(f"timing: expected one forward and one backward record, got {phases}")
    for r in records:
        if len(r.steps) != world or not 0.0 <= r.bubble <= 1.0 or r.compute_s <= 0 or r.total_s <= 0:
            failures.append(f"timing: implausible record {r.as_dict()}")
    return failures


def mesh_and_group_body(rank: int, world: int, seq_len: int) -> dict:
    """A 2-D (dp, sp) DeviceMesh using the sp dimension, and an explicit ProcessGroup."""
    from torch.distributed.device_mesh import init_device_mesh

    failures: list[str] = []
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "sp"))
    dp = mesh.get_local_rank("dp")
    for strategy in ("ring", "zigzag"):
        run_one(rank, world, strategy, "causal", HEADS["gqa"], torch.float32, seq_len, failures, group=mesh,
                mesh_dim="sp", seed_extra=dp, tag=f"mesh(dp={dp})/")
    pg = dist.new_group(list(range(world)))
    run_one(rank, world, "allgather", "padding", HEADS["mha"], torch.float32, seq_len, failures, group=pg,
            tag="explicit-pg/")
    # gather is differentiable: a replicated consumer's gradient comes back as this rank's slice
    g = torch.Generator().manual_seed(dp)
    x, w = torch.randn(3, seq_len, generator=g), torch.randn(3, seq_len, generator=g)
    local = ringcompile.shard(x, 1, "zigzag", mesh, mesh_dim="sp").requires_grad_(True)
    full = ringcompile.gather(local, 1, "zigzag", mesh, seq_len, mesh_dim="sp")
    (full * w).sum().backward()
    if not torch.equal(full.detach(), x):
        failures.append(f"gather(shard(x)) != x on rank {rank}")
    if not torch.equal(local.grad, ringcompile.shard(w, 1, "zigzag", mesh, mesh_dim="sp")):
        failures.append(f"gather backward is not the local slice on rank {rank}")
    return {"failures": failures}


def killed_rank_body(rank: int, world: int, timeout: float, block_size: int | None = None) -> dict:
    """The last rank dies at ring step 1; the others must raise CommunicationError within the timeout.

    With ``block_size`` the K/V travel in chunks, so it dies with chunk transfers in flight."""
    from ringcompile.runtime import communicator

    victim = world - 1
    if rank == victim:
        original = communicator.RingCommunicator.ring_shift

        def dying(self, tensors, step, channel=0, what="K/V"):
            if step == 1:
                os._exit(0)
            return original(self, tensors, step, channel, what)

        communicator.RingCommunicator.ring_shift = dying
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) for _ in range(3))
    start = time.monotonic()
    try:
        ringcompile.ring_attention(q, k, v, strategy="ring", timeout=timeout, block_size=block_size)
    except CommunicationError as e:
        return {"raised": "CommunicationError", "message": str(e), "seconds": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001
        return {"raised": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    return {"raised": None, "seconds": time.monotonic() - start}


def _count_ring_shifts() -> list[tuple[int, int, int]]:
    """Record (step, channel, tokens) of every ring_shift this rank makes (the process is ours alone)."""
    from ringcompile.runtime import communicator

    calls: list[tuple[int, int, int]] = []
    original = communicator.RingCommunicator.ring_shift

    def counting(self, tensors, step, channel=0, what="K/V"):
        calls.append((step, channel, tensors[0].shape[2]))
        return original(self, tensors, step, channel, what)

    communicator.RingCommunicator.ring_shift = counting
    return calls


def _expected_shifts(world: int, local: int, chunk: int) -> list[tuple[int, int, int]]:
    """Forward + backward ring_shift calls of a chunked ring: (step, channel, chunk tokens), sorted."""
    spans = [(lo, min(lo + chunk, local)) for lo in range(0, local, chunk)]
    kv = [(s, 2 * j, hi - lo) for s in range(world - 1) for j, (lo, hi) in enumerate(spans)]
    grads = [(s, 2 * j + 1, hi - lo) for s in range(world) for j, (lo, hi) in enumerate(spans)]
    return sorted(kv + kv + grads)


def chunked_body(rank: int, world: int, seq_len: int, block_size: int) -> dict:
    """Ring and zigzag with K/V travelling in ``block_size``-token chunks (not dividing the shard):
    {none, causal, sliding} x {MHA, GQA}, forward and backward against float64, and the exact
    chunked transfers made; then strategy "auto" running the chunk the (patched) planner chose."""
    from types import SimpleNamespace

    from ringcompile.cost_model import planner

    failures: list[str] = []
    calls = _count_ring_shifts()
    for strategy in ("ring", "zigzag"):
        layout = "zigzag" if strategy == "zigzag" else "contiguous"
        local = shard_tensor(torch.empty(1, 1, seq_len, 1), 2, world, rank, layout, seq_len).shape[2]
        for mask in ("none", "causal", "sliding"):
            for name, heads in HEADS.items():
                calls.clear()
                try:
                    run_one(rank, world, strategy, mask, heads, torch.float32, seq_len, failures,
                            seed_extra=("chunked", block_size), tag=f"chunk={block_size}/",
                            block_size=block_size)
                except Exception as e:  # noqa: BLE001 - reported as a failure of this combination
                    failures.append(f"chunk={block_size}/{strategy}/{mask}/{name}: {type(e).__name__}: {e}")
                    continue
                want = _expected_shifts(world, local, block_size)
                if sorted(calls) != want:
                    failures.append(f"chunk={block_size}/{strategy}/{mask}/{name}/rank{rank}: ring_shift "
                                    f"calls {sorted(calls)} != {want}")
    # strategy "auto", no block_size: the plan's chunk is what runs
    real = planner.choose_for_call
    planner.choose_for_call = lambda **kw: SimpleNamespace(strategy="ring", layout="contiguous", block_size=3,
                                                           tiles={"BLOCK_M": 16, "BLOCK_N": 16})
    try:
        calls.clear()
        run_one(rank, world, "auto", "causal", HEADS["gqa"], torch.float32, seq_len, failures,
                tag="auto-plan/")
        local = shard_tensor(torch.empty(1, 1, seq_len, 1), 2, world, rank, "contiguous", seq_len).shape[2]
        if sorted(calls) != _expected_shifts(world, local, 3):
            failures.append(f"auto/rank{rank}: the plan's 3-token chunk did not run: {sorted(calls)}")
    finally:
        planner.choose_for_call = real
    return {"failures": failures}
