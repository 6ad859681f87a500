"""Per-rank peak memory of a whole model under ``backend="ring"``, without N processes.

The model is captured once like ``torch.compile`` does (small real inputs, dynamic shapes),
the pipeline rewrites its attention into the ring op, and the rewritten graph is then traced
by AOTAutograd on fake tensors at the per-rank length ``ceil(S / N)``. The partition AOTAutograd
makes is the one the inner compiler would make (min-cut rematerialisation for Inductor, the
default partition for ``inner="eager"``), and it honours checkpoint regions' recompute tags, so
the tensors the backward reads are exactly what a rank saves: that is the ``activations``
term. The ring op saves only its shards (q, k, v, out, lse), never an S x S matrix.

Terms (bytes per rank): parameters, gradients, optimizer state (``optimizer="adam"``: two fp32
moments per parameter; ``"sgd"``: one momentum buffer), activations, attention_buffers (one
attention call's fp32 accumulators, live during the call), communication (the K/V chunks in
flight, and the dK/dV accumulators travelling in the backward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from ..errors import OptionError, RingCompileError

OPTIMIZER_STATES = {None: 0, "sgd": 1, "adam": 2, "adamw": 2}  # fp32 buffers per parameter


@dataclasses.dataclass
class MemoryEstimate:
    """Per-rank peak bytes and the terms they are the sum of."""

    world_size: int
    seq_len: int
    local_len: int
    terms: dict[str, int]
    graphs: int
    attention_calls: int

    @property
    def per_rank_peak(self) -> int:
        return sum(self.terms.values())

    def __str__(self) -> str:
        width = max(len(k) for k in self.terms)
        lines = [f"per-rank memory at S={self.seq_len:,} on {self.world_size} ranks "
                 f"({self.local_len:,} tokens per rank, {self.attention_calls} attention calls, "
                 f"{self.graphs} graph{'s' if self.graphs != 1 else ''})"]
        lines += [f"  {k:<{width}}  {_fmt(v):>11}" for k, v in self.terms.items()]
        lines.append(f"  {'peak':<{width}}  {_fmt(self.per_rank_peak):>11}")
        return "\n".join(lines)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    return str(n)


@dataclasses.dataclass
class _Captured:
    graph: fx.GraphModule
    example_values: list[Any]  # the rewritten graph's placeholder values (symbolic sizes)
    is_param: list[bool]  # which placeholders are the model's parameters
    requires_grad: list[bool]  # Dynamo's inputs' flags (the retraced values have lost them)


class _CaptureRewritten:
    """A torch.compile backend that keeps each graph after the pipeline's rewrite stage."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.graphs: list[_Captured] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        from ..passes import PipelineState, run_pipeline, stages_through

        state = PipelineState(gm, self.options)
        run_pipeline(state, stages_through("rewrite"))
        values = [n.meta.get("val") for n in state.graph.graph.nodes if n.op == "placeholder"]
        if len(values) != len(example_inputs):
            raise RingCompileError("the rewritten graph's inputs do not match Dynamo's; cannot estimate")
        self.graphs.append(_Captured(state.graph, values,
                                     [isinstance(x, torch.nn.Parameter) for x in example_inputs],
                                     [bool(getattr(x, "requires_grad", False)) for x in example_inputs]))
        return gm.forward


def estimate_memory(model: torch.nn.Module, *example_inputs: Any, world_size: int, seq_len: int,
                    seq_dim: int = 1, dtype: torch.dtype | None = None, training: bool = True,
                    optimizer: str | None = None, options: dict[str, Any] | None = None,
                    **example_kwargs: Any) -> MemoryEstimate:
    """Estimate per-rank peak memory of ``model`` compiled with ``backend="ring"`` on ``world_size``
    ranks at global sequence length ``seq_len``.

    ``example_inputs`` are small real inputs (their dimension ``seq_dim`` is the sequence, at
    least 2 long); nothing runs at ``seq_len``. A model built on the meta device (too big to
    build for real) works too, with meta example inputs. ``dtype`` casts the parameters (default:
    as they are). ``training`` counts gradients and saved activations; ``optimizer`` adds its
    state. ``options`` are the backend options (``inner`` decides the partition).
    """
    memory = MemoryModel.capture(model, *example_inputs, seq_dim=seq_dim, options=options, **example_kwargs)
    return memory.estimate(world_size, seq_len, dtype=dtype, training=training, optimizer=optimizer)


