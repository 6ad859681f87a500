"""Measure this machine and write a profile: the numbers behind the hardware symbols.

Compute is measured the way ranks run (one thread per rank, as the gloo tests and benchmarks
set it) and in CPU time, so a busy machine does not distort it: matmul rate per dtype, copy
bandwidth, and the runtime's blockwise attention (``runtime.local.local_forward`` through
``kernels.select``) timed on a few shapes and fitted to ``t = flops/F_eff + 4*P*scores/M +
o*tiles`` (least squares, non-negative). The ranks share the CPUs this process may use
(``cores``). Two spawned processes then run the attention kernel at the same time (how much
slower it gets beside another rank: ``shared_slowdown``), do what a ring step does (both send
to and receive from each other at once), fitted to ``t = alpha + bytes/W``, time
``all_to_all_single`` (all-to-all efficiency), and run a tiny zigzag ring attention whose
kernels cost nothing (host overhead per ring step: ``step_overhead``). Takes about a minute.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ringcompile.errors import CommunicationError
from ringcompile.log import get_logger

from .fits import _nnls, fit_link
from .profiles import Profile

log = get_logger(__name__)

Progress = Callable[[int, int, str], None]
STEPS = ("matmul float32", "matmul float64", "matmul bfloat16", "memory bandwidth", "attention kernel fit",
         "attention backward", "causal skipping", "link, shared kernel, step overhead: 2 ranks", "done")


def _available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_output(name: str) -> Path:
    d = Path("~/.cache/ringcompile/profiles").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}.toml"


def _best_time(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` runs in this thread's CPU time: what the work costs on a core of its
    own, even while other processes share the machine (wall time would count their slices)."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return max(min(times), 1e-9)


def measure_matmul(dtype: torch.dtype, n: int = 512, repeat: int = 5) -> float:
    """Dense matmul FLOP/s for ``dtype`` (square n x n)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t = _best_time(lambda: torch.mm(a, b), repeat)
    return 2 * n**3 / t


def measure_memory_bandwidth(mbytes: int = 64, repeat: int = 5) -> float:
    """Bytes/s of a large copy (read + write)."""
    n = mbytes * (1 << 20) // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), repeat)
    return 2 * n * 4 / t


KERNEL_SHAPES = ((256, 256, 32), (512, 512, 32), (512, 512, 128), (1024, 1024, 64), (1024, 512, 16),
                 (2048, 2048, 64), (4096, 2048, 64))


def runtime_block(spec) -> int:
    """Tokens per block pair the ring runtime hands the CPU kernels for ``spec`` (what it really runs)."""
    from ringcompile.kernels.select import cpu_block_kernels
    from ringcompile.runtime.strategies.common import compute_block

    return compute_block(spec, cpu_block_kernels(spec))


def measure_kernel(tile: int, heads: int = 8, repeat: int = 3, backward: bool = False,
                   shapes: tuple[tuple[int, int, int], ...] = KERNEL_SHAPES):
    """[(flops, score elements, tiles, seconds)] of the runtime's blockwise attention, no mask, fp32.

    Blocks are cut as the ring runtime cuts them (``runtime_block``); ``tiles`` counts
    ``tile``-token squares of every head's score matrix, as the model's tile-overhead term does."""
    from ringcompile.runtime.local import local_backward, local_forward
    from ringcompile.spec import AttentionSpec

    spec = AttentionSpec()
    block = runtime_block(spec)
    out = []
    for x, y, d in shapes:
        q, k, v = (torch.randn(1, heads, n, d) for n in (x, y, y))
        if backward:
            o, lse = local_forward(q, k, v, [], [], y, spec, block=block)
            dout = torch.randn_like(o)

            def fn(q=q, k=k, v=v, o=o, lse=lse, dout=dout, y=y):
                return local_backward(dout, q, k, v, o, lse, [], [], y, spec, block=block)
        else:
            def fn(q=q, k=k, v=v, y=y):
                return local_forward(q, k, v, [], [], y, spec, block=block)
        t = _best_time(fn, repeat)
        out.append((4.0 * heads * x * y * d, float(heads * x * y), heads * x * y / tile**2, t))
    return out


