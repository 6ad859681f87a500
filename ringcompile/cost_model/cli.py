"""``ringcompile plan`` and ``ringcompile calibrate``: the cost model from the command line."""

from __future__ import annotations

import argparse
import sys

from ringcompile.errors import RingCompileError


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="predict time, bubble and memory of every strategy for a workload",
                       description="Rank the strategies for one attention workload, best first.")
    p.add_argument("--seq", type=int, required=True, help="global sequence length (tokens)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks in the ring (with --model and --memory-budget: the smallest that fits)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: from --model)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=None, help="(default: from --model)")
    p.add_argument("--model", default=None,
                   help="llama, gpt2 or an HF config.json: estimate whole-model memory per rank")
    p.add_argument("--memory-budget", default=None, help="per-rank memory, e.g. 80GiB (with --model)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "none"],
                   help="optimizer state counted with --model (default adam)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="forward + backward")
    p.add_argument("--profile", default="h100-nvlink", help="profile name or path to a profile TOML")
    p.add_argument("--block-size", type=int, default=None, help="fix the ring K/V chunk (tokens)")
    p.add_argument("--node-size", type=int, default=None,
                   help="ranks per node: rank every hybrid split outer x inner too (default: the profile's)")
    p.add_argument("--explain", action="store_true", help="print the formulas of the best plan")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw time vs S per strategy and per-rank memory vs S for N=1,2,4,8 (matplotlib)")
    p.add_argument("--decode", action="store_true",
                   help="serving: per-token decode latency, per-rank KV cache bytes and prefill time of a "
                        "--seq-token prompt at N=1 and --world-size (flash-decoding across ranks)")
    p.add_argument("--layers", type=int, default=1, help="attention layers counted with --decode")
    p.add_argument("--params", type=float, default=0,
                   help="weights outside attention counted with --decode (e.g. 7e9), read once per token")
    p.set_defaults(func=run_plan)


def _print_decode(args: argparse.Namespace) -> None:
    from .decode import chunk_bytes, chunk_method_times, estimate_decode
    from .planner import format_seconds

    print("decode (sharded KV cache, one all_gather of (out, lse) per layer):")
    for world in sorted({1, args.world_size}):
        est = estimate_decode(cache_len=args.seq, world_size=world, heads=args.heads, kv_heads=args.kv_heads,
                              head_dim=args.head_dim, layers=args.layers, batch=args.batch, dtype=args.dtype,
                              params=int(args.params), profile=args.profile)
        print("  " + est.lines()[0])
    chunk = dict(q_len=min(args.seq, 4096), cache_len=args.seq, heads=args.heads,
                 kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim)
    moved = chunk_bytes(**chunk)
    print(f"  a {chunk['q_len']}-token chunk against this cache moves {moved['pass_q'] / 2**20:.1f} MiB "
          f"(pass-Q) vs {moved['pass_kv'] / 2**20:.1f} MiB (pass-KV) per batch row")
    if args.world_size > 1:
        times = chunk_method_times(**chunk, world_size=args.world_size, batch=args.batch, dtype=args.dtype,
                                   profile=args.profile)
        pick = {"pass_q": "pass-Q", "pass_kv": "pass-KV"}[min(times, key=times.get)]
        print(f"  predicted at N={args.world_size}: pass-Q {format_seconds(times['pass_q'])}, pass-KV ring "
              f"{format_seconds(times['pass_kv'])} (overlapped): {pick} is chosen")


def run_plan(args: argparse.Namespace) -> int:
    from .crossover import best_pieces, crossovers
    from .planner import format_bytes, format_seconds, plans
    from .strategies import hybrid_split

    try:
        if not _fill_from_model(args):
            return 2
    except RingCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    common = dict(world_size=args.world_size, heads=args.heads, kv_heads=args.kv_heads,
                  head_dim=args.head_dim, batch=args.batch, dtype=args.dtype, causal=args.causal,
                  backward=args.backward, profile=args.profile)
    node = {"node_size": args.node_size} if getattr(args, "node_size", None) else {}
    try:
        ranked = plans(seq_len=args.seq, block_size=args.block_size, **common, **node)
        crosses = crossovers(**common, **node)
        pieces = best_pieces(**common, **node) if any(hybrid_split(p.strategy) for p in ranked) else []
    except RingCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    best = ranked[0]
    w = best.workload
    print(f"S={w.seq_len} N={w.world_size} B={w.batch} H_q={w.heads} H_kv={w.kv_heads} D={w.head_dim} "
          f"{w.dtype} {'causal' if w.causal else 'full'} {'fwd+bwd' if w.backward else 'fwd'} "
          f"profile={best.profile}")
    header = f"{'strategy':<12} {'layout':<11} {'memory/rank':>12} {'time':>12} {'bubble':>8} {'block':>9}"
    print(header)
    print("-" * len(header))
    for p in ranked:
        print(f"{p.strategy:<12} {p.layout:<11} {format_bytes(p.memory.peak):>12} "
              f"{format_seconds(p.time):>12} {p.bubble:>7.1%} {p.block_size:>9}")
    for name, _, reason in best.alternatives:
        if reason:
            print(f"{name:<10} infeasible: {reason}")
    print(f"ring overlap threshold: {best.overlap_threshold:,.0f} tokens per rank block "
          f"(S/N = {w.seq_len / w.world_size:,.0f})")
    if crosses:
        print("crossovers (S where the second overtakes the first):")
        for c in crosses:
            print(f"  S={c.seq_len:>10,}  {c.faster_below} -> {c.faster_above}")
    else:
        print("crossovers: none in [256, 16M]")
    if pieces:
        print("best strategy by S (hybrid-<nodes>x<ranks per node>):")
        for piece in pieces:
            print(f"  S in [{piece.start:,}, {piece.end:,}): {piece.strategy}")
    if args.decode:
        print()
        _print_decode(args)
    if args.explain:
        print()
        print(best.explain())
    if args.plot:
        return _plot(args, common)
    return 0


def _plot(args: argparse.Namespace, common: dict) -> int:
    from .plots import draw_plan_plots, memory_curves, seq_grid, time_curves

    grid = seq_grid(args.seq)
    try:
        times = time_curves(grid, **common)
        memory = memory_curves(grid, getattr(args, "memory_model", None),
                               **{k: v for k, v in common.items() if k != "world_size"})
        budget = None
        if args.memory_budget:
            from .model_plan import parse_bytes

            budget = parse_bytes(args.memory_budget)
        path = draw_plan_plots(args.plot, grid, times, memory,
                               title=f"{args.model or 'attention'}: H={args.heads} D={args.head_dim} "
                                     f"N={args.world_size} profile={args.profile}",
                               budget=budget, memory_label="whole model" if args.model else "attention")
    except RingCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"plot: {path}")
    return 0


def _fill_from_model(args: argparse.Namespace) -> bool:
    """With --model: print its memory per rank (and the smallest world that fits the budget), and
    take heads / head_dim / world size from it. False when the attention plan cannot follow."""
    if args.model is None:
        missing = [f"--{n.replace('_', '-')}" for n in ("world_size", "heads", "head_dim")
                   if getattr(args, n) is None]
        if missing:
            print(f"error: {', '.join(missing)} required (or --model)", file=sys.stderr)
            return False
        return True
    from .model_plan import format_fit, load_model, parse_bytes

    shape = load_model(args.model)
    args.memory_model = shape.memory
    dtype = getattr(__import__("torch"), args.dtype)
    optimizer = None if args.optimizer == "none" else args.optimizer
    args.heads = args.heads or shape.heads
    args.kv_heads = args.kv_heads or shape.kv_heads
    args.head_dim = args.head_dim or shape.head_dim
    if args.memory_budget is not None and args.world_size is None:
        text, world = format_fit(shape, args.seq, parse_bytes(args.memory_budget), dtype=dtype,
                                 optimizer=optimizer)
        print(text)
        if world is None:
            return False
        args.world_size = world
    else:
        args.world_size = args.world_size or 1
        print(shape.memory.estimate(args.world_size, args.seq, dtype=dtype, optimizer=optimizer))
    print()
    return True


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure this machine and write a profile TOML",
                       description="Measure matmul rate, memory bandwidth, the attention block kernel "
                                   "and point-to-point bandwidth/latency between 2 spawned ranks; "
                                   "write a profile.")
    p.add_argument("--output", default=None,
                   help="profile path (default ~/.cache/ringcompile/profiles/NAME.toml)")
    p.add_argument("--name", default="calibrated-cpu", help="profile name")
    p.add_argument("--backend", default="gloo", help="torch.distributed backend for the link test")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (seconds, noisier)")
    p.add_argument("--node-size", type=int, default=None,
                   help="measure a two-level group: ranks per node; the links inside a node and between "
                        "nodes are measured separately and a [node]/[intra]/[inter] profile is written. "
                        "Under torchrun the job's own ranks are measured (real nodes); otherwise "
                        "--world-size ranks are spawned on this host")
    p.add_argument("--world-size", type=int, default=None,
                   help="spawned ranks for --node-size (default 2 x node size)")
    p.add_argument("--base-profile", default=None,
                   help="with --node-size: take the compute numbers from this profile and measure only the "
                        "links (default under torchrun: the device's default profile)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, default_output

    output = args.output or str(default_output(args.name))

    def progress(step: int, total: int, what: str) -> None:
        bar = "#" * step + "." * (total - step)
        print(f"\r[{bar}] {step}/{total} {what:<48}", end="" if step < total else "\n", file=sys.stderr,
              flush=True)

    try:
        if args.node_size is not None and _under_torchrun():
            profile = _calibrate_torchrun(args)
            if profile is None:  # ranks other than 0 measured with it and write nothing
                return 0
        else:
            profile = calibrate(name=args.name, backend=args.backend, quick=args.quick, progress=progress,
                                node_size=args.node_size, world_size=args.world_size,
                                base_profile=args.base_profile)
    except RingCompileError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    with open(output, "w") as fh:
        fh.write(profile.to_toml())
    print(profile.to_toml())
    print(f"wrote {output}")
    return 0


def _under_torchrun() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _calibrate_torchrun(args: argparse.Namespace):
    """Every rank of a torchrun job measures the two levels together; rank 0 returns the profile."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    from .calibrate_levels import fit_levels, measure_levels_here, with_levels
    from .profiles import default_profile_name, load_profile

    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, timeout=datetime.timedelta(seconds=120))
    try:
        rows = measure_levels_here(args.node_size, repeat=3 if args.quick else 7, device=device)
        world, rank = dist.get_world_size(), dist.get_rank()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    base = load_profile(args.base_profile or default_profile_name(device.type))
    return with_levels(base, fit_levels(rows, args.node_size, world), name=args.name,
                       source=f"ringcompile calibrate --node-size {args.node_size} under torchrun "
                              f"({world} ranks, {args.backend}); compute from {base.name}")