class MemoryModel:
    """A model captured once; ``estimate`` then answers for any world size and length (fast)."""

    def __init__(self, model: torch.nn.Module, graphs: list[_Captured], seq_symbol: Any,
                 options: Any) -> None:
        self.params = list(model.parameters())
        self.graphs = graphs
        self.seq_symbol = seq_symbol
        self.options = options

    @classmethod
    def capture(cls, model: torch.nn.Module, *example_inputs: Any, seq_dim: int = 1,
                options: dict[str, Any] | None = None, **example_kwargs: Any) -> MemoryModel:
        from ..options import Options

        opts = Options.from_mapping(options)
        model = getattr(model, "_orig_mod", model)
        capture = _CaptureRewritten(opts)
        param = next(iter(model.parameters()), None)
        on_meta = param is not None and param.device.type == "meta"
        torch._dynamo.reset()
        try:
            with torch.no_grad(), (torch.device("meta") if on_meta else contextlib.nullcontext()):
                torch.compile(model, backend=capture, dynamic=True)(*example_inputs, **example_kwargs)
        finally:
            torch._dynamo.reset()
        if not capture.graphs:
            raise RingCompileError("torch.compile captured no graph from this model; nothing to estimate")
        if on_meta:  # traced on fake CPU tensors: every op has its autograd formula there
            for captured in capture.graphs:
                _meta_to_cpu(captured.graph)
        seq_symbol = _sequence_symbol(capture.graphs[0].example_values, example_inputs, seq_dim)
        return cls(model, capture.graphs, seq_symbol, opts)

    def estimate(self, world_size: int, seq_len: int, *, dtype: torch.dtype | None = None,
                 training: bool = True, optimizer: str | None = None) -> MemoryEstimate:
        if world_size < 1 or seq_len < 1:
            raise OptionError(f"world_size and seq_len must be positive, got {world_size} and {seq_len}")
        if optimizer not in OPTIMIZER_STATES:
            raise OptionError(f"optimizer must be one of {list(OPTIMIZER_STATES)}, got {optimizer!r}")
        local = math.ceil(seq_len / world_size)
        elem = (lambda p: dtype.itemsize) if dtype is not None else (lambda p: p.element_size())
        param_bytes = sum(p.numel() * elem(p) for p in self.params)
        trainable = [p for p in self.params if p.requires_grad]
        saved, buffers, comm, calls = 0, 0, 0, 0
        for captured in self.graphs:
            traced = _trace_at(captured, self.seq_symbol, local, dtype, training, self.options)
            saved += traced.saved
            buffers, comm = max(buffers, traced.attention_buffers), max(comm, traced.communication)
            calls += traced.calls
        n_trainable = sum(p.numel() for p in trainable)
        terms = {"parameters": param_bytes,
                 "gradients": sum(p.numel() * elem(p) for p in trainable) if training else 0,
                 "optimizer": OPTIMIZER_STATES[optimizer] * 4 * n_trainable if training else 0,
                 "activations": saved if training else 0, "attention_buffers": buffers,
                 "communication": comm if world_size > 1 else 0}
        return MemoryEstimate(world_size, seq_len, local, terms, len(self.graphs), calls)

    def smallest_world(self, seq_len: int, budget: int, *, candidates: Sequence[int] | None = None,
                       **kwargs: Any) -> MemoryEstimate | None:
        """The estimate at the smallest world size whose per-rank peak fits ``budget`` bytes."""
        sizes = candidates or [2 ** i for i in range(0, 15)]
        for n in sizes:
            if n > seq_len:
                break
            est = self.estimate(n, seq_len, **kwargs)
            if est.per_rank_peak <= budget:
                return est
        return None


def _sequence_symbol(values: Sequence[Any], example_inputs: Sequence[Any], seq_dim: int) -> Any:
    """The symbol Dynamo gave the sequence length: the size of the first input's ``seq_dim``."""
    length = None
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > seq_dim:
            length = x.shape[seq_dim]
            break
    if length is None:
        raise OptionError(f"no example input has a dimension {seq_dim} (seq_dim) to take the sequence from")
    if length < 2:
        raise OptionError("the example inputs' sequence must be at least 2 long (Dynamo specialises 0 and 1)")
    for v in values:
        if isinstance(v, torch.Tensor):
            for size in v.shape:
                if isinstance(size, torch.SymInt) and size.node.hint == length:
                    return size.node.expr
        elif isinstance(v, torch.SymInt) and v.node.hint == length:
            return v.node.expr
    raise RingCompileError("the captured graph has no dynamic size equal to the example sequence length "
                           f"({length}); pass example inputs whose sequence length differs from other sizes")


def _concrete(size: Any, seq_symbol: Any, local: int) -> int:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        env = size.node.shape_env  # torch 2.13 renamed var_to_val (2.11 has only the old name)
        known = getattr(env, "backed_var_to_val", None)
        known = known if known is not None else env.var_to_val
        hints = {s: (local if s == seq_symbol else known.get(s, 1)) for s in expr.free_symbols}
        return int(expr.subs(hints))
    return int(size)


@dataclasses.dataclass
class _Traced:
    saved: int
    attention_buffers: int
    communication: int
    calls: int


