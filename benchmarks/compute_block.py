"""Whole chunks vs 512-token block pairs for the CPU kernels, per mask: time and peak memory.

Why ``runtime.strategies.common.compute_block`` hands the CPU kernels whole chunks only on
their fused path (no mask or causal): elsewhere a mask or score tile is materialised per
block pair, so whole chunks cost memory (and often time). One process, one thread, one
fwd+bwd of ``local_forward``/``local_backward`` per (mask, block), each in a fresh child
process so peak RSS is its own. Usage::

    python benchmarks/compute_block.py [--seq 4096] [--blocks 512,4096]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

import torch

KINDS = ("none", "causal", "sliding", "padding", "document", "alibi")


def _spec_and_extras(kind: str, seq: int):
    from ringcompile import mods
    from ringcompile.spec import AttentionSpec

    mask, score, extras, score_extras = None, None, [], []
    if kind == "causal":
        mask = mods.causal()
    elif kind == "sliding":
        mask = mods.sliding_window(256)
    elif kind == "padding":
        mask, extras = mods.key_padding(), [torch.rand(1, seq) > 0.2]
    elif kind == "document":
        doc = torch.arange(seq) // 700
        mask = mods.from_callable(lambda b, h, qi, kv: doc[qi] == doc[kv], is_mask=True)
    elif kind == "alibi":
        mask, score, score_extras = mods.causal(), mods.alibi(), [torch.rand(8)]
    return AttentionSpec(mask=mask, score=score), extras, score_extras


def _one(kind: str, block: int, seq: int, out: mp.Queue) -> None:
    from ringcompile.kernels.select import block_kernels
    from ringcompile.runtime.local import local_backward, local_forward

    torch.set_num_threads(1)
    spec, extras, score_extras = _spec_and_extras(kind, seq)
    kernels = block_kernels(spec, torch.device("cpu"))
    q, k, v, dout = (torch.randn(1, 8, seq, 64) for _ in range(4))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    o, lse = local_forward(q, k, v, extras, score_extras, seq, spec, block=block, kernels=kernels)
    local_backward(dout, q, k, v, o, lse, extras, score_extras, seq, spec, block=block, kernels=kernels)
    elapsed = time.perf_counter() - t0
    out.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--blocks", default="512,4096")
    args = parser.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",")]
    ctx = mp.get_context("spawn")
    print(f"| mask | {' | '.join(f'block {b}: s / MB' for b in blocks)} |")
    print("|---|" + "---|" * len(blocks))
    for kind in KINDS:
        cells = []
        for block in blocks:
            queue = ctx.Queue()
            proc = ctx.Process(target=_one, args=(kind, block, args.seq, queue))
            proc.start()
            elapsed, mb = queue.get(timeout=600)
            proc.join()
            cells.append(f"{elapsed:.2f} / {mb:.0f}")
        print(f"| {kind} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
