"""Fail fast: local shape checks, and a cross-rank metadata check before any ring step.

Ranks all-gather a small int64 vector (shapes, dtype, seq_len, strategy, layout); a rank
that differs from the majority is named in a ``ShapeMismatchError`` raised on every rank,
so nobody enters the ring with a mismatched peer (which would hang or corrupt results).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Sequence

import torch

from ringcompile.errors import ShapeMismatchError

from .communicator import Communicator
from .layouts import chunks_per_rank

Tensor = torch.Tensor

_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_STRATEGIES = ["local", "ring", "zigzag", "allgather", "ulysses", "hybrid"]
_LAYOUTS = ["contiguous", "zigzag"]
FIELDS = ("valid inputs", "batch", "query heads", "kv heads", "local query length", "local kv length",
          "head dim", "value head dim", "dtype", "seq_len", "strategy", "layout", "mask extras",
          "score extras", "K/V transfer chunk (0 = whole shard)")

# content keys (``dispatch.metadata_check_key``) of checks already passed, least recently used first
_CHECKED: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
CHECKED_LIMIT = 4096
_LOCK = threading.Lock()


def validate_inputs(q: Tensor, k: Tensor, v: Tensor, seq_len: int, world_size: int, layout: str,
                    strategy: str) -> None:
    """Checks one rank can make on its own."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeMismatchError(f"q, k, v must be (B, H, S_local, D); got {tuple(q.shape)}, "
                                 f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeMismatchError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ShapeMismatchError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                                 "batch, kv heads and kv length must match, and q/k head dims must match")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ShapeMismatchError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if strategy == "local":
        if seq_len > k.shape[2]:
            raise ShapeMismatchError(f"strategy 'local' needs the whole sequence: seq_len {seq_len} but k/v "
                                     f"hold {k.shape[2]} tokens")
        return
    if q.shape[2] != k.shape[2]:
        raise ShapeMismatchError(f"sequence-parallel strategies need equal local q and k/v lengths, got "
                                 f"{q.shape[2]} and {k.shape[2]}")
    total = q.shape[2] * world_size
    unit = chunks_per_rank(layout) * world_size
    if total % unit:
        raise ShapeMismatchError(f"layout {layout!r} on {world_size} ranks needs an even local length, got "
                                 f"{q.shape[2]}: shard with ringcompile.shard(..., layout={layout!r})")
    if not 0 < seq_len <= total:
        raise ShapeMismatchError(f"seq_len {seq_len} does not fit {world_size} shards of {q.shape[2]} tokens")
    if strategy == "ulysses":
        from .strategies.ulysses import check_heads

        check_heads(q.shape[1], k.shape[1], world_size)


def metadata(q: Tensor, k: Tensor, v: Tensor, seq_len: int, strategy: str, layout: str, n_mask: int,
             n_score: int, valid: bool = True, chunk: int | None = None) -> list[int]:
    """The vector ranks compare; any tensor rank works (missing dims read -1).

    ``chunk`` is the K/V tokens per ring transfer (None or >= the local length: whole shard).
    """
    def dim(t: Tensor, i: int) -> int:
        return t.shape[i] if t.dim() == 4 else -1

    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99
    return [int(valid), dim(q, 0), dim(q, 1), dim(k, 1), dim(q, 2), dim(k, 2), dim(q, 3), dim(v, 3), dtype,
            int(seq_len), _STRATEGIES.index(strategy), _LAYOUTS.index(layout), n_mask, n_score,
            int(chunk) if chunk is not None and 0 < chunk < dim(k, 2) else 0]


def _show(field: str, value: int) -> str:
    if field == "valid inputs":
        return "yes" if value else "no (see that rank's own error)"
    if field == "dtype":
        return str(_DTYPES[value]) if value < len(_DTYPES) else "unsupported"
    if field == "strategy":
        return _STRATEGIES[value]
    if field == "layout":
        return _LAYOUTS[value]
    return str(value)


def gather_and_compare(comm: Communicator, meta: Sequence[int], fields: Sequence[str],
                       show: Callable[[str, int], str], what: str) -> tuple[list[list[int]], list[str]]:
    """All-gather every rank's ``meta`` ints (one small collective) and name each rank whose value of
    one of ``fields`` (the first ``len(fields)`` entries) differs from the majority. Returns every
    rank's row and the problems; stops after a "valid inputs" disagreement (the shapes of a rank with
    invalid inputs say nothing more)."""
    device = getattr(comm, "device", None) or torch.device("cpu")
    rows = comm.all_gather(torch.tensor(list(meta), dtype=torch.int64, device=device), 0, what).wait()
    table = [[int(x) for x in r.cpu().tolist()] for r in rows]
    problems = []
    for i, field in enumerate(fields):
        column = [row[i] for row in table]
        majority = max(set(column), key=lambda x: (column.count(x), -column.index(x)))
        for rank, value in enumerate(column):
            if value != majority:
                problems.append(f"rank {rank} has {field} {show(field, value)} where the others have "
                                f"{show(field, majority)}")
        if field == "valid inputs" and problems:
            break
    return table, problems


def check_ranks_agree(comm: Communicator, meta: list[int], cache_key: Hashable | None = None) -> None:
    """All-gather ``meta``; raise ShapeMismatchError naming every rank that differs from the majority.

    Ranks whose own inputs failed validation take part too (flag 0), so the others fail at once
    instead of waiting for them until the timeout.

    With ``cache_key`` the check runs once per key on CUDA; on CPU it runs every call; simulated
    ranks share one process and pass None. The key must be a content key (never an ``id()``):
    every rank must make the same skip-or-run decision, or the all_gather mismatches.
    """
    if comm.world_size == 1:
        return
    device = getattr(comm, "device", None) or torch.device("cpu")
    if device.type == "cpu":
        # one tiny all_gather: run it every call, so a rank whose shapes change on a later call is
        # still named at once (on CUDA the check costs a host sync, so it runs once per key)
        cache_key = None
    if cache_key is not None:
        with _LOCK:
            if cache_key in _CHECKED:
                _CHECKED.move_to_end(cache_key)
                return
    _, problems = gather_and_compare(comm, meta, FIELDS, _show, "metadata check (before the ring)")
    if problems:
        raise ShapeMismatchError(f"ranks disagree before the ring (seen from rank {comm.rank}): "
                                 + "; ".join(problems))
    if cache_key is not None:
        with _LOCK:
            _CHECKED[cache_key] = None
            while len(_CHECKED) > CHECKED_LIMIT:
                _CHECKED.popitem(last=False)
