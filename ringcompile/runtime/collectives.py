"""Traceable collectives that sequence sharding of a whole graph inserts.

Each is a custom op with a fake implementation and registered autograd, so Dynamo,
AOTAutograd and Inductor see one opaque call and the backward collective is traced into
the backward graph. The conventions (transparent mode) that make ``.grad`` equal the
one-device gradient:

* ``to_local``       replicated -> local shard (slice by the layout's index list);
                     backward scatters the local gradient and all-reduces it.
* ``gather_seq``     local shard -> full replicated tensor (all-gather in layout order,
                     padding stripped); backward slices the (replicated) gradient.
* ``reduce_partial`` partial sums -> replicated total (all-reduce); backward is the identity
                     because the gradient of a replicated value is identical on every rank.
* ``grad_reduce``    identity forward for a replicated value that feeds sharded work;
                     backward all-reduces the partial gradient each rank computed.
* ``shift_seq``      ``x[..., k:, ...]`` of a shard in the same layout: a halo of ``k``
                     positions per chunk comes from the neighbouring chunks, not a gather.

A sharded tensor is described by ``dim`` and ``inner``: the global size of ``dim`` is
``outer * seq * inner`` (``inner`` = 1 for a plain sequence dim; > 1 when the sequence was
flattened together with faster-varying dims), and each rank holds its index list of the
``seq`` factor.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from ringcompile.errors import CommunicationError, ShapeMismatchError
from ringcompile.op_support import SYNCING

from .group import wait_work
from .layouts import local_indices, padded_length

Tensor = torch.Tensor


__all__ = ["padded_length", "local_index", "reduce_partial", "grad_reduce", "grad_reduce_view", "to_local",
           "gather_seq"]


def local_index(padded: int, world: int, rank: int, layout: str) -> list[int]:
    """Global positions (in the padded sequence) that ``rank`` holds, in local order."""
    return local_indices(padded, world, rank, layout).tolist()


# ---------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=256)
def layout_index(padded: int, world: int, rank: int, layout: str, device: torch.device) -> Tensor:
    """``local_index`` as a LongTensor on ``device``, built once per (device, content).

    Building one from a list copies host memory to the device (on a GPU: a synchronous upload)
    on every call; the same few lists repeat, so each is uploaded once and reused. The tensors
    are only ever read (index_select / index_copy_ / index_add_)."""
    return torch.tensor(local_index(padded, world, rank, layout), dtype=torch.long, device=device)


def group_by_name(group_name: str):
    """The ProcessGroup behind a name (ops carry names, not group objects)."""
    if not dist.is_initialized():
        raise CommunicationError("a sequence-sharded graph ran without torch.distributed initialised; "
                                 "call dist.init_process_group before running the compiled model")
    if group_name in ("", "default", "WORLD"):
        return dist.group.WORLD
    return dist.distributed_c10d._resolve_process_group(group_name)


def group_name_of(group) -> str:
    """Name to carry in an op call for ``group`` (None = the default group)."""
    if group is None:
        return "default"
    if hasattr(group, "get_group"):  # DeviceMesh
        group = group.get_group()
    return group.group_name


def _wait(work, timeout: float, what: str, group) -> None:
    try:
        ok = wait_work(work, group, timeout)  # explicit timeout on gloo only (runtime/group.py)
    except RuntimeError as exc:
        raise CommunicationError(
            f"rank {dist.get_rank()}: {what} failed or exceeded the {timeout:g} s timeout ({exc}); "
            "check that every rank runs the same compiled graph with the same sequence length") from exc
    if ok is False:
        raise CommunicationError(f"rank {dist.get_rank()}: {what} did not finish within {timeout:g} s")


def _all_reduce(x: Tensor, group_name: str, timeout: float) -> Tensor:
    group = group_by_name(group_name)
    y = x.detach().clone().contiguous()
    if dist.get_world_size(group) > 1:
        _wait(dist.all_reduce(y, group=group, async_op=True), timeout, "all-reduce", group)
    return y


def _split_seq(x: Tensor, dim: int, inner: int, seq: int) -> tuple[Tensor, int]:
    """``x`` with dim ``dim`` (= outer*seq*inner) split into (outer, seq, inner), and the seq axis."""
    size = x.shape[dim]
    if size % (seq * inner):
        raise ShapeMismatchError(f"dim {dim} of size {size} is not a multiple of seq {seq} x inner {inner}")
    outer = size // (seq * inner)
    shape = list(x.shape[:dim]) + [outer, seq, inner] + list(x.shape[dim + 1:])
    return x.reshape(shape), dim + 1


def _merge_seq(x: Tensor, dim: int) -> Tensor:
    merged = x.shape[dim] * x.shape[dim + 1] * x.shape[dim + 2]
    shape = list(x.shape[:dim]) + [merged] + list(x.shape[dim + 3:])
    return x.reshape(shape)


def _index(padded: int, group_name: str, layout: str, device) -> Tensor:
    group = group_by_name(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return layout_index(padded, world, rank, layout, torch.device(device))


def slice_local(x: Tensor, dim: int, inner: int, seq_len: int, padded: int, layout: str,
                world: int, rank: int, fill: float = 0.0) -> Tensor:
    """Pure slicing (no communication): pad the seq factor to ``padded`` and keep ``rank``'s positions.

    The result is a fresh tensor, never a view (not even of a buffer made here): the graph may write into
    a shard in place (``x.add_(1)`` on an input, ``h[..., :4] += 1``), and autograd refuses an in-place
    write into a view made inside a custom op with its own backward. ``index_select`` writes straight
    into the merged-shape result, so this costs no extra copy."""
    xs, axis = _split_seq(x, dim, inner, seq_len)
    if padded > seq_len:
        pad_shape = list(xs.shape)
        pad_shape[axis] = padded - seq_len
        value = fill if xs.is_floating_point() else int(fill)
        xs = torch.cat([xs, xs.new_full(pad_shape, value)], dim=axis)
    idx = layout_index(padded, world, rank, layout, x.device)
    split = list(xs.shape)
    split[axis] = idx.numel()
    out = xs.new_empty(list(x.shape[:dim]) + [math.prod(split[dim:axis + 2])] + list(x.shape[dim + 1:]))
    torch.index_select(xs, axis, idx, out=out.view(split))
    return out


# ---------------------------------------------------------------------------- reduce_partial


@torch.library.custom_op("ringcompile::reduce_partial", mutates_args=(), **SYNCING)
def reduce_partial(x: Tensor, group_name: str, timeout: float) -> Tensor:
    """Sum of ``x`` over the ranks of the group (Partial -> Replicate)."""
    return _all_reduce(x, group_name, timeout)


@reduce_partial.register_fake
def _(x, group_name, timeout):
    return torch.empty_like(x)


def _reduce_partial_backward(ctx, grad):
    return grad, None, None


reduce_partial.register_autograd(_reduce_partial_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------- grad_reduce


@torch.library.custom_op("ringcompile::grad_reduce", mutates_args=(), **SYNCING)
def grad_reduce(x: Tensor, group_name: str, timeout: float) -> Tensor:
    """Identity (a copy) whose backward all-reduces the gradient across the group."""
    return x.clone()


@grad_reduce.register_fake
def _(x, group_name, timeout):
    return torch.empty_like(x)


def _grad_reduce_setup(ctx, inputs, output) -> None:
    ctx.group_name, ctx.timeout = inputs[1], inputs[2]


def _grad_reduce_backward(ctx, grad):
    return reduce_partial(grad.contiguous(), ctx.group_name, ctx.timeout), None, None


grad_reduce.register_autograd(_grad_reduce_backward, setup_context=_grad_reduce_setup)


class _GradReduceView(torch.autograd.Function):
    """Like ``grad_reduce`` but the forward returns a view, so no copy of the parameter is kept."""

    @staticmethod
    def forward(ctx, x: Tensor, group_name: str, timeout: float) -> Tensor:
        ctx.group_name, ctx.timeout = group_name, timeout
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return reduce_partial(grad.contiguous(), ctx.group_name, ctx.timeout), None, None


def grad_reduce_view(x: Tensor, group_name: str, timeout: float) -> Tensor:
    """Identity (a view) whose backward all-reduces the gradient; what the sharding pass inserts."""
    return _GradReduceView.apply(x, group_name, timeout)


# ---------------------------------------------------------------------------- to_local


@torch.library.custom_op("ringcompile::slice_seq", mutates_args=(), **SYNCING)
def _slice_seq(x: Tensor, dim: int, inner: int, seq_len: int, padded: int, layout: str,
               group_name: str, fill: float = 0.0) -> Tensor:
    """This rank's shard of a full tensor, without communication (no autograd of its own)."""
    group = group_by_name(group_name)
    return slice_local(x, dim, inner, seq_len, padded, layout, dist.get_world_size(group),
                       dist.get_rank(group), fill)


