"""bfloat16 ring attention error against float64, as the ring grows (issue 3 precision table).

    python benchmarks/precision.py                  # N = 1, 2, 4, 8; ring and zigzag; S = 2048
    python benchmarks/precision.py --seq 512 --world-sizes 1,8

Runs the simulated ring (``ringcompile.runtime.simulated``: N virtual ranks in one process, the
real strategy and merge code) on bfloat16 inputs, causal, forward and backward, and compares
output and gradients with float64 eager attention on the same (bf16-valued) inputs. Partial
results merge in fp32, so the error must not grow with N; the table shows it does not.
Metric: relative RMS error ||x - ref|| / ||ref|| (and the max abs error of the output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ringcompile import mods
from ringcompile.kernels.reference import attention_reference
from ringcompile.runtime.simulated import simulated_ring_attention


def _rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double() - ref).norm() / ref.norm())


def measure(
    world_sizes=(1, 2, 4, 8), strategies=("ring", "zigzag"), seq: int = 2048, heads: int = 4,
    kv_heads: int = 2, dim: int = 64, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    """One row per (strategy, N): relative RMS errors of out, dq, dk, dv against float64."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, dim, generator=gen).to(dtype)
    k = torch.randn(1, kv_heads, seq, dim, generator=gen).to(dtype)
    v = torch.randn(1, kv_heads, seq, dim, generator=gen).to(dtype)
    dout = torch.randn(1, heads, seq, dim, generator=gen).to(dtype)
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    ref = attention_reference(q64, k64, v64, mask=mods.causal())
    ref.backward(dout.double())
    rows = []
    for strategy in strategies:
        for n in world_sizes:
            qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
            out = simulated_ring_attention(qr, kr, vr, world_size=n, strategy=strategy, is_causal=True,
                                           enable_gqa=kv_heads != heads)
            out.backward(dout)
            rows.append({
                "strategy": strategy, "world_size": n, "dtype": str(dtype).removeprefix("torch."),
                "out_rel_rms": _rel_rms(out, ref.detach()),
                "out_max_abs": float((out.detach().double() - ref.detach()).abs().max()),
                "dq_rel_rms": _rel_rms(qr.grad, q64.grad), "dk_rel_rms": _rel_rms(kr.grad, k64.grad),
                "dv_rel_rms": _rel_rms(vr.grad, v64.grad),
            })
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dtype | strategy | N | out rel. RMS | out max abs | dq rel. RMS | dk rel. RMS "
             "| dv rel. RMS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['strategy']} | {r['world_size']} | {r['out_rel_rms']:.2e} | "
                     f"{r['out_max_abs']:.2e} | {r['dq_rel_rms']:.2e} | {r['dk_rel_rms']:.2e} | "
                     f"{r['dv_rel_rms']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--world-sizes", default="1,2,4,8")
    ap.add_argument("--strategies", default="ring,zigzag")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.dtypes.split(","):
        rows += measure(tuple(int(n) for n in args.world_sizes.split(",")), tuple(args.strategies.split(",")),
                        args.seq, args.heads, args.kv_heads, args.dim, args.seed, getattr(torch, name))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