def measure_causal_tile(sizes: tuple[int, ...] = (1024, 2048), heads: int = 4, head_dim: int = 64,
                        repeat: int = 3) -> int:
    """Tokens at which the kernels skip causally masked work, from causal / full time of diagonal
    blocks: ratio = 1/2 + t_c / 2x, so t_c = (ratio - 1/2) * 2x (median over sizes)."""
    from ringcompile.mods import causal
    from ringcompile.runtime.local import local_forward
    from ringcompile.spec import AttentionSpec

    full, masked = AttentionSpec(), AttentionSpec(mask=causal())
    estimates = []
    for x in sizes:
        q, k, v = (torch.randn(1, heads, x, head_dim) for _ in range(3))
        def run(spec, q=q, k=k, v=v, x=x):
            return local_forward(q, k, v, [], [], x, spec, block=runtime_block(spec))

        t_full = _best_time(lambda: run(full), repeat)
        t_causal = _best_time(lambda: run(masked), repeat)
        estimates.append(min(max((t_causal / t_full - 0.5) * 2 * x, 16.0), float(x)))
    return int(round(statistics.median(estimates)))


def fit_kernel(samples, memory_bandwidth: float) -> tuple[float, float, float]:
    """(F_eff, score_passes, tile_overhead) from ``measure_kernel`` samples."""
    coef = _nnls([[fl, 4 * sc / memory_bandwidth, tl] for fl, sc, tl, _ in samples], [s[3] for s in samples])
    inv_f, passes, overhead = coef
    return (1 / inv_f if inv_f > 0 else math.inf), passes, overhead


# ------------------------------------------------------------------ link measurement (2 processes)

LINK_SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22, 1 << 24)


PROBE_SHAPE = (1024, 1024, 64)   # (q tokens, kv tokens, head dim) of the shared-host kernel probe
PROBE_REPEAT = 7