@_slice_seq.register_fake
def _(x, dim, inner, seq_len, padded, layout, group_name, fill=0.0):
    return x.new_empty(_local_shape(x, dim, seq_len, padded, group_name))


def _local_shape(x: Tensor, dim: int, seq_len: int, padded: int, group_name: str) -> list[int]:
    shape = list(x.shape)
    world = dist.get_world_size(group_by_name(group_name)) if dist.is_initialized() else 1
    shape[dim] = shape[dim] // seq_len * (padded // world)
    return shape


@torch.library.custom_op("ringcompile::to_local", mutates_args=(), **SYNCING)
def to_local(x: Tensor, dim: int, inner: int, seq_len: int, padded: int, layout: str, group_name: str,
             timeout: float, fill: float = 0.0) -> Tensor:
    """This rank's shard of a replicated tensor (positions past ``seq_len`` hold ``fill``)."""
    return _slice_seq(x, dim, inner, seq_len, padded, layout, group_name, fill)


@to_local.register_fake
def _(x, dim, inner, seq_len, padded, layout, group_name, timeout, fill=0.0):
    return x.new_empty(_local_shape(x, dim, seq_len, padded, group_name))


def _to_local_setup(ctx, inputs, output) -> None:
    x, ctx.dim, ctx.inner, ctx.seq_len, ctx.padded, ctx.layout, ctx.group_name, ctx.timeout = inputs[:8]
    ctx.full_shape = tuple(x.shape)


