"""Per-rank activation memory with activation checkpointing under backend="ring" at N ranks.

HF ``LlamaForCausalLM`` with ``gradient_checkpointing_enable()`` (default arguments), one
training forward. Activation memory is the bytes autograd keeps for the backward (distinct
storages seen by ``saved_tensors_hooks``, parameters excluded: they are the same everywhere).
Three numbers, the worst rank counted:

- ring, checkpointed, N ranks (the configuration under test);
- one process, checkpointed (backend="ring" at world size 1: the same graph, unsharded);
- ring, not checkpointed, N ranks.

Checkpointing only saves memory when AOTAutograd's partitioner reads the recompute tags, so the
rewritten graph is compiled with AOTAutograd and the min-cut partitioner Inductor uses, with
eager fw/bw compilers (``inner="eager"`` would skip the partitioner; Inductor's code generation
adds minutes on a 2-core VM and changes nothing saved). Prints a Markdown table and writes
``results/checkpoint_memory.json``.

    python benchmarks/checkpoint_memory.py --seq 2048 --world-size 2
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

VOCAB = 256


def build(seq: int, dim: int, layers: int, checkpoint: bool) -> torch.nn.Module:
    import warnings

    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=dim, intermediate_size=2 * dim,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=seq,
                         attn_implementation="sdpa", use_cache=False)
    model = tf.LlamaForCausalLM(cfg).train()
    if checkpoint:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    return model


def use_partitioner() -> None:
    """Compile the rewritten graph with AOTAutograd + the min-cut partitioner (eager kernels)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    from ringcompile import backend

    aot = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop,
                       partition_fn=min_cut_rematerialization_partition)
    backend.inner_compile = lambda gm, example_inputs, options: aot(gm, list(example_inputs))


def saved_bytes(model: torch.nn.Module, fn) -> tuple[object, int]:
    """Run ``fn`` and sum the distinct storages autograd saves for backward, parameters excluded."""
    from ringcompile.demo import activation_bytes

    return activation_bytes(fn, list(model.parameters()))


def checkpoint_side_effects():
    """transformers >= 5.25 with Hugging Face's ``kernels`` installed sets a context variable in every
    checkpointed layer's forward; Dynamo graph-breaks at the checkpoint unless told not to replay it in the
    backward (what ringcompile's warning tells a user to set; ``ringcompile/dynamo_breaks.py``)."""
    from ringcompile.dynamo_breaks import skip_checkpoint_side_effects

    return skip_checkpoint_side_effects()


def measure(seq: int, dim: int, layers: int, checkpoint: bool) -> dict:
    """One compiled training step (after a compile step): activation bytes and the loss."""
    from ringcompile import backend

    torch._dynamo.reset()
    model = build(seq, dim, layers, checkpoint)
    compiled = torch.compile(model, backend="ring", dynamic=False, options={"inner": "eager"})
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, seq), generator=g)
    labels = torch.randint(0, VOCAB, (1, seq), generator=g)
    first = len(backend.HISTORY)
    with checkpoint_side_effects():
        compiled(input_ids=ids, labels=labels).loss.backward()  # compile
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out, saved = saved_bytes(model, lambda: compiled(input_ids=ids, labels=labels))
        out.loss.backward()
    entries = [e for e in backend.HISTORY[first:] if e.graph is not None]
    return {"bytes": saved, "loss": out.loss.item(), "step_s": time.perf_counter() - t0,
            "sites": sum(s.rewritten for e in entries for s in e.sites),
            "sharded_graphs": sum(e.graph.meta.get("ringcompile_shard") is not None for e in entries)}


def _rank(rank, world, init_file, args, out):
    import torch.distributed as dist

    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        use_partitioner()
        res = {name: measure(args.seq, args.dim, args.layers, ckpt)
               for name, ckpt in (("ring_ckpt", True), ("ring_no_ckpt", False))}
        out.put((rank, res))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001
        import traceback

        out.put((rank, {"error": f"{exc}\n{traceback.format_exc()}"}))
    from ringcompile.runtime.spawned_ranks import exit_rank

    exit_rank(0, queues=[out])


def sharded(args) -> list[dict]:
    """The results of ``args.world_size`` spawned gloo ranks (None for a rank that never reported)."""
    from ringcompile.runtime.spawned_ranks import spawn_and_collect

    return spawn_and_collect(_rank, args.world_size, args.timeout,
                             lambda r, init_file, out: (r, args.world_size, init_file, args, out),
                             prefix="ring_ckpt_mem_")


def run(args) -> dict:
    ranks = sharded(args)
    errors = [r.get("error") if r else "no result" for r in ranks if not r or "error" in r]
    if errors:
        return {"errors": errors}
    use_partitioner()
    one = measure(args.seq, args.dim, args.layers, True)
    worst = {k: max(r[k]["bytes"] for r in ranks) for k in ("ring_ckpt", "ring_no_ckpt")}
    return {"seq": args.seq, "world_size": args.world_size, "dim": args.dim, "layers": args.layers,
            "one_process_ckpt": one, "ranks": ranks, "worst_rank_bytes": worst,
            "ratio_vs_one_process_ckpt": worst["ring_ckpt"] / one["bytes"],
            "ratio_vs_ring_no_ckpt": worst["ring_ckpt"] / worst["ring_no_ckpt"], "errors": []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint_memory.json"))
    args = ap.parse_args(argv)
    res = run(args)
    if res["errors"]:
        print("errors:", *res["errors"], sep="\n")
        return 1
    res["machine"] = "2-core CPU VM, torch " + torch.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    mib = 2 ** 20
    w = res["worst_rank_bytes"]
    print("| S | N | ring + ckpt, worst rank (MiB) | one process + ckpt (MiB) | ratio | "
          "ring, no ckpt, worst rank (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.seq} | {args.world_size} | {w['ring_ckpt'] / mib:.2f} | "
          f"{res['one_process_ckpt']['bytes'] / mib:.2f} | {res['ratio_vs_one_process_ckpt']:.2f}x | "
          f"{w['ring_no_ckpt'] / mib:.2f} | {res['ratio_vs_ring_no_ckpt']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