def _step_overhead_probe(repeat: int) -> float:
    """Median seconds of a tiny causal zigzag forward+backward over the process group: 2N ring steps
    whose kernels cost nothing, so what remains is host overhead and message latency."""
    import torch.distributed as dist

    import ringcompile

    n = dist.get_world_size()
    q, k, v = (torch.randn(1, 1, 8, 16, requires_grad=True) for _ in range(3))

    def call() -> None:
        out = ringcompile.ring_attention(q, k, v, is_causal=True, strategy="zigzag", layout="zigzag",
                                         seq_len=8 * n, timeout=30.0)
        out.sum().backward()

    call()   # the first call builds the spec, plan and caches
    times = []
    for _ in range(max(3, 2 * repeat)):
        dist.barrier()
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _link_worker(rank: int, port: int, backend: str, repeat: int, sizes, result_path: str,
                 kernel_block: int = 512, probe_shape: tuple[int, int, int] = PROBE_SHAPE) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    peer = 1 - rank
    rows = []
    try:
        dist.barrier()   # both ranks run the attention kernel at once: how much slower than alone?
        alone_beside = measure_kernel(kernel_block, repeat=PROBE_REPEAT, shapes=(probe_shape,))[0][3]
        kernel = torch.tensor([alone_beside], dtype=torch.float64)
        dist.all_reduce(kernel)
        rows.append(("kernel", 2, float(kernel) / 2))
        rows.append(("overhead", 2, _step_overhead_probe(repeat)))
        for nbytes in sizes:
            send = torch.randn(nbytes // 4)
            recv = torch.empty_like(send)

            def exchange(send=send, recv=recv):
                ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
                if rank == 1:
                    ops.reverse()
                for req in dist.batch_isend_irecv(ops):
                    req.wait()

            times = []
            for _ in range(repeat + 1):
                dist.barrier()
                t0 = time.perf_counter()
                exchange()
                times.append(time.perf_counter() - t0)
            rows.append(("p2p", nbytes, statistics.median(times[1:])))
            a2a_in = torch.randn(2 * (nbytes // 8))
            a2a_out = torch.empty_like(a2a_in)
            times = []
            for _ in range(repeat + 1):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_to_all_single(a2a_out, a2a_in)
                times.append(time.perf_counter() - t0)
            rows.append(("a2a", nbytes, statistics.median(times[1:])))
        if rank == 0:
            with open(result_path, "w") as fh:
                fh.write("\n".join(f"{k} {n} {t!r}" for k, n, t in rows))
    finally:
        dist.destroy_process_group()
    from ringcompile.runtime.spawned_ranks import exit_rank

    exit_rank(0)   # skip interpreter finalization, where gloo can abort the process


def measure_link(backend: str = "gloo", repeat: int = 7, sizes=LINK_SIZES, timeout: float = 90.0,
                 kernel_block: int = 512, probe_shape: tuple[int, int, int] = PROBE_SHAPE):
    """{'p2p': [(bytes, seconds)], 'a2a': [...], 'kernel': [...], 'overhead': [...]}
    measured between 2 spawned ranks."""
    import tempfile

    from ringcompile.runtime.spawned_ranks import free_port, run_spawned

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "link.txt")
        args = (free_port(), backend, repeat, sizes, path, kernel_block, probe_shape)
        if not run_spawned(_link_worker, args, 2, timeout):
            raise CommunicationError(f"link measurement over {backend} did not finish in {timeout:.0f} s")
        rows: dict[str, list[tuple[int, float]]] = {"p2p": [], "a2a": [], "kernel": [], "overhead": []}
        with open(path) as fh:
            for line in fh:
                kind, n, t = line.split()
                rows[kind].append((int(n), float(t)))
    return rows


def calibrate(name: str = "calibrated-cpu", backend: str = "gloo", quick: bool = False,
              progress: Progress | None = None, kernel_block: int = 512,
              kernel_shapes: tuple[tuple[int, int, int], ...] = KERNEL_SHAPES,
              link_sizes: tuple[int, ...] = LINK_SIZES,
              causal_sizes: tuple[int, ...] = (1024, 2048),
              probe_shape: tuple[int, int, int] = PROBE_SHAPE, node_size: int | None = None,
              world_size: int | None = None, base_profile: str | Profile | None = None) -> Profile:
    """Measure and return a Profile for CPU ranks on this host (one thread per rank).

    ``kernel_shapes`` (q tokens, kv tokens, head dim), ``link_sizes`` (bytes) and
    ``probe_shape`` (the kernel timed alone and then in two ranks at once) set the sweep;
    tests pass tiny ones. With ``node_size``, ``world_size`` (default 2 x node_size) ranks are
    spawned as nodes x node_size and the links inside a node and between nodes are measured
    separately (``calibrate_levels``): a two-level profile ([node], [intra], [inter]).
    ``base_profile`` skips the compute and one-level link measurements and takes them from that
    profile (only the two-level links are measured).
    """
    if node_size is not None:
        from .calibrate_levels import LEVEL_SIZES, check_factoring, measure_levels, with_levels
        from .profiles import load_profile

        world = 2 * node_size if world_size is None else world_size
        check_factoring(world, node_size)
        base = (load_profile(base_profile) if base_profile is not None else
                calibrate(name, backend, quick, progress, kernel_block, kernel_shapes, link_sizes,
                          causal_sizes, probe_shape))
        sizes = link_sizes if link_sizes != LINK_SIZES else LEVEL_SIZES[:4] if quick else LEVEL_SIZES
        links = measure_levels(node_size, world, backend, repeat=3 if quick else 7, sizes=sizes)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        return with_levels(base, links, name=name,
                           source=f"ringcompile calibrate --node-size {node_size} --world-size {world}, "
                                  f"torch {torch.__version__}, {when}"
                                  + (f"; compute from {base.name}" if base_profile is not None else ""))
    total = len(STEPS) - 1

    def step(i: int) -> None:
        if progress is not None:
            progress(i, total, STEPS[i])
        log.info("calibrate: %s", STEPS[i])

    repeat = 2 if quick else 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step(0)
        flops = {"float32": measure_matmul(torch.float32, repeat=repeat)}
        step(1)
        flops["float64"] = measure_matmul(torch.float64, repeat=repeat)
        step(2)
        raw_bf16 = measure_matmul(torch.bfloat16, n=256, repeat=repeat)
        # the CPU block kernels compute bf16/fp16 blocks in fp32, so those dtypes run at the fp32 rate
        flops["bfloat16"] = flops["float16"] = flops["float32"]
        step(3)
        mem_bw = measure_memory_bandwidth(repeat=repeat)
        step(4)
        fwd = measure_kernel(kernel_block, repeat=repeat, shapes=kernel_shapes)
        f_eff, passes, overhead = fit_kernel(fwd, mem_bw)
        step(5)
        bwd_shapes = kernel_shapes[1:4]
        bwd = measure_kernel(kernel_block, repeat=max(1, repeat // 2), backward=True, shapes=bwd_shapes)
        fwd_same = [s for s, shape in zip(fwd, kernel_shapes, strict=True) if shape in bwd_shapes]
        backward_factor = statistics.median(b[3] / f[3] for b, f in zip(bwd, fwd_same, strict=True))
        step(6)
        causal_tile = measure_causal_tile(sizes=causal_sizes, repeat=repeat)
        solo_probe = measure_kernel(kernel_block, repeat=PROBE_REPEAT, shapes=(probe_shape,))[0][3]
    finally:
        torch.set_num_threads(threads)
    step(7)
    link = measure_link(backend, repeat=3 if quick else 7, sizes=link_sizes, kernel_block=kernel_block,
                        probe_shape=probe_shape)
    latency, bandwidth = fit_link(link["p2p"])
    cores = float(_available_cpus())
    # the attention kernel's CPU time when two ranks run it at once over its time alone: above 1
    # when the cores share caches, memory bandwidth or execution units (SMT siblings, a busy host)
    slowdown = max(1.0, link["kernel"][0][1] / solo_probe) if link["kernel"] else 1.0
    # a tiny zigzag forward+backward at N=2: 2N = 4 ring steps and 4 transfers (K/V forward; K/V
    # and dK/dV twice in the backward), each about one message latency
    step_overhead = max(0.0, (link["overhead"][0][1] - 4 * latency) / 4) if link["overhead"] else 0.0
    _, a2a_bw = fit_link([(n * 1 // 2, t) for n, t in link["a2a"]])  # (N-1)/N of the buffer moves
    step(8)
    # the block kernel's own GEMMs may beat torch.mm on 512 x 512, so this ratio can exceed 1
    efficiency = f_eff / flops["float32"] if math.isfinite(f_eff) else 1.0
    return Profile(
        name=name, matmul_flops=flops, memory_bandwidth=mem_bw, link_bandwidth=bandwidth,
        link_latency=latency,
        kernel_efficiency=efficiency, score_passes=passes, tile_overhead=overhead, kernel_block=kernel_block,
        backward_factor=backward_factor, causal_tile=causal_tile, cores=round(cores, 2),
        shared_slowdown=round(slowdown, 3), step_overhead=step_overhead,
        alltoall_efficiency=min(1.0, a2a_bw / bandwidth) if math.isfinite(a2a_bw) else 1.0,
        device="cpu",
        description=(f"CPU ranks on this host over {backend} (one thread per rank), measured by "
                     f"`ringcompile calibrate`; raw bf16 matmul {raw_bf16:.3g} FLOP/s"),
        source=f"ringcompile calibrate, torch {torch.__version__}, "
               f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    )