def _trace_at(captured: _Captured, seq_symbol: Any, local: int, dtype: torch.dtype | None, training: bool,
              opts: Any) -> _Traced:
    """What one graph saves, and its largest attention call's buffers, at ``local`` tokens per rank."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    is_param = captured.is_param
    inputs: list[Any] = []
    with mode:
        for v, param, grad in zip(captured.example_values, is_param, captured.requires_grad, strict=True):
            if isinstance(v, torch.SymInt):
                inputs.append(_concrete(v, seq_symbol, local))
            elif not isinstance(v, torch.Tensor):
                inputs.append(v)
            else:
                shape = [_concrete(s, seq_symbol, local) for s in v.shape]
                cast = dtype is not None and param and v.dtype.is_floating_point
                device = "cpu" if v.device.type == "meta" else v.device
                t = torch.empty(shape, dtype=dtype if cast else v.dtype, device=device)
                inputs.append(t.requires_grad_(True) if grad and training else t)
    found: dict[str, Any] = {"saved": 0, "calls": []}
    partition = default_partition if opts.inner == "eager" else min_cut_rematerialization_partition

    def partition_fn(joint, joint_inputs, **kwargs):
        fw, bw = partition(joint, joint_inputs, **kwargs)
        found["saved"] = _saved_bytes(bw, fw, is_param)
        return fw, bw

    def fw_compiler(gm: fx.GraphModule, _inputs: Any) -> Callable:
        found["calls"] = _ring_calls(gm)
        return gm.forward

    if not training:
        with mode, torch.no_grad():
            gm = captured.graph
            found["calls"] = _ring_calls_shapes(gm, inputs, mode)
    else:
        with mode:
            aot_module_simplified(captured.graph, inputs, fw_compiler=fw_compiler, bw_compiler=lambda g, _: g,
                                  partition_fn=partition_fn)
    buffers, comm = 0, 0
    for q_shape, k_shape, elem in found["calls"]:
        b, hq, lq, d = q_shape
        hkv, lk = k_shape[1], k_shape[2]
        fp32 = 4
        buffers = max(buffers, b * hq * lq * d * fp32 + 2 * b * hkv * lk * d * fp32 + 2 * b * hq * lq * fp32)
        kv_chunk = 2 * b * hkv * lk * d * elem
        comm = max(comm, 2 * kv_chunk + (2 * 2 * b * hkv * lk * d * fp32 if training else 0))
    return _Traced(found["saved"], buffers, comm, len(found["calls"]))


def _meta_to_cpu(gm: fx.GraphModule) -> None:
    """Rewrite ``device=meta`` arguments of a graph captured from a meta-device model to CPU.

    Tracing stays on fake tensors (no memory); CPU is used because some ops (nll_loss) have no
    autograd formula registered for meta, which would hide the tensors their backward saves.
    """
    meta = torch.device("meta")

    def fix(x: Any) -> Any:
        if isinstance(x, torch.device) and x == meta:
            return torch.device("cpu")
        if x == "meta":
            return "cpu"
        return x

    for n in gm.graph.nodes:
        n.args = tuple(fix(a) for a in n.args)
        n.kwargs = {k: fix(v) for k, v in n.kwargs.items()}
    gm.recompile()


def _saved_bytes(bw: fx.GraphModule, fw: fx.GraphModule, is_param: list[bool]) -> int:
    """Bytes of the storages the backward reads from the forward (its non-tangent inputs).

    A saved view (``t`` of a weight, ``view`` of an activation, ``detach``) shares its base's
    storage, as a rank's allocator sees it: each base counts once, and parameters' bases not at all
    (they are the ``parameters`` term).
    """
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    placeholders = [n for n in fw.graph.nodes if n.op == "placeholder"]
    params = {n for n, p in zip(placeholders, is_param, strict=False) if p}
    bases: dict[fx.Node, int] = {}
    for n in bw.graph.nodes:
        if n.op != "placeholder" or n.name.startswith("tangents"):
            continue
        source = fw_nodes.get(n.name)
        base = _storage_base(source) if source is not None else None
        if base is None or base in params:
            continue
        val = base.meta.get("val")
        if isinstance(val, torch.Tensor):
            bases[base] = val.numel() * val.element_size()
    return int(sum(bases.values()))


def _storage_base(node: fx.Node) -> fx.Node:
    """The node whose storage ``node`` views (itself when it owns its storage)."""
    import operator

    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        target = node.target
        if target is operator.getitem:
            parent = node.args[0]
            if not (parent.op == "call_function" and _returns_view(parent.target)):
                break
            node = parent.args[0] if parent.args and isinstance(parent.args[0], fx.Node) else parent
            continue
        if not _returns_view(target):
            break
        node = node.args[0]
    return node


def _returns_view(target: Any) -> bool:
    """Whether an aten op's result aliases its input (schema ``Tensor(a) -> Tensor(a)``, not in place)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return False
    returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    in_place = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return returns_alias and not in_place


def _ring_calls(gm: fx.GraphModule) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    from ..ops import RingCall, is_ring_call

    out = []
    for n in gm.graph.nodes:
        if is_ring_call(n):
            call = RingCall.from_node(n)
            q, k = call.q.meta["val"], call.k.meta["val"]
            out.append((tuple(int(s) for s in q.shape), tuple(int(s) for s in k.shape), q.element_size()))
    return out


def _ring_calls_shapes(gm: fx.GraphModule, inputs: list[Any], mode: Any) -> list:
    """Ring calls' shapes in an inference graph: propagate fake values through it."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    return _ring_calls(gm)
