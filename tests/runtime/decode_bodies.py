"""What each spawned gloo rank runs in the decode tests (importable by the spawned processes)."""

from __future__ import annotations

import torch
from decode_cases import TOL, chunk_shards, make_case, reference

from ringcompile.errors import ShapeMismatchError
from ringcompile.runtime.chunk_prefill import chunk_attention
from ringcompile.runtime.decode import decode_attention

DIM_SCALE = 8 ** -0.5   # make_case's head dim 8
CASES = [  # (name, make_case keywords)
    ("decode/gqa/leftpad", dict(q_len=1)),
    ("decode/window", dict(q_len=1, window=4, prefill=17, appended=4)),
    ("decode/bf16/zigzag", dict(q_len=1, dtype=torch.bfloat16, prefill_layout="zigzag")),
    ("chunk/causal-offsets", dict(q_len=5, appended=6)),
    ("chunk/window/round_robin", dict(q_len=4, appended=5, window=6, policy="round_robin")),
]


def cases_body(rank: int, world: int) -> dict:
    failures = []
    for i, (name, kw) in enumerate(CASES):
        case = make_case(100 + i, world, **kw)
        k, v, slots = case.shard(rank)
        out = decode_attention(case.q, k, v, kv_slots=slots, q_slots=case.q_slots,
                               key_padding=case.key_padding, window=case.window, layout=case.layout,
                               timeout=30.0)
        err = (out.double() - reference(case)).abs().max().item()
        if not err <= TOL[case.q.dtype]:
            failures.append(f"{name} rank {rank}/{world}: max error {err:.3g}")
    case = make_case(50, world, q_len=7, prefill=12, appended=7, window=9)
    want = reference(case)
    q, q_slots, k, v, slots = chunk_shards(case, world, rank)
    rows = q_slots >= 0
    for method in ("pass_q", "pass_kv"):
        out = chunk_attention(q, k, v, q_slots=q_slots, kv_slots=slots, cache_len=case.cache_len,
                              method=method, key_padding=case.key_padding, window=case.window, timeout=30.0)
        err = 0.0
        if rows.any():
            err = (out[:, :, rows].double() - want[:, :, q_slots[rows] - 12]).abs().max().item()
        if not err <= TOL[torch.float32]:
            failures.append(f"chunk {method} rank {rank}/{world}: max error {err:.3g}")
    # the custom op a compiled decode graph calls, over the default group with the layout as ints
    from ringcompile.runtime.decode_op import decode_attention_op, layout_ints

    case = make_case(60, world, q_len=1, window=5)
    k, v, slots = case.shard(rank)
    keep = case.key_padding.view(case.q.shape[0], 1, 1, -1)
    out = decode_attention_op(case.q, k, v, slots, case.q_slots, keep, case.cache_len, 5, DIM_SCALE,
                              "default", 30.0, layout_ints(case.layout))
    err = (out.double() - reference(case)).abs().max().item()
    if not err <= TOL[torch.float32]:
        failures.append(f"custom op rank {rank}/{world}: max error {err:.3g}")
    # a rank that skipped the last append: every rank raises before the merge, naming it
    case = make_case(7, world, q_len=1)
    k, v, slots = case.shard(rank)
    if rank == world - 1:
        k, v, slots = k[:, :, :-1], v[:, :, :-1], slots[:-1]
    try:
        decode_attention(case.q, k, v, kv_slots=slots, q_slots=case.q_slots, layout=case.layout, timeout=30.0)
        failures.append(f"rank {rank}: skipped append not detected")
    except ShapeMismatchError as e:
        if f"rank {world - 1} holds" not in str(e):
            failures.append(f"rank {rank}: message does not name rank {world - 1}: {e}")
    return {"failures": failures}
