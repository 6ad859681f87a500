"""Cost of the dead-row second pass: bias form on the dead batch rows only vs on every row (issue 10).

    python benchmarks/dead_rows.py                       # B=4, one left-padded batch row, S=1024
    python benchmarks/dead_rows.py --seq 512 --reps 3 --world-sizes 1

A causal LM with left padding in one batch row of four (HF eager's finfo.min mask added to the
scores): the padded row's leading queries keep no key, so the op recomputes them with the bias form.
"all rows" is the previous behaviour (the second pass over every batch row), forced in the same
run by making every batch row count as dead; "dead rows" is the current one. Both give the same
values (checked here). Times: medians over interleaved repetitions of the process CPU time (all
virtual ranks' threads; robust on a shared machine) and of the wall time, forward and forward+backward,
on the simulated ring (the real strategy code, N virtual ranks in one process, CPU kernels).
Work: query rows (batch rows x local queries, summed over ranks) each bias-form pass ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types

import torch

from ringcompile.mods import Mod
from ringcompile.runtime import dead_rows, execute
from ringcompile.runtime.simulated import simulated_ring_attention
from ringcompile.runtime.strategies import STRATEGIES
from ringcompile.spec import DeadRowForm

MIN32 = torch.finfo(torch.float32).min


def _keep(b, h, q, kv, pm):
    return (kv <= q) & (pm[b, kv] != 0)


def _bias_form(s, b, h, q, kv, pm):  # eager's s + where(keep, 0, c), shifted by -c
    return torch.where(_keep(b, h, q, kv, pm), s, (s + MIN32) - MIN32)


def _counting(calls: list) -> dict:
    def wrap(fn, phase):
        def counted(ctx, *t):
            q = t[0] if phase == "forward" else t[1]
            if ctx.spec.dead_rows is None:
                calls.append(q.shape[0] * q.shape[2])
            return fn(ctx, *t)
        return counted
    return {n: types.SimpleNamespace(forward=wrap(m.forward, "forward"),
                                     backward=wrap(m.backward, "backward")) for n, m in STRATEGIES.items()}


def _call(q, k, v, pm, world: int, strategy: str, backward: bool):
    mask = Mod(_keep, True, "custom", n_extras=1)
    form = DeadRowForm(mask=None, score=Mod(_bias_form, False, "custom", n_extras=1), score_idx=(0,),
                       shift=MIN32)
    out = simulated_ring_attention(q, k, v, world_size=world, strategy=strategy, mask=mask, mask_extras=[pm],
                                   dead_rows=form, kernel="cpu")
    if backward:
        out.backward(torch.ones_like(out))
    return out


def measure(seq: int, batch: int, heads: int, dim: int, reps: int, world_sizes) -> list[dict]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, requires_grad=True) for _ in range(3))
    pm = torch.ones(batch, seq, dtype=torch.long)
    pm[1, : seq // 8] = 0  # batch row 1 is left-padded: its first seq/8 queries keep no key
    real_rows = dead_rows._agreed_rows

    def every(comm, dead):  # the previous behaviour: all batch rows when any is dead
        return list(range(dead.shape[0])) if real_rows(comm, dead) else []

    rows = []
    for world in world_sizes:
        strategy = "local" if world == 1 else "ring"
        times: dict = {(m, ph): [] for m in ("all", "dead") for ph in ("fwd", "fwd+bwd")}
        walls: dict = {key: [] for key in times}
        work: dict = {}
        outs = {}
        for rep in range(reps + 1):  # the first repetition warms up and is not timed
            for mode in ("all", "dead"):
                dead_rows._agreed_rows = every if mode == "all" else real_rows
                for phase in ("fwd", "fwd+bwd"):
                    calls: list = []
                    execute.STRATEGIES = _counting(calls)
                    t0, c0 = time.perf_counter(), time.process_time()
                    out = _call(q, k, v, pm, world, strategy, phase == "fwd+bwd")
                    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                    execute.STRATEGIES = STRATEGIES
                    if rep:
                        times[(mode, phase)].append(cpu)
                        walls[(mode, phase)].append(wall)
                    work[(mode, phase)] = sum(calls)
                    outs[mode] = out.detach()
                    q.grad = k.grad = v.grad = None
        dead_rows._agreed_rows = real_rows
        torch.testing.assert_close(outs["all"], outs["dead"], atol=0, rtol=0)
        for phase in ("fwd", "fwd+bwd"):
            before = statistics.median(times[("all", phase)])
            after = statistics.median(times[("dead", phase)])
            rows.append({"world": world, "strategy": strategy, "phase": phase, "B": batch, "S": seq,
                         "H": heads, "D": dim, "all_rows_cpu_s": round(before, 4),
                         "dead_rows_cpu_s": round(after, 4), "speedup_cpu": round(before / after, 2),
                         "all_rows_wall_s": round(statistics.median(walls[("all", phase)]), 4),
                         "dead_rows_wall_s": round(statistics.median(walls[("dead", phase)]), 4),
                         "bias_q_rows_all": work[("all", phase)], "bias_q_rows_dead": work[("dead", phase)]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--world-sizes", default="1,2")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = work)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.seq, args.batch, args.heads, args.dim, args.reps,
                   [int(x) for x in args.world_sizes.split(",")])
    print("| N | strategy | phase | CPU s: all rows | CPU s: dead rows | speedup | wall s: all / dead "
          "| bias q rows: all -> dead |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['strategy']} | {r['phase']} | {r['all_rows_cpu_s']} | "
              f"{r['dead_rows_cpu_s']} | {r['speedup_cpu']}x | "
              f"{r['all_rows_wall_s']} / {r['dead_rows_wall_s']} | "
              f"{r['bias_q_rows_all']} -> {r['bias_q_rows_dead']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
