"""Ring attention on CPU gloo ranks vs ring-attention-pytorch and one process (issue 3 benchmark).

Causal forward + backward of one attention, float32, batch 1, one thread per process:

    python benchmarks/ring_cpu.py                       # S=16384, 8 heads, dim 64, 2 ranks
    python benchmarks/ring_cpu.py --seq 4096 --impls zigzag,local --iters 1

Implementations (``--impls``):
  ring, zigzag, allgather  ``ringcompile.ring_attention(..., strategy=...)`` on N gloo ranks
  lucidrains               ``ring_attention_pytorch.ring_flash_attn`` (ring_reduce_col=True) on N ranks
  local                    ``ringcompile.ring_attention(..., strategy="local")``, one process
  sdpa                     ``torch.nn.functional.scaled_dot_product_attention``, one process

Every process is a fresh spawn with ``torch.set_num_threads(1)``. A step's time is the slowest
rank's wall time for forward + backward after a barrier; the median over ``--iters`` is
reported. The bubble comes from ``ringcompile.runtime.timing`` records (wait / (compute +
wait), forward and backward together, averaged over ranks). Parallel efficiency is the best
one-process time / (N x step time). Each run checks sampled output rows against float64.
Writes JSON (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp

from ringcompile.runtime.spawned_ranks import free_port

DISTRIBUTED = ("ring", "zigzag", "allgather", "lucidrains")
SINGLE = ("local", "sdpa")
SAMPLE_ROWS = 16


def _inputs(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(cfg["seed"])
    shape = (1, cfg["heads"], cfg["seq"], cfg["dim"])
    return tuple(torch.randn(shape, generator=gen) for _ in range(4))  # q, k, v, dout


def _sample_error(out: torch.Tensor, rows: torch.Tensor, q, k, v) -> float:
    """Max |out - float64 causal attention| over a few of this process's global query rows."""
    pick = torch.linspace(0, rows.numel() - 1, SAMPLE_ROWS).long()
    idx = rows[pick]
    qs = q[:, :, idx].double()
    s = qs @ k.double().transpose(-2, -1) * q.shape[-1] ** -0.5
    keep = torch.arange(k.shape[2]).view(1, -1) <= idx.view(-1, 1)
    s = s.masked_fill(~keep, float("-inf"))
    ref = torch.softmax(s, -1) @ v.double()
    return float((out[:, :, pick].double() - ref).abs().max())


