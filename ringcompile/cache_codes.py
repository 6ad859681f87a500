"""How a compiled graph states a KV-cache layout as ints.

The decode rule (``passes/rules/decode.py``) writes them into ``decode_attention`` calls and the
runtime's op reads them back, so both sides share these tables without the passes importing the
runtime (passes reach it only through graph ops).
"""

from __future__ import annotations

from .options import LAYOUTS

POLICIES = ("shortest", "round_robin")
COMPILED_PREFILL_LAYOUT = "contiguous"  # a compiled cache's prefill layout when none is named (older callers)
COMPILED_POLICY = "round_robin"  # the owner of an appended slot needs no history: t mod N


def causal_layout(seq_len: int, world: int) -> str:
    """The sequence layout the planner gives causal attention over ``seq_len`` static tokens on ``world``
    ranks with default options (``passes.shard.choose_layout``): zigzag when 2N divides the length (equal
    causal work per rank, no padding), else contiguous. A compiled sharded KV cache stores its prefill in
    this layout too, so the prefill graph's sharded K/V are this rank's cache slots as they are."""
    return "zigzag" if seq_len % (2 * world) == 0 else "contiguous"


def layout_code(prefill_len: int, prefill_layout: str, policy: str) -> list[int]:
    """A cache layout as the op's int list: [prefill_len, layout index, policy index]."""
    return [int(prefill_len), LAYOUTS.index(prefill_layout), POLICIES.index(policy)]


def layout_from_code(code: list[int]) -> tuple[int, str, str]:
    """The inverse of ``layout_code``: (prefill_len, prefill layout, policy)."""
    return int(code[0]), LAYOUTS[code[1]], POLICIES[code[2]]
