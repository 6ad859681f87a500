"""Serving on CPU gloo ranks: time to first token (prefill attention), per-token decode latency with a
sharded KV cache, and per-rank cache bytes, at N = 1, 2, 4 in the same run, beside the cost model.

One attention layer (the part that shards), float32, batch 1, one thread per process:

    python benchmarks/serving.py                          # T = 8192 and 32768, N = 1, 2, 4
    python benchmarks/serving.py --seqs 4096 --worlds 1,2 --steps 10

Per N, fresh spawned ranks build the same random cache (seeded), keep their shard
(``CacheLayout``: contiguous prefill, appends to the shortest shard) and run

* prefill: ``ringcompile.ring_attention`` causal on the T-token prompt (strategy "local" at N = 1,
  the planner's choice otherwise), forward only; the slowest rank's wall time, best of ``--prefill-iters``;
* decode: ``--steps`` steps of ``runtime.decode.decode_attention``, each appending the new token's K/V
  to its owner's shard; the median step time of the slowest rank (every step ends in the merge
  all_gather, so ranks are in lock step; the mean is in the JSON), and the last step's output checked
  against float64 attention on the whole cache.

N = 1 is the one-process baseline of the same code (no collective); the N = 1 process also times
plain PyTorch on the whole cache (``scaled_dot_product_attention``: causal prefill, one decode
query), the path without ringcompile, side by side in the same run. Predictions come from
``cost_model.decode.estimate_decode`` with the ``cpu-gloo-loopback`` profile (layers = 1, no dense
weights), twice: with the default per-call host cost ("profile"), and calibrated on this host in
this run ("calibrated": the shard read bandwidth from ``calibrate_decode_host`` in the parent, one
thread; each N's per-call cost and small all_gather measured by its ranks on a 16-slot cache).
Writes JSON (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HEADS, KV_HEADS, DIM = 4, 2, 32


def _full(T: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HEADS, T, DIM, generator=g)
    k = torch.randn(1, KV_HEADS, T + steps, DIM, generator=g)
    v = torch.randn(1, KV_HEADS, T + steps, DIM, generator=g)
    qd = torch.randn(steps, 1, HEADS, 1, DIM, generator=g)
    return q, k, v, qd


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    g = HEADS // KV_HEADS
    kk, vv = (t.double().repeat_interleave(g, 1) for t in (k, v))
    p = torch.softmax(q.double() @ kk.transpose(-1, -2) / DIM ** 0.5, -1)
    return p @ vv


def _small_all_gather(dist, repeats: int = 20) -> float:
    """Median seconds of one 16-int all_gather (what a decode step does twice), after a warm-up."""
    if dist.get_world_size() == 1:
        return 0.0
    x = torch.zeros(16, dtype=torch.long)
    outs = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(outs, x)
    dist.barrier()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_gather(outs, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _small_decode_call(rank: int, world: int, repeats: int = 20) -> float:
    """Median seconds of a decode-attention call on a 16-slot sharded cache at this N: the per-call host
    work and both collectives, next to no attention compute."""
    from ringcompile.runtime.cache_layout import CacheLayout
    from ringcompile.runtime.decode import decode_attention

    layout = CacheLayout(world, 16, "contiguous", "shortest")
    slots = torch.tensor(layout.slots(rank, 16), dtype=torch.long)
    q = torch.randn(1, HEADS, 1, DIM)
    k, v = (torch.randn(1, KV_HEADS, len(slots), DIM) for _ in range(2))
    call = dict(kv_slots=slots, q_slots=torch.tensor([15]), cache_len=16, layout=layout, timeout=600.0)
    decode_attention(q, k, v, **call)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decode_attention(q, k, v, **call)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _plain_pytorch(q, k_all, v_all, q_dec, T: int, iters: int) -> dict:
    """One process without ringcompile: SDPA causal prefill, then decode steps on the whole cache."""
    import torch.nn.functional as F

    k, v = k_all[:, :, :T], v_all[:, :, :T]
    prefill = []
    with torch.no_grad():
        for _ in range(iters + 1):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            prefill.append(time.perf_counter() - t0)
        steps, times = q_dec.shape[0], []
        for i in range(steps):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q_dec[i], k_all[:, :, :T + i + 1], v_all[:, :, :T + i + 1],
                                           enable_gqa=True)
            times.append(time.perf_counter() - t0)
        decode = statistics.median(times)
    return {"sdpa_prefill_s": min(prefill[1:]), "sdpa_decode_s": decode}


def _rank(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    import torch.distributed as dist

    import ringcompile
    from ringcompile.runtime.cache_layout import CacheLayout
    from ringcompile.runtime.decode import decode_attention
    from ringcompile.runtime.spawned_ranks import exit_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    rows = []
    small_call = _small_decode_call(rank, world)
    for T in cfg["seqs"]:
        steps = cfg["steps"]
        q, k_all, v_all, q_dec = _full(T, steps, seed=T)
        strategy = "local" if world == 1 else "auto"
        if world == 1:
            qs, ks, vs = q, k_all[:, :, :T], v_all[:, :, :T]
        else:
            qs, ks, vs = (ringcompile.shard(t, 2, "contiguous")
                          for t in (q, k_all[:, :, :T], v_all[:, :, :T]))
        prefill = []
        for _ in range(cfg["prefill_iters"] + 1):      # the first call builds the spec and kernels: dropped
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                ringcompile.ring_attention(qs, ks, vs, is_causal=True, strategy=strategy, timeout=600.0,
                                           seq_len=T, enable_gqa=True)
            dist.barrier()
            prefill.append(time.perf_counter() - t0)
        del qs, ks, vs
        layout = CacheLayout(world, T, "contiguous", "shortest")
        slots = layout.slots(rank, T)
        k = k_all[:, :, slots].clone()
        v = v_all[:, :, slots].clone()
        slot_t = torch.tensor(slots, dtype=torch.long)
        decode_attention(q_dec[0], k, v, kv_slots=slot_t, q_slots=torch.tensor([T - 1]), layout=layout,
                         cache_len=T, timeout=600.0)            # warm-up step (not timed, appends nothing)
        dist.barrier()
        step_times = []
        for i in range(steps):
            t0 = time.perf_counter()
            t = T + i
            if layout.owner(t) == rank:                      # the new token's K/V goes to its owner
                k = torch.cat([k, k_all[:, :, t:t + 1]], 2)
                v = torch.cat([v, v_all[:, :, t:t + 1]], 2)
                slot_t = torch.cat([slot_t, torch.tensor([t])])
            out = decode_attention(q_dec[i], k, v, kv_slots=slot_t, q_slots=torch.tensor([t]),
                                   layout=layout, timeout=600.0)
            step_times.append(time.perf_counter() - t0)
        decode = statistics.median(step_times)              # a typical step; the mean is kept beside it
        err = float((out.double() - _reference(q_dec[-1], k_all, v_all)).abs().max())
        row = {"seq": T, "prefill_s": min(prefill[1:]), "decode_s": decode,
               "decode_mean_s": statistics.fmean(step_times),
               "cache_bytes": k.nbytes + v.nbytes, "max_error": err, "collective_s": _small_all_gather(dist),
               "small_call_s": small_call}
        if world == 1:
            row.update(_plain_pytorch(q, k_all, v_all, q_dec, T, cfg["prefill_iters"]))
        rows.append(row)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    exit_rank(0)


def run(cfg: dict) -> list[dict]:
    import dataclasses

    from ringcompile.cost_model.decode import calibrate_decode_host, estimate_decode
    from ringcompile.runtime.spawned_ranks import free_port, run_spawned

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as the ranks run
    host = calibrate_decode_host(heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM)
    torch.set_num_threads(threads)
    print(f"calibrated on this host: {host.call * 1e3:.3f} ms per decode call, effective shard read "
          f"{host.read_bandwidth / 1e9:.2f} GB/s", flush=True)
    results = []
    for world in cfg["worlds"]:
        with tempfile.TemporaryDirectory() as out_dir:
            ok = run_spawned(_rank, (world, free_port(), cfg, out_dir), world, timeout=cfg["timeout"])
            if not ok:
                raise SystemExit(f"N={world}: ranks did not finish within {cfg['timeout']} s")
            per_rank = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
        for i, T in enumerate(cfg["seqs"]):
            rs = [p[i] for p in per_rank]
            shape = dict(cache_len=T, world_size=world, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM,
                         dtype="float32", profile="cpu-gloo-loopback")
            pred = estimate_decode(**shape)
            collective = max(r["collective_s"] for r in rs)     # per-call cost at this N, collectives apart
            call = max(max(r["small_call_s"] for r in rs) - 2 * collective, 0.0)
            measured_host = dataclasses.replace(host, call=call, collective=collective)
            calibrated = estimate_decode(**shape, host=measured_host)
            one = {key: rs[0][key] for key in ("sdpa_prefill_s", "sdpa_decode_s") if key in rs[0]}
            results.append({"world": world, "seq": T, **one,
                            "pred_decode_calibrated_s": calibrated.token_latency,
                            "collective_s": collective, "call_s": call,
                             "prefill_s": max(r["prefill_s"] for r in rs),
                             "decode_s": max(r["decode_s"] for r in rs),
                             "decode_mean_s": max(r["decode_mean_s"] for r in rs),
                             "cache_bytes_per_rank": max(r["cache_bytes"] for r in rs),
                             "max_error": max(r["max_error"] for r in rs),
                             "pred_prefill_s": pred.prefill_time, "pred_decode_s": pred.token_latency,
                             "pred_cache_bytes_per_rank": pred.cache_bytes_per_rank})
    return results


def table(results: list[dict]) -> str:
    base = {r["seq"]: r for r in results if r["world"] == 1}
    lines = ["| T | N | prefill (TTFT) | predicted | one process SDPA | decode / token | predicted: profile "
             "| calibrated | measured / calibrated | one process SDPA | cache / rank | predicted "
             "| cache vs N=1 | max err vs fp64 |", "|---" * 14 + "|"]
    for r in sorted(results, key=lambda r: (r["seq"], r["world"])):
        one = base.get(r["seq"], {})
        frac = f"{r['cache_bytes_per_rank'] / one['cache_bytes_per_rank']:.3f}" if one else "-"
        sdpa_p = f"{one['sdpa_prefill_s'] * 1e3:,.0f} ms" if "sdpa_prefill_s" in one else "-"
        sdpa_d = f"{one['sdpa_decode_s'] * 1e3:.2f} ms" if "sdpa_decode_s" in one else "-"
        lines.append(f"| {r['seq']:,} | {r['world']} | {r['prefill_s'] * 1e3:,.0f} ms | "
                     f"{r['pred_prefill_s'] * 1e3:,.0f} ms | {sdpa_p} | {r['decode_s'] * 1e3:.2f} ms | "
                     f"{r['pred_decode_s'] * 1e3:.2f} ms | {r['pred_decode_calibrated_s'] * 1e3:.2f} ms | "
                     f"{r['decode_s'] / r['pred_decode_calibrated_s']:.2f}x | {sdpa_d} | "
                     f"{r['cache_bytes_per_rank'] / 2**20:.2f} MiB | "
                     f"{r['pred_cache_bytes_per_rank'] / 2**20:.2f} MiB | {frac} | {r['max_error']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192,32768")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-iters", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "serving.json"))
    a = ap.parse_args(argv)
    cfg = {"seqs": [int(s) for s in a.seqs.split(",")], "worlds": [int(w) for w in a.worlds.split(",")],
           "steps": a.steps, "prefill_iters": a.prefill_iters, "timeout": a.timeout}
    results = run(cfg)
    args = argv if argv is not None else sys.argv[1:]
    meta = {"when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__, "host": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "command": " ".join(["python", "benchmarks/serving.py", *args]),
            "shape": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "float32"}}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "config": cfg, "results": results}, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
