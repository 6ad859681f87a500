"""Validate ``ringcompile.estimate_memory``: estimated vs measured per-rank activation memory.

For each model x sequence length x world size, N gloo CPU ranks compile the model with
``backend="ring"`` (inner eager), run one step to compile, and count the bytes autograd saves
for backward in a second forward (distinct storages, parameters excluded: they are the
``parameters`` term). The estimate comes from ``estimate_memory`` in this process, on fake
tensors, without any rank. Target: |error| <= 15%.

    python benchmarks/memory_estimate.py [--seqs 256 512 1024] [--worlds 1 2 4] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from ringcompile.cost_model.whole_model import estimate_memory
from ringcompile.demo import activation_bytes
from ringcompile.models import ModelConfig, build_model
from ringcompile.runtime.spawned_ranks import exit_rank, free_port, run_spawned

CFG = ModelConfig(vocab=128, dim=64, layers=2, heads=4, kv_heads=2, max_seq=8192)


def _model(name: str) -> torch.nn.Module:
    kv = CFG.kv_heads if name == "llama" else CFG.heads
    return build_model(name, ModelConfig(**{**CFG.__dict__, "kv_heads": kv}), seed=0)


def rank_main(rank: int, world: int, port: int, name: str, seq: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    model = _model(name)
    ids = torch.randint(0, CFG.vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    compiled(ids, ids)[1].backward()
    (_, loss), nbytes = activation_bytes(lambda: compiled(ids, ids), list(model.parameters()))
    loss.backward()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"measured": nbytes}, f)
    dist.barrier()
    exit_rank(0)


def measure(name: str, seq: int, world: int) -> int:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        if not run_spawned(rank_main, (world, free_port(), name, seq, path), world, timeout=600):
            raise RuntimeError(f"{name} S={seq} N={world}: ranks did not finish")
        with open(path) as f:
            return json.load(f)["measured"]
    finally:
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["llama", "gpt2"])
    p.add_argument("--seqs", nargs="+", type=int, default=[256, 512, 1024])
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    total = len(args.models) * len(args.seqs) * len(args.worlds)
    print(f"{'model':<6} {'S':>6} {'N':>2} {'estimated':>12} {'measured':>12} {'error':>7}")
    for name in args.models:
        example = torch.randint(0, CFG.vocab, (1, 16))
        for seq in args.seqs:
            for world in args.worlds:
                t0 = time.perf_counter()
                est = estimate_memory(_model(name), example, example, world_size=world, seq_len=seq,
                                      options={"inner": "eager"})
                measured = measure(name, seq, world)
                err = est.terms["activations"] / measured - 1
                rows.append({"model": name, "seq": seq, "world": world, "estimated": est.terms["activations"],
                             "measured": measured, "error": err})
                print(f"{name:<6} {seq:>6} {world:>2} {est.terms['activations']:>12,} {measured:>12,} "
                      f"{err:>+7.1%}   [{len(rows)}/{total}, {time.perf_counter() - t0:.0f} s]", flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.1%} (target <= 15%)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "worst": worst, "date": datetime.date.today().isoformat()}, f, indent=1)
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