def _to_local_backward(ctx, grad):
    full = _scatter_local(grad.contiguous(), ctx.dim, ctx.inner, ctx.seq_len, ctx.padded, ctx.layout,
                          ctx.group_name)
    return reduce_partial(full, ctx.group_name, ctx.timeout), None, None, None, None, None, None, None, None


to_local.register_autograd(_to_local_backward, setup_context=_to_local_setup)


@torch.library.custom_op("ringcompile::scatter_local", mutates_args=(), **SYNCING)
def _scatter_local(g: Tensor, dim: int, inner: int, seq_len: int, padded: int, layout: str,
                   group_name: str) -> Tensor:
    """Full-size zeros with this rank's shard written at its positions (padding dropped)."""
    local_seq = len(local_index(padded, dist.get_world_size(group_by_name(group_name)), 0, layout))
    gs, axis = _split_seq(g, dim, inner, local_seq)
    shape = list(gs.shape)
    shape[axis] = padded
    flat = gs.new_zeros(list(g.shape[:dim]) + [math.prod(shape[dim:axis + 2])] + list(g.shape[dim + 1:]))
    full = flat.view(shape)
    full.index_copy_(axis, _index(padded, group_name, layout, g.device), gs)
    if padded == seq_len:
        return flat  # never a view (as every collective's output)
    out = _merge_seq(full.narrow(axis, 0, seq_len), dim).contiguous()
    return out if out._base is None else out.clone()


