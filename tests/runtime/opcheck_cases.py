"""Cases for test_collective_opcheck.py, importable in spawned ranks: ``torch.library.opcheck`` on every
sharding collective (schema and aliasing, fake tensor, autograd registration, AOT dispatch) on small inputs,
on 2 gloo ranks (the ops read the group; both ranks call them in the same order), and no collective's
output is a view of any tensor (autograd refuses an in-place write into a view made inside a custom op
with its own backward, and an undeclared alias of an input is forbidden by torch.library)."""

from __future__ import annotations

import torch

from ringcompile.runtime import collectives  # noqa: F401 - registers the ops

ops = torch.ops.ringcompile
T = 30.0


def _calls(world: int) -> list[tuple[str, object, tuple]]:
    """(name, op, args) for each collective, with a float64 input that requires grad where it has one."""
    g = torch.Generator().manual_seed(3)

    def x(*shape, grad: bool = True):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(grad)

    padded, seq = 8, 7
    local = padded // world
    return [
        ("to_local", ops.to_local.default, (x(2, seq, 3), 1, 1, seq, padded, "contiguous", "default", T)),
        ("to_local_inner", ops.to_local.default, (x(2, 2 * 8, 3), 1, 2, 8, 8, "zigzag", "default", T, -1.0)),
        # slice_seq / scatter_local / shift_seq_backward run inside other ops' backward: no autograd
        ("slice_seq", ops.slice_seq.default, (x(2, seq, 3, grad=False), 1, 1, seq, padded, "zigzag",
                                              "default")),
        ("scatter_local", ops.scatter_local.default, (x(2, local, 3, grad=False), 1, 1, seq, padded,
                                                      "contiguous", "default")),
        ("scatter_local_unpadded", ops.scatter_local.default, (x(2, local, 3, grad=False), 1, 1, padded,
                                                               padded, "zigzag", "default")),
        ("gather_seq", ops.gather_seq.default, (x(2, local, 3), 1, 1, seq, padded, "zigzag", "default", T)),
        ("gather_seq_unpadded", ops.gather_seq.default, (x(2, local, 3), 1, 1, padded, padded, "contiguous",
                                                         "default", T)),
        ("reduce_partial", ops.reduce_partial.default, (x(2, 3), "default", T)),
        ("grad_reduce", ops.grad_reduce.default, (x(2, 3), "default", T)),
        ("gather_rows", ops.gather_rows.default, (x(2, local, 3), 1, 2, 5, padded, "contiguous", "default",
                                                  T)),
        ("shift_seq", ops.shift_seq.default, (x(2, local, 3), 1, 1, padded, "zigzag", "default", T)),
        ("shift_seq_backward", ops.shift_seq_backward.default, (x(2, local, 3, grad=False), 1, 1, padded,
                                                                "zigzag", "default", T)),
    ]


def case_opcheck(rank: int, world: int) -> dict:
    """{op: "ok" | the failure} for opcheck, and {op: True} where an output is a view of anything."""
    out: dict = {"opcheck": {}, "views": {}}
    for name, op, args in _calls(world):
        try:
            torch.library.opcheck(op, args)
            out["opcheck"][name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported to the parent test
            out["opcheck"][name] = f"{type(exc).__name__}: {exc}"[:600]
        with torch.no_grad():
            res = op(*args)
        out["views"][name] = res._base is not None
    return out
