"""Per-rank activation memory of whole models under backend="ring" at N ranks vs one process.

Activation memory is measured as the bytes autograd keeps for the backward pass during one
forward (distinct storages seen by ``saved_tensors_hooks``): that is what grows with the
sequence and what sequence parallelism divides. Baselines, in one process on the full
sequence: the model compiled with backend="ring" (blockwise attention, no S x S matrix) and
the plain eager model. Writes JSON next to this file (``results/memory_models.json``) and
prints a Markdown table.

    python benchmarks/memory_models.py --seq 4096 --world-size 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

MODELS = ("builtin-llama", "builtin-gpt2", "hf-llama")


def build(kind: str, seq: int, dim: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind.startswith("builtin-"):
        from ringcompile.models import ModelConfig, build_model

        name = kind.split("-", 1)[1]
        heads = 4
        cfg = ModelConfig(vocab=512, dim=dim, layers=layers, heads=heads,
                          kv_heads=heads // 2 if name == "llama" else heads, max_seq=seq)
        return build_model(name, cfg)
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
                         attn_implementation="sdpa", use_cache=False)
    return tf.LlamaForCausalLM(cfg)


def run_step(model, ids, labels) -> tuple[int, float]:
    """(activation bytes saved for backward, seconds for forward+backward)."""
    from ringcompile.demo import activation_bytes

    t0 = time.perf_counter()
    out, saved = activation_bytes(lambda: model(ids, labels=labels))
    loss = out[1] if isinstance(out, tuple) else out.loss
    loss.backward()
    return saved, time.perf_counter() - t0


def inputs(seq: int):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (1, seq), generator=g), torch.randint(0, 512, (1, seq), generator=g)


def measure_compiled(kind, seq, dim, layers, step_twice=True) -> tuple[int, float]:
    model = build(kind, seq, dim, layers)
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    ids, labels = inputs(seq)
    run_step(compiled, ids, labels)  # compile
    model.zero_grad(set_to_none=True)
    return run_step(compiled, ids, labels)


def _rank(rank, world, init_file, args, out):
    import torch.distributed as dist

    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        res = {}
        for kind in args.models:
            torch._dynamo.reset()
            res[kind] = measure_compiled(kind, args.seq, args.dim, args.layers)
        out.put((rank, res))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001
        import traceback

        out.put((rank, {"error": f"{exc}\n{traceback.format_exc()}"}))
    from ringcompile.runtime.spawned_ranks import exit_rank

    exit_rank(0, queues=[out])   # skip interpreter finalization, where gloo can abort the process


def sharded(args) -> list[dict]:
    """The results of ``args.world_size`` spawned gloo ranks (None for a rank that never reported)."""
    from ringcompile.runtime.spawned_ranks import spawn_and_collect

    return spawn_and_collect(_rank, args.world_size, 900,
                             lambda r, init_file, out: (r, args.world_size, init_file, args, out),
                             prefix="ring_mem_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory_models.json"))
    args = ap.parse_args(argv)
    ranks = sharded(args)
    rows = []
    for kind in args.models:
        torch._dynamo.reset()
        one_ring, one_ring_s = measure_compiled(kind, args.seq, args.dim, args.layers)
        eager_model = build(kind, args.seq, args.dim, args.layers)
        one_eager, one_eager_s = run_step(eager_model, *inputs(args.seq))
        per_rank = [r[kind][0] if r and kind in r else None for r in ranks]
        errors = [r.get("error") for r in ranks if r and "error" in r]
        worst = max((b for b in per_rank if b is not None), default=None)
        rows.append({"model": kind, "seq": args.seq, "world_size": args.world_size,
                     "per_rank_bytes": per_rank, "one_process_ring_bytes": one_ring,
                     "one_process_eager_bytes": one_eager,
                     "ratio_vs_one_process_ring": worst / one_ring if worst else None,
                     "ratio_vs_one_process_eager": worst / one_eager if worst else None,
                     "per_rank_step_s": [r[kind][1] if r and kind in r else None for r in ranks],
                     "one_process_ring_step_s": one_ring_s, "one_process_eager_step_s": one_eager_s,
                     "errors": errors})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": "2-core CPU VM, torch " + torch.__version__,
                                          "dim": args.dim, "layers": args.layers, "rows": rows}, indent=2))
    mib = 2 ** 20
    print("| model | S | N | per-rank activations (MiB) | one process, ring backend (MiB) | ratio | "
          "one process, eager (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pr = ", ".join(f"{b / mib:.1f}" if b is not None else "error" for b in r["per_rank_bytes"])
        ra = r["ratio_vs_one_process_ring"]
        re_ = r["ratio_vs_one_process_eager"]
        if not ra:
            print(f"| {r['model']} | error: {r['errors']} |")
            continue
        print(f"| {r['model']} | {r['seq']} | {r['world_size']} | {pr} | "
              f"{r['one_process_ring_bytes'] / mib:.1f} | {ra:.2f}x | "
              f"{r['one_process_eager_bytes'] / mib:.1f} | {re_:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
