"""Shipped profiles load, round-trip through TOML, and bad files fail clearly."""

from __future__ import annotations

import pytest

from ringcompile.cost_model.profiles import (
    available_profiles,
    default_profile_name,
    dtype_name,
    load_profile,
    profile_from_dict,
)
from ringcompile.cost_model.tiles import choose_tiles, measured_forward, shared_memory_bytes
from ringcompile.errors import OptionError

REQUIRED = {"h100-nvlink", "h100-infiniband", "a100-nvlink", "a100-infiniband", "tpu-v4", "cpu-gloo-loopback"}


def test_required_profiles_ship():
    assert REQUIRED <= set(available_profiles())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_round_trip(name, tmp_path):
    prof = load_profile(name)
    assert prof.flops("bfloat16") > 0 and prof.link_bandwidth > 0 and prof.link_latency > 0
    path = tmp_path / f"{name}.toml"
    path.write_text(prof.to_toml())
    again = load_profile(str(path))
    assert again == prof


def test_paper_and_datasheet_numbers():
    assert load_profile("a100-nvlink").link_bandwidth == 300e9
    assert load_profile("a100-infiniband").link_bandwidth == 12.5e9
    assert load_profile("tpu-v4").flops("bfloat16") == 275e12
    assert load_profile("h100-infiniband").link_bandwidth == 400e9 / 8


def test_bad_profiles(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[compute]\nmemory_bandwidth = 1\n")
    with pytest.raises(OptionError, match="malformed"):
        load_profile(str(bad))
    with pytest.raises(OptionError, match="does not exist"):
        load_profile(str(tmp_path / "missing.toml"))
    with pytest.raises(OptionError, match="no matmul rate"):
        profile_from_dict({"compute": {"matmul_flops": {"float64": 1.0}, "memory_bandwidth": 1.0},
                           "link": {"bandwidth": 1.0, "latency": 1.0}}, "x").flops("bfloat16")


def test_dtype_names_and_defaults():
    import torch

    assert dtype_name(torch.bfloat16) == dtype_name("bf16") == "bfloat16"
    with pytest.raises(OptionError):
        dtype_name("int8")
    assert default_profile_name("cpu") == "cpu-gloo-loopback"
    assert default_profile_name("cuda:0").startswith("h100")


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tiles_fit_shared_memory(head_dim, dtype):
    """The plan's tiles are the forward's compiler-measured choice within the profile's limit, or (no
    measured choice fits) the fallback formula's, which over-estimates the compiler."""
    for name in ("a100-nvlink", "h100-nvlink"):
        prof = load_profile(name)
        t = choose_tiles(head_dim, dtype, prof)
        tiles = (t["BLOCK_M"], t["BLOCK_N"], t["num_warps"], t["num_stages"])
        hit = measured_forward(head_dim, dtype, prof.shared_memory)
        if hit is not None:
            assert hit[0] == tiles and hit[1] <= prof.shared_memory
        else:
            elem = 2 if dtype == "bfloat16" else 4
            smem = shared_memory_bytes(t["BLOCK_M"], t["BLOCK_N"], t["num_stages"], head_dim, elem)
            assert smem <= prof.shared_memory
    assert choose_tiles(head_dim, dtype, load_profile("cpu-gloo-loopback"))["BLOCK_M"] == 64


def test_cores_minus_one_reads_this_hosts_cpus(monkeypatch):
    """A profile shipped to many machines says cores = -1: the planner uses the CPUs this process may
    run on, so 8 ranks on a 2-CPU host are planned as sharing 2 cores and on a 64-CPU host as not."""
    import dataclasses
    import os

    from ringcompile.cost_model.evaluate import hardware_values
    from ringcompile.cost_model.profiles import load_profile
    from ringcompile.cost_model.symbols import Ph

    prof = dataclasses.replace(load_profile("cpu-gloo-loopback"), cores=-1)
    for cpus, expected in ((2, 2.0), (64, 8.0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert prof.host_cores() == cpus
        assert hardware_values(prof, "float32", 8, "zigzag")[Ph] == expected
    assert hardware_values(dataclasses.replace(prof, cores=0), "float32", 8, "zigzag")[Ph] == 8.0