@_scatter_local.register_fake
def _(g, dim, inner, seq_len, padded, layout, group_name):
    shape = list(g.shape)
    world = dist.get_world_size(group_by_name(group_name)) if dist.is_initialized() else 1
    shape[dim] = shape[dim] // (padded // world) * seq_len
    return g.new_empty(shape)


# ---------------------------------------------------------------------------- gather_seq


@torch.library.custom_op("ringcompile::gather_seq", mutates_args=(), **SYNCING)
def gather_seq(x: Tensor, dim: int, inner: int, seq_len: int, padded: int, layout: str, group_name: str,
               timeout: float) -> Tensor:
    """The full tensor from every rank's shard, in sequence order, padding stripped."""
    group = group_by_name(group_name)
    world = dist.get_world_size(group)
    local_seq = padded // world
    xs, axis = _split_seq(x.contiguous(), dim, inner, local_seq)
    parts = [torch.empty_like(xs) for _ in range(world)]
    if world > 1:
        _wait(dist.all_gather(parts, xs.contiguous(), group=group, async_op=True), timeout,
              "all-gather of a sequence shard", group)
    else:
        parts[0].copy_(xs)
    shape = list(xs.shape)
    shape[axis] = padded
    full = xs.new_empty(shape)
    for r, part in enumerate(parts):
        idx = layout_index(padded, world, r, layout, x.device)
        full.index_copy_(axis, idx, part)
    out = _merge_seq(full.narrow(axis, 0, seq_len), dim).contiguous()
    # never a view: autograd forbids writing in place into a view made inside a custom op, and the
    # graph may (Gemma 3n's ``corrected[1:] += first`` on a gathered value)
    return out if out._base is None else out.clone()


@gather_seq.register_fake
def _(x, dim, inner, seq_len, padded, layout, group_name, timeout):
    shape = list(x.shape)
    world = dist.get_world_size(group_by_name(group_name)) if dist.is_initialized() else 1
    shape[dim] = shape[dim] // (padded // world) * seq_len
    return x.new_empty(shape)


def _gather_setup(ctx, inputs, output) -> None:
    _, ctx.dim, ctx.inner, ctx.seq_len, ctx.padded, ctx.layout, ctx.group_name, ctx.timeout = inputs


def _gather_backward(ctx, grad):
    local = _slice_seq(grad.contiguous(), ctx.dim, ctx.inner, ctx.seq_len, ctx.padded, ctx.layout,
                       ctx.group_name)
    return local, None, None, None, None, None, None, None


gather_seq.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---------------------------------------------------------------------------- gather_rows