def _timed_steps(cfg: dict, step, barrier=None) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds of each measured step (CPU time is what the step
    cost this process, whatever else shares the cores)."""
    times, cpu = [], []
    for i in range(cfg["warmup"] + cfg["iters"]):
        if barrier is not None:
            barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu


def _distributed_rank(rank: int, world: int, port: int, impl: str, cfg: dict, results) -> None:
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg["timeout"]))
        q, k, v, dout = _inputs(cfg)
        S = cfg["seq"]
        records = []
        if impl == "lucidrains":
            try:
                from ring_attention_pytorch import ring_flash_attn
            except ImportError as e:
                raise ImportError("the lucidrains baseline needs `pip install ring-attention-pytorch` "
                                  "(or `pip install -e .[bench]`)") from e

            n = S // world
            rows = torch.arange(rank * n, (rank + 1) * n)
            ql, kl, vl, dl = (x.transpose(1, 2)[:, rows].contiguous() for x in (q, k, v, dout))
            ql.requires_grad_(True), kl.requires_grad_(True), vl.requires_grad_(True)
            state = {}
            tiny = [x[:, :64].detach().clone().requires_grad_(True) for x in (ql, kl, vl)]
            ring_flash_attn(*tiny, causal=True, ring_reduce_col=True).sum().backward()  # warm the code paths

            def step():
                ql.grad = kl.grad = vl.grad = None
                out = ring_flash_attn(ql, kl, vl, causal=True, ring_reduce_col=True,
                                      bucket_size=cfg["lucidrains_bucket"])
                out.backward(dl)
                state["out"] = out.detach().transpose(1, 2)

            times, cpu = _timed_steps(cfg, step, dist.barrier)
        else:
            import ringcompile
            from ringcompile.runtime import layouts, timing

            layout = "zigzag" if impl == "zigzag" else "contiguous"
            rows = layouts.local_indices(S, world, rank, layout)
            ql, kl, vl, dl = (ringcompile.shard(x, 2, layout=layout) for x in (q, k, v, dout))
            ql.requires_grad_(True), kl.requires_grad_(True), vl.requires_grad_(True)
            state = {}

            def step():
                ql.grad = kl.grad = vl.grad = None
                out = ringcompile.ring_attention(ql, kl, vl, is_causal=True, strategy=impl, layout=layout,
                                                 block_size=cfg["block_size"], timeout=cfg["timeout"])
                out.backward(dl)
                state["out"] = out.detach()

            with timing.record() as rec:
                times, cpu = _timed_steps(cfg, step, dist.barrier)
            measured = rec[-2 * cfg["iters"]:] if rec else []
            records = [r.as_dict() for r in measured]
        err = _sample_error(state["out"], rows, q, k, v)
        results.put((rank, {"times": times, "cpu": cpu, "records": records, "sample_max_err": err}))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, {"error": traceback.format_exc()}))
    from ringcompile.runtime.spawned_ranks import exit_rank

    exit_rank(0, queues=[results])   # skip interpreter finalization, where gloo can abort the process


def _single_process(impl: str, cfg: dict, results) -> None:
    try:
        torch.set_num_threads(1)
        q, k, v, dout = _inputs(cfg)
        qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
        state = {}
        if impl == "sdpa":
            def step():
                qr.grad = kr.grad = vr.grad = None
                out = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
                out.backward(dout)
                state["out"] = out.detach()
        else:
            import ringcompile

            def step():
                qr.grad = kr.grad = vr.grad = None
                out = ringcompile.ring_attention(qr, kr, vr, is_causal=True, strategy="local",
                                                 block_size=cfg["block_size"])
                out.backward(dout)
                state["out"] = out.detach()
        times, cpu = _timed_steps(cfg, step)
        err = _sample_error(state["out"], torch.arange(cfg["seq"]), q, k, v)
        results.put((0, {"times": times, "cpu": cpu, "records": [], "sample_max_err": err}))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((0, {"error": traceback.format_exc()}))


def run_impl(impl: str, cfg: dict) -> dict:
    """Spawn the processes for one implementation and summarise what they measured."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    world = cfg["world"] if impl in DISTRIBUTED else 1
    if impl in DISTRIBUTED:
        port = free_port()
        procs = [ctx.Process(target=_distributed_rank, args=(r, world, port, impl, cfg, results))
                 for r in range(world)]
    else:
        procs = [ctx.Process(target=_single_process, args=(impl, cfg, results))]
    for p in procs:
        p.start()
    per_rank: dict[int, dict] = {}
    deadline = time.monotonic() + cfg["deadline"]
    try:
        while len(per_rank) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{impl}: no result within {cfg['deadline']} s")
            rank, res = results.get(timeout=left)
            per_rank[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in per_rank.values() if "error" in r]
    if errors:
        raise RuntimeError(f"{impl} failed:\n{errors[0]}")
    step_times = [max(per_rank[r]["times"][i] for r in per_rank) for i in range(cfg["iters"])]
    cpu_total = [sum(per_rank[r]["cpu"][i] for r in per_rank) for i in range(cfg["iters"])]
    summary = {"impl": impl, "world": world, "step_s": statistics.median(step_times), "steps_s": step_times,
               "cpu_s_all_ranks": statistics.median(cpu_total),
               "sample_max_err": max(r["sample_max_err"] for r in per_rank.values())}
    recs = [rec for r in per_rank.values() for rec in r["records"]]
    if recs:
        bubbles = []
        for rank in per_rank:
            mine = [x for x in recs if x["rank"] == rank]
            wait = sum(x["wait_s"] for x in mine)
            busy = wait + sum(x["compute_s"] for x in mine)
            bubbles.append(wait / busy if busy else 0.0)
        summary["bubble"] = sum(bubbles) / len(bubbles)
        summary["bubble_max_rank"] = max(bubbles)
        for phase in ("forward", "backward"):
            mine = [x for x in recs if x["phase"] == phase]
            wait = sum(x["wait_s"] for x in mine)
            busy = wait + sum(x["compute_s"] for x in mine)
            summary[f"bubble_{phase}"] = wait / busy if busy else 0.0
        summary["records"] = recs
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--impls", default="zigzag,ring,allgather,local,sdpa,lucidrains")
    ap.add_argument("--block-size", type=int, default=None,
                    help="K/V tokens per ring transfer chunk (default: the planner's)")
    ap.add_argument("--lucidrains-bucket", type=int, default=1024)
    ap.add_argument("--lucidrains-once", action="store_true",
                    help="time the (slow) ring-attention-pytorch baseline once, without warm-up")
    ap.add_argument("--timeout", type=float, default=600.0, help="collective timeout (s)")
    ap.add_argument("--deadline", type=float, default=3600.0, help="per-implementation limit (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/ring_cpu.json")
    args = ap.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("seq", "heads", "dim", "world", "iters", "warmup", "block_size",
                                          "lucidrains_bucket", "timeout", "deadline", "seed")}
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(DISTRIBUTED) - set(SINGLE))
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}")
    rows = []
    for impl in impls:
        t0 = time.time()
        impl_cfg = {**cfg, "warmup": 0, "iters": 1} if impl == "lucidrains" and args.lucidrains_once else cfg
        res = run_impl(impl, impl_cfg)
        res["iters"], res["warmup"] = impl_cfg["iters"], impl_cfg["warmup"]
        res["wall_s"] = time.time() - t0
        rows.append(res)
        print(f"{impl}: {res['step_s']:.2f} s/step, {res['cpu_s_all_ranks']:.2f} CPU s, bubble "
              f"{res.get('bubble', float('nan')):.3f} (sample err {res['sample_max_err']:.1e})", flush=True)
    single = [r["step_s"] for r in rows if r["impl"] in SINGLE]
    best_single = min(single) if single else None
    luc = next((r["step_s"] for r in rows if r["impl"] == "lucidrains"), None)
    for r in rows:
        if r["impl"] in DISTRIBUTED and best_single is not None:
            r["efficiency"] = best_single / (r["world"] * r["step_s"])
        if luc is not None and r["impl"] != "lucidrains":
            r["speedup_vs_lucidrains"] = luc / r["step_s"]
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    meta = {"config": cfg, "machine": f"{os.cpu_count()}-core CPU, {platform.platform()}",
            "torch": torch.__version__, "date": now, "best_single_process_s": best_single}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(markdown_table(rows))
    return 0


def _fmt(x, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| implementation | ranks | s / step (fwd+bwd) | CPU s / step (all ranks) "
             "| vs ring-attention-pytorch | efficiency | bubble (fwd / bwd) | sampled max err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bubble = ""
        if "bubble" in r:
            bubble = f"{r['bubble']:.3f} ({r['bubble_forward']:.3f} / {r['bubble_backward']:.3f})"
        speedup = r.get("speedup_vs_lucidrains")
        speedup = "" if speedup is None else f"{speedup:.2f}x"
        lines.append(f"| {r['impl']} | {r['world']} | {r['step_s']:.2f} | {r['cpu_s_all_ranks']:.2f} "
                     f"| {speedup}"
                     f" | {_fmt(r.get('efficiency'), '.3f')} | {bubble} | {r['sample_max_err']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
