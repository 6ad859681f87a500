"""Hardware profiles: data files (TOML) that give the cost model's hardware symbols numbers.

A profile is named (a file shipped in ``profiles/``) or given as a path to any TOML file
with the same schema; ``ringcompile calibrate`` writes such files. Rates are per rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from ringcompile.errors import OptionError

PROFILE_DIR = Path(__file__).with_name("profiles")
DEFAULT_CPU = "cpu-gloo-loopback"
DEFAULT_CUDA = "h100-nvlink"

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# a dtype missing from a profile borrows another's rate (scaled), e.g. fp16 runs at bf16 speed
_FALLBACK = {"float16": ("bfloat16", 1.0), "bfloat16": ("float16", 1.0), "float32": ("bfloat16", 0.5),
             "float64": ("float32", 0.5)}


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16, 'torch.bfloat16', 'bf16' or 'bfloat16'."""
    name = str(dtype).removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
            "fp64": "float64", "double": "float64"}.get(name, name)
    if name not in DTYPE_BYTES:
        raise OptionError(f"dtype {dtype!r} is not modelled; use one of {sorted(DTYPE_BYTES)}")
    return name


@dataclasses.dataclass(frozen=True)
class Profile:
    """Per-rank hardware numbers.

    matmul_flops:      peak (or measured) dense matmul FLOP/s per dtype.
    memory_bandwidth:  bytes/s.
    kernel_efficiency: fraction of matmul_flops the attention block kernel reaches.
    score_passes:      fp32 passes over the score tile through memory per block pair (0 when fused).
    tile_overhead:     seconds of fixed cost per kernel tile: a kernel_block-square of one
                       (batch, head) score matrix (launch, loop and merge bookkeeping).
    kernel_block:      tile edge in tokens that tile_overhead is charged per.
    backward_factor:   backward compute / forward compute.
    causal_tile:       tokens at which the kernel skips causally masked work: a diagonal x-by-x
                       block costs (1/2 + causal_tile / 2x) of a full one.
    cores:             when > 0, the ranks share this many cores of one host (CPU ranks, one
                       thread each): the OS shares them among the ranks still working
                       (``strategies.shared_makespan``); -1 = the CPUs this process may use,
                       read where the plan is made (for a profile shipped to many machines);
                       0 = one dedicated device per rank.
    shared_slowdown:   on a shared host (cores > 0), how much slower the attention kernel runs
                       while other ranks run beside it (shared caches and memory bandwidth): the
                       compute rates are divided by it when more than one rank runs. 1 = none.
    step_overhead:     seconds of host work per ring step per rank outside the kernels (Python
                       dispatch, buffers, merges, the per-call checks), charged N times per pass.
    link_bandwidth:    point-to-point bytes/s per direction between ring neighbours.
    link_latency:      seconds per message.
    alltoall_efficiency: all-to-all bandwidth as a fraction of link_bandwidth.
    shared_memory:     bytes of GPU shared memory per block (tile choice), 0 when not a GPU.
    node_size:         ranks per node of a two-level machine (0: one level, every pair of ranks
                       on the ``link_*`` link). Two-level profiles say ``[intra]`` (inside a node)
                       and ``[inter]`` (between nodes); their ``link_*`` fields are the intra ones.
    intra_bandwidth, intra_latency, intra_alltoall_efficiency: the link inside a node.
    inter_bandwidth, inter_latency, inter_alltoall_efficiency: the link between nodes (per rank:
                       one NIC per GPU).
    """

    name: str
    matmul_flops: dict[str, float]
    memory_bandwidth: float
    link_bandwidth: float
    link_latency: float
    kernel_efficiency: float = 1.0
    score_passes: float = 0.0
    tile_overhead: float = 0.0
    kernel_block: int = 128
    backward_factor: float = 2.5
    causal_tile: int = 128
    cores: float = 0
    shared_slowdown: float = 1.0
    step_overhead: float = 0.0
    alltoall_efficiency: float = 1.0
    shared_memory: int = 0
    node_size: int = 0
    intra_bandwidth: float = 0.0
    intra_latency: float = 0.0
    intra_alltoall_efficiency: float = 1.0
    inter_bandwidth: float = 0.0
    inter_latency: float = 0.0
    inter_alltoall_efficiency: float = 1.0
    device: str = "cuda"
    description: str = ""
    source: str = ""

    @property
    def two_level(self) -> bool:
        return self.node_size > 0

    def link(self, level: str) -> tuple[float, float, float]:
        """(bandwidth, latency, all-to-all efficiency) of the "intra" or "inter" node link; a one-level
        profile's only link for both."""
        if not self.two_level:
            return self.link_bandwidth, self.link_latency, self.alltoall_efficiency
        if level == "intra":
            return self.intra_bandwidth, self.intra_latency, self.intra_alltoall_efficiency
        return self.inter_bandwidth, self.inter_latency, self.inter_alltoall_efficiency

    def host_cores(self) -> float:
        """Cores the ranks share (``cores``, with -1 read off this host); 0 for dedicated devices."""
        if self.cores >= 0:
            return float(self.cores)
        try:
            return float(len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return float(os.cpu_count() or 1)

    def flops(self, dtype: str) -> float:
        """Matmul FLOP/s for ``dtype`` (falls back to a related dtype's rate)."""
        if dtype in self.matmul_flops:
            return float(self.matmul_flops[dtype])
        other, scale = _FALLBACK.get(dtype, ("", 0.0))
        if other in self.matmul_flops:
            return float(self.matmul_flops[other]) * scale
        raise OptionError(f"profile {self.name!r} has no matmul rate for {dtype}; add matmul_flops.{dtype}")

    def to_toml(self) -> str:
        """The TOML text ``load_profile`` reads back."""
        flops = ", ".join(f"{k} = {_num(v)}" for k, v in sorted(self.matmul_flops.items()))
        lines = [
            f"name = {_str(self.name)}",
            f"description = {_str(self.description)}",
            f"source = {_str(self.source)}",
            f"device = {_str(self.device)}",
            "",
            "[compute]",
            f"matmul_flops = {{ {flops} }}",
            f"memory_bandwidth = {_num(self.memory_bandwidth)}",
            f"kernel_efficiency = {_num(self.kernel_efficiency)}",
            f"score_passes = {_num(self.score_passes)}",
            f"tile_overhead = {_num(self.tile_overhead)}",
            f"kernel_block = {int(self.kernel_block)}",
            f"backward_factor = {_num(self.backward_factor)}",
            f"causal_tile = {int(self.causal_tile)}",
            f"cores = {_num(self.cores)}",
            f"shared_slowdown = {_num(self.shared_slowdown)}",
            f"step_overhead = {_num(self.step_overhead)}",
            f"shared_memory = {int(self.shared_memory)}",
            "",
            "[link]",
            f"bandwidth = {_num(self.link_bandwidth)}",
            f"latency = {_num(self.link_latency)}",
            f"alltoall_efficiency = {_num(self.alltoall_efficiency)}",
            "",
        ]
        if self.two_level:
            lines += ["[node]", f"size = {int(self.node_size)}", ""]
            for level in ("intra", "inter"):
                bw, lat, eff = self.link(level)
                lines += [f"[{level}]", f"bandwidth = {_num(bw)}", f"latency = {_num(lat)}",
                          f"alltoall_efficiency = {_num(eff)}", ""]
        return "\n".join(lines)


def _num(v: float) -> str:
    if not math.isfinite(v):
        raise OptionError(f"profile value {v!r} is not finite; a measurement failed, re-run calibrate")
    return repr(float(v))


def _str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _levels(data: dict[str, Any]) -> dict[str, Any]:
    """The two-level fields: ``[node] size`` with ``[intra]`` and ``[inter]`` links (all or none)."""
    if "node" not in data and "intra" not in data and "inter" not in data:
        return {}
    node, intra, inter = data["node"], data["intra"], data["inter"]
    size = int(node["size"])
    if size < 1:
        raise ValueError(f"[node] size must be >= 1, got {size}")
    return dict(node_size=size, intra_bandwidth=float(intra["bandwidth"]),
                intra_latency=float(intra["latency"]),
                intra_alltoall_efficiency=float(intra.get("alltoall_efficiency", 1.0)),
                inter_bandwidth=float(inter["bandwidth"]), inter_latency=float(inter["latency"]),
                inter_alltoall_efficiency=float(inter.get("alltoall_efficiency", 1.0)))


def profile_from_dict(data: dict[str, Any], where: str) -> Profile:
    try:
        levels = _levels(data)
        comp = data["compute"]
        intra = {"bandwidth": levels.get("intra_bandwidth"), "latency": levels.get("intra_latency"),
                 "alltoall_efficiency": levels.get("intra_alltoall_efficiency")}
        link = data.get("link") or (intra if levels else data["link"])
        return Profile(
            name=str(data.get("name", Path(where).stem)),
            matmul_flops={dtype_name(k): float(v) for k, v in comp["matmul_flops"].items()},
            memory_bandwidth=float(comp["memory_bandwidth"]),
            link_bandwidth=float(link["bandwidth"]),
            link_latency=float(link["latency"]),
            kernel_efficiency=float(comp.get("kernel_efficiency", 1.0)),
            score_passes=float(comp.get("score_passes", 0.0)),
            tile_overhead=float(comp.get("tile_overhead", 0.0)),
            kernel_block=int(comp.get("kernel_block", 128)),
            backward_factor=float(comp.get("backward_factor", 2.5)),
            causal_tile=int(comp.get("causal_tile", 128)),
            cores=float(comp.get("cores", 0)),
            shared_slowdown=float(comp.get("shared_slowdown", 1.0)),
            step_overhead=float(comp.get("step_overhead", 0.0)),
            shared_memory=int(comp.get("shared_memory", 0)),
            alltoall_efficiency=float(link.get("alltoall_efficiency", 1.0)),
            device=str(data.get("device", "cuda")),
            description=str(data.get("description", "")),
            source=str(data.get("source", "")),
            **levels,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise OptionError(f"profile {where} is malformed ({exc!r}); see cost_model/profiles/*.toml "
                          "for the schema") from exc


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


@functools.lru_cache(maxsize=64)
def _load(path: str, mtime: float) -> Profile:
    with open(path, "rb") as fh:
        return profile_from_dict(tomllib.load(fh), path)


def resolve_profile_path(profile: str | Path) -> Path:
    """A shipped profile's file for a name, or the given path; OptionError when neither exists."""
    text = str(profile)
    path = Path(text).expanduser()
    if path.suffix == ".toml" or path.exists() or "/" in text:
        if not path.is_file():
            raise OptionError(f"profile file {text!r} does not exist")
        return path
    shipped = PROFILE_DIR / f"{text}.toml"
    if shipped.is_file():
        return shipped
    user = Path("~/.cache/ringcompile/profiles").expanduser() / f"{text}.toml"
    if user.is_file():
        return user
    raise OptionError(f"unknown profile {text!r}; shipped profiles: {', '.join(available_profiles())}; "
                      "or pass a path to a TOML profile (e.g. one written by `ringcompile calibrate`)")


def load_profile(profile: str | Path | Profile | None = None, device: str | None = None) -> Profile:
    """The Profile for a name, a path, an existing Profile, or None (default for ``device``)."""
    if isinstance(profile, Profile):
        return profile
    if profile is None:
        profile = default_profile_name(device)
    path = resolve_profile_path(profile)
    return _load(str(path), path.stat().st_mtime)


def default_profile_name(device: str | None = None) -> str:
    """'cpu-gloo-loopback' on CPU; a CUDA profile when ``device`` (or the default) is CUDA."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DEFAULT_CUDA if str(device).startswith("cuda") else DEFAULT_CPU
