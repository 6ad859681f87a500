"""What the compiled prefill all-gathers per rank when its K/V go into a sharded KV cache, with
``cache_append``'s placement rule (the K/V shard stays local) and without it (the old behaviour: the
sharding pass gathers each layer's K and V for the opaque op, then the op keeps 1/N of them).

    python benchmarks/prefill_cache_bytes.py                     # T = 2048 and 2047, N = 2
    python benchmarks/prefill_cache_bytes.py --seqs 4096 --world 4
    python benchmarks/prefill_cache_bytes.py --logits-to-keep 1    # what generate's prefill asks for

HF Llama (2 layers, hidden 64, 4 query / 2 KV heads of dim 16, float32, seeded), batch 1, one forward
(the prefill) of ``m.forward = torch.compile(m.forward, backend="ring", options={"inner": "eager"})``
over ``sharded_cache(..., compiled=True)``. Every ``torch.distributed.all_gather`` of the forward is
counted (calls, bytes of its gathered output); "cache K/V gathers" are the ``gather_seq`` nodes that feed
``cache_append`` in the sharded graph. 2047 tokens: contiguous shards with one padding slot; 2048:
zigzag. Logits are compared between the two modes (same model, same prompt)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

import torch

LAYERS, HIDDEN, HEADS, KV_HEADS = 2, 64, 4, 2


def _prefill(rank: int, world: int, T: int, keep_local: bool, keep_logits: int = 0) -> dict:
    import torch._dynamo
    import torch.distributed as dist
    import transformers as tf

    from ringcompile import backend
    from ringcompile.passes import placements
    from ringcompile.serving.hf import sharded_cache

    saved = dict(placements.LOCAL_SHARD_OPS)
    if not keep_local:
        placements.LOCAL_SHARD_OPS.clear()     # no rule: cache_append gets replicated (gathered) K/V
    torch._dynamo.reset()
    cfg = tf.LlamaConfig(vocab_size=128, num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                         intermediate_size=128, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=T + 8)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.forward = torch.compile(model.forward, backend="ring", options={"inner": "eager"})
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(T))
    cache = sharded_cache(LAYERS, rank, world, max_cache_len=T + 8, compiled=True, timeout=600.0)
    counted: dict = {"calls": 0, "bytes": 0, "shapes": []}
    plain = dist.all_gather

    def counting(outs, tensor, *args, **kwargs):
        counted["calls"] += 1
        counted["bytes"] += sum(o.numel() * o.element_size() for o in outs)
        counted["shapes"].append(list(tensor.shape))
        return plain(outs, tensor, *args, **kwargs)

    before = len(backend.HISTORY)
    dist.all_gather = counting
    try:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True,
                  logits_to_keep=keep_logits)   # compile + first run
            counted.update(calls=0, bytes=0, shapes=[])
            cache = sharded_cache(LAYERS, rank, world, max_cache_len=T + 8, compiled=True, timeout=600.0)
            dist.barrier()
            t0 = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True,
                           logits_to_keep=keep_logits).logits
            ttft = time.perf_counter() - t0
    finally:
        dist.all_gather = plain
        placements.LOCAL_SHARD_OPS.update(saved)
    graphs = [g.graph for g in backend.HISTORY[before:] if g.graph is not None
              and g.graph.meta.get("ringcompile_shard")]
    appends = [n for g in graphs for n in g.graph.nodes
               if str(n.target).startswith("ringcompile.cache_append")]
    feeds = sum(str(getattr(a, "target", "")).startswith("ringcompile.gather_seq")
                for n in appends for a in n.args[3:5])
    return {"all_gather_calls": counted["calls"], "all_gather_bytes": counted["bytes"],
            "gathered_shapes": counted["shapes"],
            "cache_kv_gathers": feeds,
            "layout": graphs[0].meta["ringcompile_shard"].layout if graphs else None,
            "cache_bytes": sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers),
            "filled": [layer.filled() for layer in cache.layers], "ttft_s": ttft,
            "logits": logits[0, -1].tolist(), "graphs": len(backend.HISTORY) - before}


def _rank(rank: int, world: int, init_file: str, seqs: list[int], out_dir: str, keep_logits: int) -> None:
    import torch.distributed as dist

    from ringcompile.runtime.spawned_ranks import exit_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    rows = [{"seq": T, "keep_local": keep, **_prefill(rank, world, T, keep, keep_logits)}
            for T in seqs for keep in (False, True)]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    exit_rank(0)


def main() -> None:
    from ringcompile.runtime.spawned_ranks import run_spawned

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="2048,2047")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--logits-to-keep", type=int, default=0,
                    help="HF's logits_to_keep (generate's prefill passes 1; 0 = every position's logits)")
    a = ap.parse_args()
    seqs = [int(s) for s in a.seqs.split(",")]
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        args = (a.world, init_file, seqs, out_dir, a.logits_to_keep)
        if not run_spawned(_rank, args, a.world, timeout=a.timeout):
            raise SystemExit(f"ranks did not finish within {a.timeout} s")
        per_rank = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(a.world)]
    for i, row in enumerate(per_rank[0]):
        rs = [p[i] for p in per_rank]
        off = [p[i - 1] if row["keep_local"] else p[i] for p in per_rank][0]
        err = max(abs(x - y) for x, y in zip(row["logits"], off["logits"], strict=True))
        keys = ("seq", "keep_local", "layout", "all_gather_calls", "all_gather_bytes", "gathered_shapes",
                "cache_kv_gathers", "cache_bytes", "graphs")
        print(json.dumps({k: row[k] for k in keys}
                         | {"filled_per_rank": [r["filled"] for r in rs],
                            "ttft_s_max": round(max(r["ttft_s"] for r in rs), 4),
                            "logit_diff_vs_no_rule": err}))


if __name__ == "__main__":
    main()
