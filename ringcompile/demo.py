"""``ringcompile demo``: compile a small built-in model with backend="ring" on N CPU ranks and check it.

Spawns ``--world-size`` gloo ranks on this machine. Every rank compiles the model with
``torch.compile(model, backend="ring")``, runs one forward+backward to compile, then a timed
forward+backward, and compares the loss and every parameter gradient with the same model run
unsharded in one process (eager, full sequence). Each rank reports the plan chosen for each
attention, the step time, the measured bubble, its activation and peak memory, and the
agreement with the reference. This module is CLI code: it prints.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import resource
import sys
import time
import traceback
from typing import Any

TOLERANCE = {"float32": (2e-4, 2e-3), "float64": (1e-9, 1e-8)}  # (loss rel, grad rel to max |grad|)


def add_parser(sub: Any) -> None:
    from .models import MODELS

    p = sub.add_parser("demo", help="run a small model sequence-parallel on CPU ranks and check it "
                                    "against one process")
    p.add_argument("--world-size", type=int, default=2, help="CPU ranks to spawn (default 2)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--model", choices=sorted(MODELS), default="llama", help="built-in model (default llama)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: heads/2 for llama, heads for gpt2")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(TOLERANCE), default="float32")
    p.add_argument("--inner", choices=["eager", "inductor"], default="eager",
                   help="compiler for the rest of the graph (inductor compiles slowly on 2 cores)")
    p.add_argument("--strategy", default="auto", help="ring strategy (default: the cost model chooses)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the demo gives up")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="also write DIR/trace.json, DIR/timeline.png and DIR/summary.txt (ringcompile trace)")
    p.set_defaults(func=run)


@dataclasses.dataclass
class DemoConfig:
    world_size: int
    seq: int
    model: str
    batch: int
    layers: int
    dim: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str
    inner: str
    strategy: str
    timeout: float


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    kv = args.kv_heads if args.kv_heads is not None else (
        max(1, args.heads // 2) if args.model == "llama" else args.heads)
    return DemoConfig(args.world_size, args.seq, args.model, args.batch, args.layers, args.dim, args.heads,
                      kv, args.vocab, args.dtype, args.inner, args.strategy, args.timeout)


# ---------------------------------------------------------------------------- one rank


def activation_bytes(fn, params: Any = ()) -> tuple[Any, int]:
    """Run ``fn`` and count the bytes autograd saves for backward (distinct storages), without the
    storages of ``params`` (a saved weight is the parameter itself, not an activation)."""
    import torch

    seen: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in params}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _plans(cfg: DemoConfig, graphs: list[Any]) -> list[dict]:
    """The plan for each ring_attention call in the compiled graphs (what strategy "auto" runs)."""
    from .ops import RingCall, is_ring_call

    rows = []
    for gm in graphs:
        report = gm.meta.get("ringcompile_shard")
        for node in gm.graph.nodes:
            if not is_ring_call(node):
                continue
            call = RingCall.from_node(node)
            spec = call.spec
            q, k = call.q.meta["val"], call.k.meta["val"]
            seq = int(call.seq_len)
            row = {"site": spec.name or node.name, "mask": spec.mask.describe() if spec.mask else "none",
                   "layout": spec.layout or "contiguous", "local_q": tuple(int(s) for s in q.shape),
                   "seq": seq, "sharded_graph": report is not None}
            try:
                from .cost_model.planner import choose_for_call

                causal = spec.mask is not None and "causal" in spec.mask.kinds
                plan = choose_for_call(seq_len=seq, world_size=cfg.world_size, batch=int(q.shape[0]),
                                       heads=int(q.shape[1]), kv_heads=int(k.shape[1]),
                                       head_dim=int(q.shape[3]), dtype=q.dtype, causal=causal, backward=True,
                                       layout=spec.layout or "contiguous", device="cpu")
                row.update(planned=plan.strategy, predicted_s=plan.time, predicted_bubble=plan.bubble)
            except Exception as exc:  # noqa: BLE001 - the plan is informative; the run still happens
                row.update(planned=f"unavailable ({type(exc).__name__}: {exc})")
            rows.append(row)
    return rows


def rank_main(rank: int, cfg: DemoConfig, init_file: str, out: Any) -> None:
    """Everything one rank does; the result (or the traceback) goes to ``out``."""
    from ringcompile.runtime.spawned_ranks import exit_rank

    code = 0
    try:
        out.put((rank, _rank_main(rank, cfg, init_file)))
    except BaseException:  # noqa: BLE001 - report, never hang the parent
        out.put((rank, {"error": traceback.format_exc()}))
        code = 1
    exit_rank(code, queues=[out])   # skip interpreter finalization, where gloo can abort the process


def _rank_main(rank: int, cfg: DemoConfig, init_file: str) -> dict:
    import torch
    import torch.distributed as dist

    from . import backend
    from .models import ModelConfig, build_model
    from .runtime import timing

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world_size))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cfg.world_size,
                            timeout=datetime.timedelta(seconds=cfg.timeout))
    dtype = getattr(torch, cfg.dtype)
    mcfg = ModelConfig(vocab=cfg.vocab, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, max_seq=max(cfg.seq, 16))
    model = build_model(cfg.model, mcfg, seed=0).to(dtype)
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen)
    labels = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen)

    torch._dynamo.reset()
    first = len(backend.HISTORY)
    compiled = torch.compile(model, backend="ring", dynamic=False,
                             options={"inner": cfg.inner, "strategy": cfg.strategy, "timeout": cfg.timeout})
    t0 = time.perf_counter()
    _, loss = compiled(ids, labels)
    loss.backward()
    compile_s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    dist.barrier()

    with timing.record() as calls:
        t0 = time.perf_counter()
        (_, loss), act_bytes = activation_bytes(lambda: compiled(ids, labels), list(model.parameters()))
        loss.backward()
        step_s = time.perf_counter() - t0
    entries = backend.HISTORY[first:]
    graphs = [e.graph for e in entries if e.graph is not None]
    fallbacks = [e.fallback_reason for e in entries if e.fallback_reason]

    t0 = time.perf_counter()
    ref_params = list(reference.parameters())
    (_, ref_loss), ref_act_bytes = activation_bytes(lambda: reference(ids, labels), ref_params)
    ref_loss.backward()
    ref_s = time.perf_counter() - t0

    grad_err, grad_scale = 0.0, 0.0
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            continue
        if p.grad is None:
            grad_err = float("inf")
            continue
        grad_err = max(grad_err, (p.grad - q.grad).abs().max().item())
        grad_scale = max(grad_scale, q.grad.abs().max().item())
    loss_err = abs(loss.item() - ref_loss.item())
    tol_loss, tol_grad = TOLERANCE[cfg.dtype]
    ok = (loss_err <= tol_loss * max(1.0, abs(ref_loss.item()))
          and grad_err <= tol_grad * max(grad_scale, 1e-12))
    sites = [(s.name, s.rewritten, s.reason) for e in entries for s in e.sites]
    shard = [g.meta.get("ringcompile_shard") for g in graphs]
    result = {
        "ok": ok, "loss": loss.item(), "ref_loss": ref_loss.item(), "loss_err": loss_err,
        "grad_err": grad_err, "grad_scale": grad_scale, "compile_s": compile_s, "step_s": step_s,
        "ref_step_s": ref_s, "act_bytes": act_bytes, "ref_act_bytes": ref_act_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "plans": _plans(cfg, graphs), "sites": sites, "fallbacks": fallbacks,
        "shard": [dataclasses.asdict(s) if s is not None else None for s in shard],
        "calls": [c.as_dict() for c in calls],
    }
    dist.barrier()
    dist.destroy_process_group()
    return result


# ---------------------------------------------------------------------------- parent


def launch(cfg: DemoConfig) -> list[dict]:
    """Spawn the ranks and collect one result dict per rank (errors included, never hangs)."""
    from .runtime.spawned_ranks import spawn_and_collect

    results = spawn_and_collect(rank_main, cfg.world_size, cfg.timeout,
                                lambda r, init_file, out: (r, cfg, init_file, out),
                                prefix="ringcompile_demo_")
    return [r if r is not None else {"error": f"rank {i} gave no result within {cfg.timeout:g} s (crashed or "
                                             "hung; rerun with -v)"} for i, r in enumerate(results)]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_rank(rank: int, res: dict, cfg: DemoConfig) -> list[str]:
    if "error" in res:
        return [f"[rank {rank}] FAILED:", *("    " + line for line in res["error"].rstrip().splitlines())]
    lines = [f"[rank {rank}]"]
    for reason in res["fallbacks"]:
        lines.append(f"  WARNING: a graph fell back to unsharded execution: {reason}")
    for sh in res["shard"]:
        if sh:
            lines.append(f"  sharding: seq {sh['seq_len']} on {sh['world_size']} ranks, layout "
                         f"{sh['layout']}, inputs {sh['seeds']}, gathers inside the graph "
                         f"{sh['gathers'] or 'none'}")
        else:
            lines.append("  sharding: NOT sharded (every rank computed the full sequence)")
    fwd = [c for c in res["calls"] if c["phase"] == "forward"]
    for i, plan in enumerate(res["plans"]):
        ran = fwd[i]["strategy"] if i < len(fwd) else "?"
        pred = (f"predicted {plan['predicted_s'] * 1e3:.2f} ms, bubble {plan['predicted_bubble']:.0%}"
                if "predicted_s" in plan else str(plan["planned"]))
        lines.append(f"  attention {plan['site']}: mask {plan['mask']}, local q {plan['local_q']}, layout "
                     f"{plan['layout']}; plan {plan.get('planned', '?') if 'predicted_s' in plan else '-'} "
                     f"({pred}); ran {ran}")
    compute = sum(c["compute_s"] for c in res["calls"])
    wait = sum(c["wait_s"] for c in res["calls"])
    bubble = wait / (compute + wait) if compute + wait > 0 else 0.0
    lines.append(f"  step (fwd+bwd): {res['step_s'] * 1e3:,.1f} ms  (first step incl. compile "
                 f"{res['compile_s']:.1f} s; one process unsharded: {res['ref_step_s'] * 1e3:,.1f} ms)")
    lines.append(f"  ring attention: {len(res['calls'])} calls, compute {compute * 1e3:,.1f} ms, waiting "
                 f"{wait * 1e3:,.1f} ms -> measured bubble {bubble:.1%}")
    ratio = res["act_bytes"] / res["ref_act_bytes"] if res["ref_act_bytes"] else float("nan")
    lines.append(f"  memory: activations saved for backward {_mb(res['act_bytes'])} vs one process "
                 f"{_mb(res['ref_act_bytes'])} ({ratio:.2f}x); peak RSS {_mb(res['peak_rss_bytes'])}")
    verdict = "OK" if res["ok"] else "MISMATCH"
    lines.append(f"  agreement with one process: loss {res['loss']:.6f} vs {res['ref_loss']:.6f} "
                 f"(|diff| {res['loss_err']:.2e}); max |grad diff| {res['grad_err']:.2e} "
                 f"(max |grad| {res['grad_scale']:.2e}) -> {verdict}")
    return lines


def _estimate_line(cfg: DemoConfig, results: list[dict]) -> str:
    """``estimate_memory``'s activations per rank beside what rank 0 measured."""
    import torch

    from .cost_model.whole_model import estimate_memory
    from .errors import RingCompileError
    from .models import ModelConfig, build_model

    mcfg = ModelConfig(vocab=cfg.vocab, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads,
                       kv_heads=cfg.kv_heads, max_seq=max(cfg.seq, 16))
    model = build_model(cfg.model, mcfg, seed=0).to(getattr(torch, cfg.dtype))
    example = torch.randint(0, cfg.vocab, (cfg.batch, 16))
    try:
        est = estimate_memory(model, example, example, world_size=cfg.world_size, seq_len=cfg.seq,
                              options={"inner": cfg.inner})
    except RingCompileError as exc:
        return f"memory estimate: not available ({exc})"
    measured = results[0].get("act_bytes") if results and "error" not in results[0] else None
    if not measured:
        return f"memory estimate: activations {_mb(est.terms['activations'])} per rank (no measurement)"
    err = est.terms["activations"] / measured - 1
    return (f"memory estimate (ringcompile.estimate_memory, fake tensors): activations "
            f"{_mb(est.terms['activations'])} per rank vs measured {_mb(measured)} on rank 0 ({err:+.1%}); "
            f"per-rank peak {_mb(est.per_rank_peak)}")


