"""Validate the cost model against measured gloo runs on this machine.

1. calibrate this machine (or reuse ``--profile PATH``) into a profile TOML;
2. for N in {2, 4}, spawn N gloo ranks once and time ``ringcompile.ring_attention(...,
   strategy=s)`` for every configuration of the grid (strategies x sequence lengths x
   forward / forward+backward), slowest rank per call, median of repetitions; then the
   ``local`` strategy (one process, one thread: the whole sequence on one core) on the same
   sequences, the baseline a planner must beat;
3. predict each configuration with ``ringcompile.plan(..., strategy=s, profile=PATH)`` and
   report predicted vs measured, the mean absolute percentage error, and the planner's
   regret: measured time of ``ringcompile.plan``'s pick among the measured strategies (local
   included unless ``--no-local``) over the best measured strategy. The runtime's own pick
   (``choose_for_call``, distributed strategies only) is reported beside it.

Writes JSON (``--out``) and prints a Markdown table. Ranks run one thread each, as the
profile assumes. Usage::

    python benchmarks/cost_model_validation.py [--profile PATH] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

STRATEGIES = ("ring", "zigzag", "allgather", "ulysses")
HEADS, KV_HEADS, HEAD_DIM, BATCH = 8, 4, 64, 1
DTYPE = torch.float32


def grid(quick: bool, seqs: tuple[int, ...] | None = None, bwd_seq: int | None = None,
         strategies: tuple[str, ...] = STRATEGIES) -> list[dict]:
    """Configurations: strategies x S x (fwd, fwd+bwd) for one N (N is added by the caller)."""
    seqs = seqs or ((512, 2048, 8192) if quick else (512, 2048, 16384))
    configs = []
    for s, strategy in itertools.product(seqs, strategies):
        configs.append(dict(strategy=strategy, seq_len=s, causal=True, backward=False))
    bwd_seq = bwd_seq or (2048 if quick else 4096)
    for strategy in strategies:
        configs.append(dict(strategy=strategy, seq_len=bwd_seq, causal=True, backward=True))
    return configs


def _rank_main(rank: int, world_size: int, port: int, configs: list[dict], reps: int, out_path: str) -> None:
    import torch.distributed as dist

    import ringcompile
    from ringcompile.runtime import timing

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    results = []
    try:
        for cfg in configs:
            gen = torch.Generator().manual_seed(hash((cfg["seq_len"], cfg["strategy"])) % (1 << 31))
            s = cfg["seq_len"]
            q = torch.randn(BATCH, HEADS, s, HEAD_DIM, generator=gen, dtype=DTYPE)
            k = torch.randn(BATCH, KV_HEADS, s, HEAD_DIM, generator=gen, dtype=DTYPE)
            v = torch.randn(BATCH, KV_HEADS, s, HEAD_DIM, generator=gen, dtype=DTYPE)
            layout = "zigzag" if cfg["strategy"] == "zigzag" else "contiguous"
            ql, kl, vl = (ringcompile.shard(t, 2, layout=layout) for t in (q, k, v))
            if cfg["backward"]:
                ql.requires_grad_(True), kl.requires_grad_(True), vl.requires_grad_(True)
            dout = torch.randn(ql.shape, generator=gen, dtype=DTYPE)

            def call(ql=ql, kl=kl, vl=vl, dout=dout, cfg=cfg, layout=layout, s=s):
                with torch.set_grad_enabled(cfg["backward"]):
                    out = ringcompile.ring_attention(ql, kl, vl, is_causal=cfg["causal"], enable_gqa=True,
                                                     strategy=cfg["strategy"], layout=layout, seq_len=s)
                    if cfg["backward"]:
                        out.backward(dout)

            times, bubbles, cpus, cpu_seconds = [], [], [], []
            # short calls vary by tens of percent from scheduling alone: take more samples of them
            for i in range((3 * reps if s <= 2048 else reps) + 1):
                dist.barrier()
                with timing.record() as records:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    call()
                    elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
                wait = sum(r.wait_s for r in records)
                busy = sum(r.compute_s + r.wait_s for r in records)
                stats = torch.tensor([elapsed, wait / busy if busy > 0 else 0.0], dtype=torch.float64)
                dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                cpu_total = torch.tensor([cpu], dtype=torch.float64)
                dist.all_reduce(cpu_total)   # CPU seconds of all ranks: low when others hold the cores
                if i > 0:  # the first call builds specs, plans and caches
                    times.append(float(stats[0]))
                    bubbles.append(float(stats[1]))
                    cpus.append(float(cpu_total) / float(stats[0]))
                    cpu_seconds.append(float(cpu_total))
            results.append(dict(cfg, world_size=world_size, measured=statistics.median(times), samples=times,
                                measured_bubble=statistics.median(bubbles),
                                busy_cores=statistics.median(cpus),
                                cpu_seconds=statistics.median(cpu_seconds)))
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump(results, fh)
    finally:
        dist.destroy_process_group()
    from ringcompile.runtime.spawned_ranks import exit_rank

    exit_rank(0)   # skip interpreter finalization, where gloo can abort the process


def measure(world_size: int, configs: list[dict], reps: int, timeout: float) -> list[dict]:
    from ringcompile.runtime.spawned_ranks import free_port, run_spawned

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "results.json")
        if not run_spawned(_rank_main, (world_size, free_port(), configs, reps, path), world_size, timeout):
            raise TimeoutError(f"N={world_size} measurements did not finish in {timeout:.0f} s")
        with open(path) as fh:
            return json.load(fh)


def predict(rows: list[dict], profile: str) -> None:
    import sympy as sp

    import ringcompile
    from ringcompile.cost_model import symbols as sym
    from ringcompile.cost_model.planner import choose_for_call
    from ringcompile.cost_model.strategies import strategy_model

    by_name = {str(s): s for s in sym.ALL}
    sizes = sorted({r["world_size"] for r in rows if r["world_size"] > 1})
    measured = {r["strategy"] for r in rows}   # plan()'s pick is judged among what was measured

    for r in rows:
        common = dict(seq_len=r["seq_len"], world_size=r["world_size"], heads=HEADS, kv_heads=KV_HEADS,
                      head_dim=HEAD_DIM, batch=BATCH, dtype="float32", causal=r["causal"],
                      backward=r["backward"])
        p = ringcompile.plan(**common, profile=profile, strategy=r["strategy"])
        r["predicted"] = p.time
        r["predicted_bubble"] = p.bubble
        r["block_size"] = p.block_size
        # compute summed over ranks: comparable with the ranks' CPU seconds whatever else runs
        work = strategy_model(r["strategy"], r["causal"], r["backward"]).work
        numbers = {by_name[k]: sp.Float(v) for k, v in p.values.items()}
        r["predicted_cpu_seconds"] = float(work.xreplace(numbers))
        if r["world_size"] > 1:
            r["plan_choice"] = next(p.strategy for p in ringcompile.plans(**common, profile=profile)
                                    if p.strategy in measured)
            r["planner_choice"] = choose_for_call(**common, profile=profile).strategy
    # the one-process baseline belongs to every world size's group
    for r in [r for r in rows if r["world_size"] == 1]:
        r["candidate_for"] = sizes


def summarize(rows: list[dict]) -> dict:
    """MAPE over every row; per (N, S, pass) group the regret of ``plan``'s pick (``plan_choice``;
    ``planner_choice`` when a row has none) over the best measured candidate, local included."""
    errors = [abs(r["predicted"] - r["measured"]) / r["measured"] for r in rows]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        for n in ([r["world_size"]] if r["world_size"] > 1 else r.get("candidate_for", [])):
            groups.setdefault((n, r["seq_len"], r["causal"], r["backward"]), []).append(r)
    regrets = []
    for key, members in sorted(groups.items()):
        distributed = [r for r in members if r["world_size"] > 1]
        if not distributed:
            continue
        best = min(members, key=lambda r: r["measured"])
        pick = distributed[0].get("plan_choice", distributed[0]["planner_choice"])
        runtime_pick = distributed[0]["planner_choice"]
        chosen = next((r for r in members if r["strategy"] == pick), None)
        if chosen is None:
            continue
        regrets.append(dict(world_size=key[0], seq_len=key[1], causal=key[2], backward=key[3],
                            chosen=chosen["strategy"], runtime_choice=runtime_pick, best=best["strategy"],
                            regret=chosen["measured"] / best["measured"] - 1))
    cpu_errors = [abs(r["predicted_cpu_seconds"] - r["cpu_seconds"]) / r["cpu_seconds"] for r in rows
                  if "cpu_seconds" in r and "predicted_cpu_seconds" in r]
    return dict(mape=statistics.mean(errors), max_ape=max(errors), n_configs=len(rows),
                cpu_mape=statistics.mean(cpu_errors) if cpu_errors else None,
                mean_regret=statistics.mean(r["regret"] for r in regrets),
                max_regret=max(r["regret"] for r in regrets), regrets=regrets)


def markdown(rows: list[dict], summary: dict) -> str:
    lines = ["| N | S | pass | strategy | predicted (ms) | measured (ms) | error | bubble pred. / meas. "
             "| busy cores | CPU s pred. / meas. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["world_size"], r["backward"], r["seq_len"], r["measured"])):
        err = (r["predicted"] - r["measured"]) / r["measured"]
        lines.append(f"| {r['world_size']} | {r['seq_len']} | {'fwd+bwd' if r['backward'] else 'fwd'} | "
                     f"{r['strategy']} | {r['predicted'] * 1e3:.1f} | {r['measured'] * 1e3:.1f} | "
                     f"{err:+.1%} | {r.get('predicted_bubble', 0.0):.0%} / "
                     f"{r.get('measured_bubble', float('nan')):.0%} | "
                     f"{r.get('busy_cores', float('nan')):.2f} | "
                     f"{r.get('predicted_cpu_seconds', float('nan')):.2f} / "
                     f"{r.get('cpu_seconds', float('nan')):.2f} |")
    lines.append("")
    lines.append("| N | S | pass | plan()'s choice | runtime's choice | best measured | regret |")
    lines.append("|---|---|---|---|---|---|---|")
    for g in summary["regrets"]:
        lines.append(f"| {g['world_size']} | {g['seq_len']} | {'fwd+bwd' if g['backward'] else 'fwd'} | "
                     f"{g['chosen']} | {g['runtime_choice']} | {g['best']} | {g['regret']:.1%} |")
    lines.append("")
    lines.append(f"MAPE {summary['mape']:.1%} over {summary['n_configs']} configurations (max "
                 f"{summary['max_ape']:.1%}); planner regret mean {summary['mean_regret']:.1%}, max "
                 f"{summary['max_regret']:.1%}")
    if summary.get("cpu_mape") is not None:
        lines.append(f"compute summed over ranks vs the ranks' CPU seconds: MAPE {summary['cpu_mape']:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="reuse this profile TOML instead of calibrating")
    parser.add_argument("--out", default="benchmarks/results/cost_model_validation.json")
    parser.add_argument("--quick", action="store_true", help="smaller sequences and fewer repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--seqs", default=None, help="forward sequence lengths, e.g. 2048,16384")
    parser.add_argument("--bwd-seq", type=int, default=None, help="sequence length of the fwd+bwd rows")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per world size")
    parser.add_argument("--no-local", action="store_true", help="skip the one-process local baseline")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = args.profile
    if profile is None:
        from ringcompile.cost_model.calibrate import calibrate

        def progress(i: int, n: int, what: str) -> None:
            print(f"\rcalibrating [{'#' * i}{'.' * (n - i)}] {what:<40}", end="" if i < n else "\n",
                  file=sys.stderr, flush=True)

        prof = calibrate(name="cpu-calibrated", progress=progress)
        profile = str(out.with_name("cpu-calibrated.toml"))
        Path(profile).write_text(prof.to_toml())
        print(f"profile written to {profile}", file=sys.stderr)
    reps = args.reps or (2 if args.quick else 5)
    rows: list[dict] = []
    seqs = tuple(int(x) for x in args.seqs.split(",")) if args.seqs else None
    runs = [(int(x), STRATEGIES) for x in args.world_sizes.split(",")]
    if not args.no_local:
        runs.append((1, ("local",)))
    for n, strategies in runs:
        print(f"measuring N={n} ({', '.join(strategies)}) ...", file=sys.stderr, flush=True)
        t0 = time.time()
        rows += measure(n, grid(args.quick, seqs, args.bwd_seq, strategies), reps, args.timeout)
        print(f"  done in {time.time() - t0:.0f} s", file=sys.stderr)
    predict(rows, profile)
    summary = summarize(rows)
    out.write_text(json.dumps(dict(profile=profile, rows=rows, summary=summary,
                                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   torch=torch.__version__), indent=1))
    print(markdown(rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
