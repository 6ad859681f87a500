"""Backend options: one frozen dataclass, validated once, with errors that list what is valid."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import OptionError

STRATEGIES = ("auto", "ring", "zigzag", "allgather", "ulysses", "local", "hybrid")
LAYOUTS = ("contiguous", "zigzag")
KERNELS = ("auto", "triton", "cpu")
INNER_COMPILERS = ("inductor", "eager")
OUTPUT_MODES = ("full", "sharded")


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``torch.compile(model, backend="ring", options={...})`` accepts.

    inner:         compiler for the rewritten graph ("inductor" or "eager").
    strategy:      ring schedule; "auto" lets the cost model choose per site.
    layout:        sequence layout across ranks; None lets the planner choose.
    kernel:        block kernels: "triton", "cpu", or "auto" (Triton on CUDA tensors).
    group:         a ProcessGroup, a DeviceMesh, or None for the default group.
    mesh_dim:      the DeviceMesh dimension to use when ``group`` is a mesh; a pair (outer, inner)
                   of dimensions for strategy "hybrid".
    node_size:     ranks per node: the 1-D group (or the default one) becomes a 2-D group of
                   world / node_size nodes x node_size ranks, for strategy "hybrid" (and "auto").
    timeout:       seconds any collective may take before CommunicationError.
    block_size:    K/V tokens per ring transfer chunk; None lets the planner choose.
    profile:       hardware profile name or path for the cost model; None picks by device.
    seq_dims:      {graph input name: sequence dim}, overriding sharding discovery.
    outputs:       "full" (default) or "sharded" local shards of sequence outputs.
    shard_graph:   shard the whole graph along the sequence (True) or only attention.
    record_timing: keep per-call timing records (compute/wait per ring step).
    require_sharded: with more than one rank, raise UnshardedAttentionError instead of warning when a
                   graph would run any attention unsharded (a guarantee for long-context training).
    """

    inner: str = "inductor"
    strategy: str = "auto"
    layout: str | None = None
    kernel: str = "auto"
    group: Any = None
    mesh_dim: int | str | tuple | None = None
    timeout: float = 300.0
    block_size: int | None = None
    profile: str | None = None
    seq_dims: Mapping[str, int] | None = None
    outputs: str = "full"
    shard_graph: bool = True
    record_timing: bool = False
    require_sharded: bool = False
    node_size: int | None = None

    def __post_init__(self) -> None:
        _check_choice("inner", self.inner, INNER_COMPILERS)
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("outputs", self.outputs, OUTPUT_MODES)
        if self.layout is not None:
            _check_choice("layout", self.layout, LAYOUTS)
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise OptionError(f"option 'timeout' must be a positive number of seconds, got {self.timeout!r}")
        if self.node_size is not None and (not isinstance(self.node_size, int) or self.node_size <= 0):
            raise OptionError(f"option 'node_size' must be a positive int or None, got {self.node_size!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size <= 0):
            raise OptionError(f"option 'block_size' must be a positive int or None, got {self.block_size!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> Options:
        """Build from a user dict; unknown names raise an OptionError listing the valid ones."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionError(
                f"unknown ringcompile option(s) {unknown}; valid options are: {', '.join(valid)}"
            )
        return cls(**options)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(f"option {name!r} must be one of {list(choices)}, got {value!r}")