def _write_trace(directory: str) -> None:
    from .errors import RingCompileError
    from .observe.cli import write_outputs

    try:
        written = write_outputs(os.path.join(directory, "ranks"), directory)
    except RingCompileError as exc:
        print(f"trace: not written: {exc}")
        return
    for kind, path in written.items():
        print(f"{kind}: {path}")
    print(open(written["summary"], encoding="utf-8").read().rstrip())


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.world_size < 1:
        print("--world-size must be at least 1", file=sys.stderr)
        return 2
    print(f"ringcompile demo: {cfg.model} ({cfg.layers} layers, dim {cfg.dim}, {cfg.heads} heads / "
          f"{cfg.kv_heads} KV heads, {cfg.dtype}), batch {cfg.batch}, seq {cfg.seq}, "
          f"{cfg.world_size} gloo CPU ranks, inner compiler {cfg.inner}", flush=True)
    t0 = time.perf_counter()
    trace = getattr(args, "trace", None)
    if trace:  # the spawned ranks inherit the variable and record their ring calls
        from .observe.collect import TRACE_ENV

        raw = os.path.join(trace, "ranks")
        os.makedirs(raw, exist_ok=True)
        for name in os.listdir(raw):
            if name.startswith("calls-"):
                os.unlink(os.path.join(raw, name))
        os.environ[TRACE_ENV] = raw
    results = launch(cfg)
    for rank, res in enumerate(results):
        for line in format_rank(rank, res, cfg):
            print(line)
    print(_estimate_line(cfg, results))
    if trace:
        _write_trace(trace)
    ok = all(res.get("ok") for res in results)
    sharded = all(res.get("shard") and all(res["shard"]) for res in results if "error" not in res)
    print(f"{'PASS' if ok else 'FAIL'}: loss and gradients "
          f"{'match' if ok else 'do not match'} one process"
          f"{'' if sharded else ' (WARNING: the graph was not sequence-sharded)'}; "
          f"total {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1
