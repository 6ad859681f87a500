"""Peak memory of single-device attention: eager (S x S scores) vs compiled with backend="ring".

Each case runs in a fresh subprocess so ``ru_maxrss`` (the peak resident set size) belongs to
that case alone. Prints one JSON object with a row per case.

    python benchmarks/memory_single_device.py                       # S=16384, B=1, H=4, D=64, causal fp32
    python benchmarks/memory_single_device.py --seq 4096 --heads 2
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

CASES = ("eager_handwritten", "eager_sdpa", "ring_compiled")


def attention(q, k, v):
    """nanoGPT-style causal attention: builds the S x S score matrix in eager mode."""
    import torch

    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    n = q.shape[-2]
    s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_case(case: str, batch: int, heads: int, seq: int, dim: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))
    if case == "eager_handwritten":
        fn = attention
    elif case == "eager_sdpa":
        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif case == "ring_compiled":
        fn = torch.compile(attention, backend="ring", options={"inner": "eager"})
    else:
        raise SystemExit(f"unknown case {case!r}; choose from {CASES}")
    before = _rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(q, k, v)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = {"case": case, "batch": batch, "heads": heads, "seq": seq, "dim": dim, "dtype": "float32",
           "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
           "peak_increase_mb": round(peak - before, 1), "seconds": round(seconds, 2),
           "out_checksum": float(out.double().sum())}
    if case == "ring_compiled":
        from ringcompile import backend

        row["rewritten"] = backend.rewritten_op_count(backend.HISTORY[-1].graph)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.batch, args.heads, args.seq, args.dim)))
        return 0
    rows = []
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--one", case, "--seq", str(args.seq), "--batch", str(args.batch),
               "--heads", str(args.heads), "--dim", str(args.dim)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            rows.append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps({"machine": "2-core CPU VM, torch " + __import__("torch").__version__, "rows": rows},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
