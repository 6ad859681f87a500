"""Flash-decoding across ranks (runtime/decode.py) against float64 attention on the whole cache:
simulated ranks for the combinations (N = 1..4, batch 2, left padding, GQA, sliding window, one query
and a chunk of queries with causal offsets, fp32 / bf16, both append policies), gloo ranks at N = 4 for
the real collectives (N = 2 gloo: the sharded generate test), and the cross-rank checks that must fire
before any data moves."""

from __future__ import annotations

import decode_bodies
import pytest
import torch
from decode_cases import TOL, chunk_shards, make_case, reference
from hypothesis import given, settings
from hypothesis import strategies as st
from ring_harness import run_ranks

from ringcompile.errors import ShapeMismatchError
from ringcompile.runtime import decode
from ringcompile.runtime.chunk_prefill import chunk_attention
from ringcompile.runtime.decode import decode_attention, decode_partials, shard_visible
from ringcompile.runtime.simulated import simulate


def _run(case, world, *, edit=None, **kw):
    def rank(comm):
        k, v, slots = case.shard(comm.rank)
        q = case.q
        if edit is not None:
            q, k, v, slots = edit(comm.rank, q, k, v, slots)
        out, lse, computed = decode_partials(comm, q, k, v, slots, case.q_slots, key_padding=case.key_padding,
                                             window=case.window, layout=case.layout, **kw)
        return out.to(case.q.dtype), computed
    return simulate(rank, world, timeout=20.0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("q_len", [1, 6])
@pytest.mark.parametrize("kw", [dict(), dict(window=5), dict(heads=(6, 1), policy="round_robin"),
                                dict(dtype=torch.bfloat16, prefill_layout="zigzag"),
                                dict(left_pad=False, heads=(3, 3), batch=3)],
                         ids=["gqa-leftpad", "window", "mqa-roundrobin", "bf16-zigzag", "mha-b3"])
def test_matches_float64_on_simulated_ranks(world, q_len, kw):
    case = make_case(hash((world, q_len, repr(kw))) % 10_000, world, q_len=q_len, prefill=15,
                     appended=q_len + 2, **kw)
    want = reference(case)
    results = _run(case, world)
    for r, (out, _) in enumerate(results):
        err = (out.double() - want).abs().max().item()
        assert err <= TOL[case.q.dtype], (r, err)
        assert torch.equal(out, results[0][0])          # every rank returns the same output


def test_ranks_outside_the_window_skip_compute_but_join_the_merge():
    world = 4
    case = make_case(3, world, q_len=1, prefill=40, appended=0, window=12, left_pad=False)
    case.layout = type(case.layout)(world, 40, "contiguous", "shortest")   # rank r holds [10r, 10r+10)
    results = _run(case, world)
    assert [c for _, c in results] == [False, False, True, True]            # query at slot 39 sees [28, 39]
    err = (results[0][0].double() - reference(case)).abs().max().item()
    assert err <= TOL[torch.float32]
    assert shard_visible(0, 9, 39, 39, 6) is False and shard_visible(30, 39, 39, 39, 6) is True
    assert shard_visible(20, 29, 10, 15, None) is False                   # all in the future


def test_long_shard_is_merged_in_key_blocks(monkeypatch):
    monkeypatch.setattr(decode, "KEY_BLOCK", 4)
    monkeypatch.setattr(decode, "TILE_ELEMENTS", 1)
    case = make_case(5, 2, q_len=3, prefill=21, appended=3, window=9)
    results = _run(case, 2)
    assert (results[0][0].double() - reference(case)).abs().max().item() <= TOL[torch.float32]


def test_single_process_needs_no_group():
    case = make_case(9, 1, q_len=2)
    k, v, slots = case.shard(0)
    out = decode_attention(case.q, k, v, kv_slots=slots, q_slots=case.q_slots, key_padding=case.key_padding)
    assert (out.double() - reference(case)).abs().max().item() <= TOL[torch.float32]


def _drop_last(victim):
    def edit(rank, q, k, v, slots):
        return (q, k[:, :, :-1], v[:, :, :-1], slots[:-1]) if rank == victim else (q, k, v, slots)
    return edit


@pytest.mark.parametrize("edit, pattern", [
    (_drop_last(2), r"rank 2 holds \d+ cache entries"),
    (lambda r, q, k, v, s: (q, k.double(), v.double(), s) if r == 1 else (q, k, v, s),
     r"rank 1.*(dtype|valid inputs)"),
    (lambda r, q, k, v, s: (q[:, :, :0], k, v, s) if r == 0 else (q, k, v, s), r"rank 0"),
])
def test_disagreeing_shards_raise_naming_the_rank(edit, pattern):
    case = make_case(11, 3, q_len=1)
    with pytest.raises(ShapeMismatchError, match=pattern):
        _run(case, 3, edit=edit)


def test_lengths_that_do_not_sum_to_the_cache_without_a_layout():
    case = make_case(12, 2, q_len=1)
    case_no_layout = case

    def rank(comm):
        k, v, slots = case_no_layout.shard(comm.rank)
        if comm.rank == 0:
            k, v, slots = k[:, :, 1:], v[:, :, 1:], slots[1:]
        return decode_partials(comm, case.q, k, v, slots, case.q_slots)
    with pytest.raises(ShapeMismatchError, match="sum to"):
        simulate(rank, 2, timeout=20.0)


@pytest.mark.multirank
@pytest.mark.parametrize("world", [4])   # 2 gloo ranks: tests/models/test_generate_sharded.py decodes there
def test_gloo_ranks(world):
    results = run_ranks(decode_bodies.cases_body, world, 120.0, pg_timeout=30.0)
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("method", ["pass_q", "pass_kv", "auto"])
@pytest.mark.parametrize("kw", [dict(), dict(window=7, heads=(4, 1)),
                                dict(dtype=torch.float64, policy="round_robin")],
                         ids=["gqa-leftpad", "window-mqa", "fp64-round_robin"])
def test_sharded_chunk_against_sharded_cache(world, method, kw):
    """Chunked prefill: a 7-token chunk (not a multiple of N) sharded over the ranks attends the
    prefill cache plus itself (shards of unequal length); both methods (pass-KV: the ring) equal
    float64 on every rank's rows."""
    case = make_case(21 + world, world, q_len=7, prefill=12, appended=7, **kw)
    want = reference(case)

    def rank(comm):
        q, q_slots, k, v, slots = chunk_shards(case, world, comm.rank)
        out = chunk_attention(q, k, v, q_slots=q_slots, kv_slots=slots, cache_len=case.cache_len,
                              method=method, key_padding=case.key_padding, window=case.window, comm=comm)
        return out, q_slots

    c0 = case.cache_len - case.q.shape[2]
    for out, q_slots in simulate(rank, world, timeout=20.0):
        rows = q_slots >= 0
        got, ref = out[:, :, rows].double(), want[:, :, q_slots[rows] - c0]
        assert (got - ref).abs().max().item() <= TOL[case.q.dtype]
        assert (out[:, :, ~rows] == 0).all()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("method", ["pass_q", "pass_kv"])
def test_chunk_with_the_models_own_mask_equals_padding_and_window(world, method):
    """A model's boolean mask over global slots (``slot_mask``, this rank's rows; how a compiled
    graph's HF mask reaches ``chunk_cache_attention``) in place of key_padding + window: same float64
    answer; under pass-Q the mask rows travel with the queries."""
    case = make_case(40 + world, world, q_len=7, prefill=12, appended=7, window=6, heads=(4, 2))
    want = reference(case)
    T = case.cache_len

    def rank(comm):
        q, q_slots, k, v, slots = chunk_shards(case, world, comm.rank)
        t = torch.arange(T)
        keep = (q_slots.view(-1, 1) - t.view(1, -1) < case.window) & case.key_padding.bool().view(-1, 1, T)
        out = chunk_attention(q, k, v, q_slots=q_slots, kv_slots=slots, cache_len=T, method=method,
                              slot_mask=keep.unsqueeze(1), comm=comm)
        return out, q_slots

    c0 = T - case.q.shape[2]
    for out, q_slots in simulate(rank, world, timeout=20.0):
        rows = q_slots >= 0
        got, ref = out[:, :, rows].double(), want[:, :, q_slots[rows] - c0]
        assert (got - ref).abs().max().item() <= TOL[case.q.dtype]


@pytest.mark.parametrize("world", [2, 4])
def test_pass_kv_rotates_the_shards_and_overlaps_each_transfer_with_compute(world, monkeypatch):
    """pass-KV is a ring: N - 1 shard transfers and no cache all_gather; the transfer of step s starts
    before step s's attention and is waited for after it (the training ring's overlap)."""
    import threading

    from ringcompile.runtime import chunk_prefill

    case = make_case(31, world, q_len=8, prefill=16, appended=8)
    logs: dict[int, list[str]] = {}
    attend = chunk_prefill.local_partial

    def logged_partial(*args, **kw):
        logs[threading.get_ident()].append("compute")
        return attend(*args, **kw)

    monkeypatch.setattr(chunk_prefill, "local_partial", logged_partial)

    def rank(comm):
        log = logs.setdefault(threading.get_ident(), [])
        shift, gather = comm.ring_shift, comm.all_gather

        def logged_shift(tensors, step, channel=0, what="K/V"):
            log.append(f"send {step}")
            pending = shift(tensors, step, channel, what)
            wait = pending.wait

            def logged_wait():
                log.append(f"wait {step}")
                return wait()
            pending.wait = logged_wait
            return pending

        def logged_gather(tensor, step=0, what="all_gather"):
            log.append(f"gather {what}")
            return gather(tensor, step, what)

        comm.ring_shift, comm.all_gather = logged_shift, logged_gather
        q, q_slots, k, v, slots = chunk_shards(case, world, comm.rank)
        chunk_attention(q, k, v, q_slots=q_slots, kv_slots=slots, cache_len=case.cache_len, method="pass_kv",
                        key_padding=case.key_padding, comm=comm)
        return list(log)

    ring = [e for s in range(world - 1) for e in (f"send {s}", "compute", f"wait {s}")] + ["compute"]
    for log in simulate(rank, world, timeout=20.0):
        assert log == ["gather decode metadata check"] + ring, log


def test_chunk_method_choice_follows_bytes_moved():
    from ringcompile.cost_model.decode import choose_chunk_method
    # a short chunk against a long cache: the queries travel; a long chunk on a short cache: the cache does
    assert choose_chunk_method(q_len=128, cache_len=32768, heads=32, kv_heads=8, head_dim=128) == "pass_q"
    assert choose_chunk_method(q_len=32768, cache_len=4096, heads=32, kv_heads=8, head_dim=128) == "pass_kv"


@pytest.mark.parametrize("backend", ["ring"])
def test_custom_op_compiles_once_for_every_cache_length(backend):
    """The op under torch.compile: a growing cache (dynamic size) reuses one graph; results equal float64."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from ringcompile.runtime.decode_op import decode_attention_op

    def step(q, k, v, slots, q_slots, mask):
        return decode_attention_op(q * 1.0, k, v, slots, q_slots, mask, k.shape[2], -1, q.shape[-1] ** -0.5,
                                   "single", 10.0, []) + 0.0

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    for T in range(9, 15):
        case = make_case(T, 1, q_len=1, prefill=T - 1, appended=1)
        k, v, slots = case.shard(0)
        keep = case.key_padding.view(2, 1, 1, -1)
        out = compiled(case.q, k, v, slots, case.q_slots, keep)
        assert (out.double() - reference(case)).abs().max().item() <= TOL[torch.float32]
    assert counter.frame_count == 1


@settings(max_examples=25, deadline=None)
@given(world=st.integers(2, 4), owners_seed=st.integers(0, 10_000), q_len=st.integers(1, 4),
       window=st.one_of(st.none(), st.integers(1, 12)))
def test_any_partition_of_the_cache_merges_to_the_same_answer(world, owners_seed, q_len, window):
    """Slots dealt to ranks at random (some ranks empty, shards out of order): the merge does not depend
    on the layout, only on which slots exist."""
    case = make_case(owners_seed, world, q_len=q_len, prefill=10, appended=q_len + 1, window=window)
    g = torch.Generator().manual_seed(owners_seed)
    owner = torch.randint(0, world, (case.cache_len,), generator=g)
    owner[owner == world - 1] = 0                                   # the last rank holds nothing

    def rank(comm):
        slots = torch.nonzero(owner == comm.rank).flatten()
        slots = slots[torch.randperm(slots.numel(), generator=torch.Generator().manual_seed(comm.rank))]
        return decode_partials(comm, case.q, case.k[:, :, slots], case.v[:, :, slots], slots, case.q_slots,
                               key_padding=case.key_padding, window=window)[0]
    for out in simulate(rank, world, timeout=20.0):
        assert (out.double() - reference(case)).abs().max().item() <= TOL[torch.float32]


def _additive_mask(case, seed: int) -> torch.Tensor:
    """HF's eager 4-D mask over the whole (preallocated, longer) cache: 0 where kept, finfo.min at left
    padding, plus a random per-head bias so the values are really added (not just thresholded)."""
    B, H, Sq, T = case.q.shape[0], case.q.shape[1], case.q.shape[2], case.cache_len
    g = torch.Generator().manual_seed(seed)
    mask = torch.randn(B, H, Sq, T + 3, generator=g)          # 3 preallocated slots past the cache
    pad = torch.nn.functional.pad(case.key_padding, (0, 3), value=True)
    return mask.masked_fill(~pad.view(B, 1, 1, T + 3), torch.finfo(torch.float32).min)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("q_len", [1, 4])
def test_additive_float_mask_with_left_padding_matches_float64(world, q_len):
    case = make_case(40 + world + q_len, world, q_len=q_len, prefill=15, appended=q_len + 2)
    mask = _additive_mask(case, world)
    q, k, v = (t.double() for t in (case.q, case.k, case.v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    T = case.cache_len
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask[..., :T].double()
    causal = torch.arange(T).view(1, -1) <= case.q_slots.view(-1, 1)
    want = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v

    def rank(comm):
        ks, vs, slots = case.shard(comm.rank)
        out, _, _ = decode_partials(comm, case.q, ks, vs, slots, case.q_slots, layout=case.layout,
                                    slot_mask=mask)
        return out
    for r, out in enumerate(simulate(rank, world, timeout=20.0)):
        assert (out.double() - want).abs().max().item() <= TOL[torch.float32], r


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "float-neg-inf"])
def test_ranks_the_models_window_mask_hides_skip_compute(additive):
    """A compiled Mistral passes its sliding window inside HF's mask (window=None): ranks whose shard the
    mask hides wholly skip their compute, and the merge still equals float64 with the window."""
    world = 4
    case = make_case(7, world, q_len=1, prefill=40, appended=0, window=12, left_pad=False)
    case.layout = type(case.layout)(world, 40, "contiguous", "shortest")   # rank r holds [10r, 10r+10)
    slots = torch.arange(case.cache_len + 2)                               # 2 preallocated slots more
    keep = (slots <= case.q_slots.view(-1, 1)) & (case.q_slots.view(-1, 1) - slots < 12)
    mask = keep.view(1, 1, 1, -1).expand(case.q.shape[0], 1, 1, -1)
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))

    def rank(comm):
        k, v, kv_slots = case.shard(comm.rank)
        out, _, computed = decode_partials(comm, case.q, k, v, kv_slots, case.q_slots, layout=case.layout,
                                           slot_mask=mask)
        return out, computed
    results = simulate(rank, world, timeout=20.0)
    assert [c for _, c in results] == [False, False, True, True]
    for out, _ in results:
        assert (out.double() - reference(case)).abs().max().item() <= TOL[torch.float32]
