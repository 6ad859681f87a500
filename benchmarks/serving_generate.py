"""Serving a tiny HF Llama on CPU gloo ranks with the KV cache sharded (``ringcompile.serving.hf``):
time to first token, per-token decode latency and per-rank cache bytes at N = 1, 2, 4, beside the
same model in one process with HF's own SDPA attention and ``DynamicCache``, in the same run.

    python benchmarks/serving_generate.py                       # T = 8192, N = 1, 2, 4, 16 tokens
    python benchmarks/serving_generate.py --seqs 2048 --worlds 1,2 --tokens 4

The model (2 layers, hidden 64, 4 query / 2 KV heads of dim 16, float32, seeded weights) is the same on
every rank and in the baseline. A greedy loop calls ``model(...)`` with the cache: the prompt (TTFT: its
forward), then ``--tokens`` single-token steps (mean step time). Each rank's tokens are compared with the
baseline's. Dense layers run replicated (the eager path; see docs/ARCHITECTURE.md "Serving"), so TTFT
does not scale with N here; decode attention and the cache do.

Why not 32K tokens: HF builds the 4-D float32 mask for the eager mask interface the ``ring_decode``
attention uses, (1, 1, T, T) = 4 GiB per rank at T = 32768, plus the prefill's score tiles (T x 4096 per
head, fp32); four ranks exceed this 23 GiB host. ``benchmarks/serving.py`` measures the attention
layer alone at 8K and 32K.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import tempfile
import time

import torch

LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 64, 4, 2


def _model(max_len: int):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=128,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=max_len)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def _greedy(model, ids: torch.Tensor, cache, tokens: int) -> tuple[float, float, torch.Tensor]:
    """(TTFT s, mean decode step s, generated tokens) of a greedy loop over ``model`` with ``cache``."""
    out = []
    kw = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, **kw).logits
        nxt = logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - t0
        out.append(nxt)
        t0 = time.perf_counter()
        for _ in range(tokens):
            nxt = model(input_ids=nxt, use_cache=True, **kw).logits[:, -1:].argmax(-1)
            out.append(nxt)
        step = (time.perf_counter() - t0) / tokens
    return ttft, step, torch.cat(out, 1)


def _cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _rank(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    import torch.distributed as dist
    from transformers import DynamicCache

    from ringcompile.runtime.spawned_ranks import exit_rank
    from ringcompile.serving.hf import register, sharded_cache

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1200))
    rows = []
    for T in cfg["seqs"]:
        model = _model(T + cfg["tokens"] + 8)
        ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(T))
        row: dict = {"seq": T}
        model.set_attn_implementation("sdpa")
        if world == 1 or rank == 0:                  # the one-process reference tokens (and, at N=1, times)
            baseline = DynamicCache()
            b_ttft, b_step, want = _greedy(model, ids, baseline, cfg["tokens"])
            if world == 1:
                row.update(sdpa_ttft_s=b_ttft, sdpa_step_s=b_step, sdpa_cache_bytes=_cache_bytes(baseline))
            del baseline
        register()
        model.set_attn_implementation("ring_decode")
        dist.barrier()
        cache = sharded_cache(LAYERS, rank, world, timeout=1200.0)
        ttft, step, got = _greedy(model, ids, cache, cfg["tokens"])
        row.update(ttft_s=ttft, step_s=step, cache_bytes=_cache_bytes(cache))
        if rank == 0:
            row["same_tokens"] = bool(torch.equal(got, want))
        rows.append(row)
        del cache, model
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    exit_rank(0)


def run(cfg: dict) -> list[dict]:
    from ringcompile.runtime.spawned_ranks import free_port, run_spawned

    results = []
    for world in cfg["worlds"]:
        with tempfile.TemporaryDirectory() as out_dir:
            ok = run_spawned(_rank, (world, free_port(), cfg, out_dir), world, timeout=cfg["timeout"])
            if not ok:
                raise SystemExit(f"N={world}: ranks did not finish within {cfg['timeout']} s")
            per_rank = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]
        for i, T in enumerate(cfg["seqs"]):
            rs = [p[i] for p in per_rank]
            results.append({"world": world, "seq": T, "ttft_s": max(r["ttft_s"] for r in rs),
                            "step_s": max(r["step_s"] for r in rs),
                            "cache_bytes_per_rank": max(r["cache_bytes"] for r in rs),
                            "same_tokens": rs[0]["same_tokens"],
                            **{k: rs[0][k] for k in ("sdpa_ttft_s", "sdpa_step_s", "sdpa_cache_bytes")
                               if k in rs[0]}})
            print(f"N={world} T={T}: done", flush=True)
    return results


def table(results: list[dict]) -> str:
    base = {r["seq"]: r for r in results if "sdpa_ttft_s" in r}
    lines = ["| T | N | TTFT | one process (HF SDPA) | decode / token | one process (HF SDPA) | "
             "cache / rank | one process | cache vs one process | same tokens |", "|---" * 10 + "|"]
    for r in sorted(results, key=lambda r: (r["seq"], r["world"])):
        one = base.get(r["seq"])
        if one is None:
            continue
        lines.append(f"| {r['seq']:,} | {r['world']} | {r['ttft_s']:.2f} s | {one['sdpa_ttft_s']:.2f} s | "
                     f"{r['step_s'] * 1e3:.1f} ms | {one['sdpa_step_s'] * 1e3:.1f} ms | "
                     f"{r['cache_bytes_per_rank'] / 2**20:.2f} MiB | "
                     f"{one['sdpa_cache_bytes'] / 2**20:.2f} MiB | "
                     f"{r['cache_bytes_per_rank'] / one['sdpa_cache_bytes']:.3f} | {r['same_tokens']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="8192")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=2400.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "serving_generate.json"))
    a = ap.parse_args(argv)
    if 1 not in [int(w) for w in a.worlds.split(",")]:
        ap.error("--worlds must include 1 (the one-process baseline runs there)")
    cfg = {"seqs": [int(s) for s in a.seqs.split(",")], "worlds": [int(w) for w in a.worlds.split(",")],
           "tokens": a.tokens, "timeout": a.timeout}
    results = run(cfg)
    args = argv if argv is not None else sys.argv[1:]
    meta = {"when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "command": " ".join(["python", "benchmarks/serving_generate.py", *args])}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "config": cfg, "results": results}, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