@functools.lru_cache(maxsize=256)
def _rows_plan(padded: int, world: int, layout: str, start: int, stop: int
               ) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Per rank: (its local rows holding global positions start..stop-1, their rows in the output)."""
    plan = []
    for r in range(world):
        positions = local_index(padded, world, r, layout)
        held = [(i, p - start) for i, p in enumerate(positions) if start <= p < stop]
        plan.append((tuple(i for i, _ in held), tuple(j for _, j in held)))
    return tuple(plan)


@functools.lru_cache(maxsize=256)
def _rows_index(padded: int, world: int, layout: str, start: int, stop: int, device: torch.device
                ) -> tuple[tuple[Tensor, Tensor], ...]:
    """``_rows_plan`` as LongTensors on ``device``, built once per (device, content)."""
    return tuple((torch.tensor(src, dtype=torch.long, device=device), torch.tensor(dst, dtype=torch.long,
                                                                                  device=device))
                 for src, dst in _rows_plan(padded, world, layout, start, stop))


def _check_rows(dim: int, start: int, stop: int, padded: int, x: Tensor) -> None:
    if not 0 <= start < stop <= padded or not 0 <= dim < x.dim():
        raise ShapeMismatchError(f"cannot gather sequence rows {start}..{stop - 1} of a {padded}-position "
                                 f"sequence along dim {dim} of a {x.dim()}-D shard")


@torch.library.custom_op("ringcompile::gather_rows", mutates_args=(), **SYNCING)
def gather_rows(x: Tensor, dim: int, start: int, stop: int, padded: int, layout: str, group_name: str,
                timeout: float) -> Tensor:
    """Global sequence positions ``start .. stop - 1`` of a sharded tensor, on every rank (``x[:, -1]``,
    HF's ``logits_to_keep`` slice): each rank sends the ``stop - start`` rows it holds of them (zeros
    elsewhere), not its whole shard, so selecting a few rows costs a few rows of communication."""
    _check_rows(dim, start, stop, padded, x)
    group = group_by_name(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    index = _rows_index(padded, world, layout, start, stop, x.device)
    shape = list(x.shape)
    shape[dim] = stop - start
    src, dst = index[rank]
    mine = x.new_zeros(shape).index_copy_(dim, dst, x.index_select(dim, src))
    parts = [torch.empty_like(mine) for _ in range(world)]
    if world > 1:
        _wait(dist.all_gather(parts, mine, group=group, async_op=True), timeout,
              "all-gather of selected sequence rows", group)
    else:
        parts[0].copy_(mine)
    out = x.new_empty(shape)
    for part, (_, rows) in zip(parts, index, strict=True):
        out.index_copy_(dim, rows, part.index_select(dim, rows))
    return out


@gather_rows.register_fake
def _(x, dim, start, stop, padded, layout, group_name, timeout):
    shape = list(x.shape)
    shape[dim] = stop - start
    return x.new_empty(shape)


@torch.library.custom_op("ringcompile::gather_rows_backward", mutates_args=(), **SYNCING)
def _gather_rows_backward(g: Tensor, local: int, dim: int, start: int, stop: int, padded: int, layout: str,
                          group_name: str) -> Tensor:
    """Gradient of ``gather_rows``: the output is replicated (the same gradient on every rank), so each
    rank takes the rows it holds, with no communication (as ``gather_seq``'s backward)."""
    group = group_by_name(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    src, dst = _rows_index(padded, world, layout, start, stop, g.device)[rank]
    shape = list(g.shape)
    shape[dim] = local
    return g.new_zeros(shape).index_copy_(dim, src, g.index_select(dim, dst))


@_gather_rows_backward.register_fake
def _(g, local, dim, start, stop, padded, layout, group_name):
    shape = list(g.shape)
    shape[dim] = local
    return g.new_empty(shape)


def _gather_rows_setup(ctx, inputs, output) -> None:
    x, ctx.dim, ctx.start, ctx.stop, ctx.padded, ctx.layout, ctx.group_name, _ = inputs
    ctx.local = x.shape[ctx.dim]


def _gather_rows_grad(ctx, grad):
    g = _gather_rows_backward(grad.contiguous(), ctx.local, ctx.dim, ctx.start, ctx.stop, ctx.padded,
                              ctx.layout, ctx.group_name)
    return g, None, None, None, None, None, None, None


gather_rows.register_autograd(_gather_rows_grad, setup_context=_gather_rows_setup)


# ---------------------------------------------------------------------------- shift_seq (halo)


def _shift_plan(padded: int, world: int, rank: int, layout: str, k: int):
    """Index lists for ``y[i] = x[i + k]`` on ``rank``'s shard: what each rank sends (the first k
    positions of each of its chunks), and where every local output row reads from in
    cat(local x, gathered halo table, one zero row)."""
    from .layouts import local_chunks

    chunks = local_chunks(padded, world, rank, layout)
    pos = local_index(padded, world, rank, layout)
    where = {p: i for i, p in enumerate(pos)}
    table = [s + j for rr in range(world) for s, _ in local_chunks(padded, world, rr, layout)
             for j in range(k)]
    in_table = {p: len(pos) + j for j, p in enumerate(table)}
    zero = len(pos) + len(table)
    src = [where.get(p + k, in_table.get(p + k, zero)) if p + k < padded else zero for p in pos]
    send = [where[s + j] for s, _ in chunks for j in range(k)]
    return src, send, len(table)


@functools.lru_cache(maxsize=256)
def _shift_index(padded: int, world: int, rank: int, layout: str, k: int,
                 device: torch.device) -> tuple[Tensor, Tensor, int]:
    """``_shift_plan``'s index lists as LongTensors on ``device``, built once per (device, content)."""
    src, send, n_table = _shift_plan(padded, world, rank, layout, k)
    return (torch.tensor(src, dtype=torch.long, device=device),
            torch.tensor(send, dtype=torch.long, device=device), n_table)


@torch.library.custom_op("ringcompile::shift_seq", mutates_args=(), **SYNCING)
def shift_seq(x: Tensor, dim: int, k: int, padded: int, layout: str, group_name: str,
              timeout: float) -> Tensor:
    """``x[..., k:, ...]`` of a sequence shard, kept in the same layout: each rank receives the first
    ``k`` positions of the chunks that follow its own (a halo), not the whole sequence."""
    group = group_by_name(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunk = padded // (world * (2 if layout == "zigzag" else 1))
    if not 0 < k <= chunk:  # a graph compiled for dynamic lengths may meet a sequence this short
        raise ShapeMismatchError(f"cannot shift a sequence shard by {k} positions: the chunks of this "
                                 f"{padded}-position ({layout}) sequence hold {chunk}; use a longer sequence")
    src, send, _ = _shift_index(padded, world, rank, layout, k, x.device)
    rows = x.index_select(dim, send).contiguous()
    parts = [torch.empty_like(rows) for _ in range(world)]
    if world > 1:
        _wait(dist.all_gather(parts, rows, group=group, async_op=True), timeout, "halo exchange", group)
    else:
        parts[0].copy_(rows)
    zshape = list(x.shape)
    zshape[dim] = 1
    full = torch.cat([x, *parts, x.new_zeros(zshape)], dim=dim)
    return full.index_select(dim, src).contiguous()


@shift_seq.register_fake
def _(x, dim, k, padded, layout, group_name, timeout):
    return torch.empty_like(x)


@torch.library.custom_op("ringcompile::shift_seq_backward", mutates_args=(), **SYNCING)
def _shift_seq_backward(g: Tensor, dim: int, k: int, padded: int, layout: str, group_name: str,
                        timeout: float) -> Tensor:
    """Gradient of ``shift_seq``: local rows locally, halo rows summed back to the ranks that own them."""
    group = group_by_name(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    src, send, n_table = _shift_index(padded, world, rank, layout, k, g.device)
    local = g.shape[dim]
    shape = list(g.shape)
    shape[dim] = local + n_table + 1
    acc = g.new_zeros(shape).index_add_(dim, src, g)
    gx = acc.narrow(dim, 0, local).clone()
    table = acc.narrow(dim, local, n_table).contiguous()
    if world > 1:
        _wait(dist.all_reduce(table, group=group, async_op=True), timeout, "halo gradient exchange", group)
    mine = table.narrow(dim, rank * len(send), len(send))
    return gx.index_add_(dim, send, mine)


@_shift_seq_backward.register_fake
def _(g, dim, k, padded, layout, group_name, timeout):
    return torch.empty_like(g)


def _shift_setup(ctx, inputs, output) -> None:
    _, ctx.dim, ctx.k, ctx.padded, ctx.layout, ctx.group_name, ctx.timeout = inputs


def _shift_backward(ctx, grad):
    g = _shift_seq_backward(grad.contiguous(), ctx.dim, ctx.k, ctx.padded, ctx.layout, ctx.group_name,
                            ctx.timeout)
    return g, None, None, None, None, None, None


shift_seq.register_autograd(_shift_backward, setup_context=_shift_setup)
