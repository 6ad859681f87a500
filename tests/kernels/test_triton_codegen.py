"""Generation around the kernels: the source cache, declining unsupported mods, show(), selection."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_triton_support import triton_interpreter  # noqa: F401

from ringcompile import mods
from ringcompile.errors import KernelError
from ringcompile.kernels import reference, select
from ringcompile.kernels.triton import cache, show, triton_block_kernels
from ringcompile.kernels.triton.codegen import specialise
from ringcompile.kernels.triton.launch import Tiles, TritonBlocks, planner_tiles
from ringcompile.kernels.triton.lower_mods import LoweringError, check_lowerable, lower_mod
from ringcompile.spec import AttentionSpec


def gen(mask=None, score=None, head_dim=32, dtype=torch.float32, groups=1, mx=(), sx=()):
    return specialise(mask, score, head_dim=head_dim, v_head_dim=head_dim, dtype=dtype, groups=groups,
                      mask_extras=list(mx), score_extras=list(sx))


def test_second_generation_is_a_cache_hit_in_memory_and_on_disk():
    g = gen(mods.causal(), head_dim=48)
    cache.clear_memory()
    before = dict(cache.STATS)
    first = cache.load(g.key, g.source)
    assert cache.module_path(g.key).read_text() == g.source
    assert cache.STATS["generated"] + cache.STATS["disk_hits"] == before.get("generated", 0) + before.get(
        "disk_hits", 0) + 1
    again = cache.load(gen(mods.causal(), head_dim=48).key, g.source)
    assert again is first and cache.STATS["memory_hits"] == before.get("memory_hits", 0) + 1
    cache.clear_memory()  # as a new process would: the file is found, not rewritten
    mtime = cache.module_path(g.key).stat().st_mtime_ns
    disk = cache.STATS["disk_hits"]
    reloaded = cache.load(g.key, g.source)
    assert reloaded is not first and cache.STATS["disk_hits"] == disk + 1
    assert cache.module_path(g.key).stat().st_mtime_ns == mtime
    assert hasattr(reloaded, "block_fwd") and hasattr(reloaded, "block_bwd_dq")


def test_different_specialisations_do_not_collide():
    variants = [
        gen(), gen(head_dim=64), gen(dtype=torch.bfloat16), gen(groups=4), gen(mods.causal()),
        gen(mods.sliding_window(8)), gen(mods.sliding_window(9)), gen(score=mods.softcap(2.0)),
        gen(score=mods.softcap(3.0)), gen(mods.key_padding(), mx=[torch.ones(2, 8, dtype=torch.bool)]),
        gen(mods.key_padding(), mx=[torch.ones(2, 8, dtype=torch.int64)]),
    ]
    keys = [v.key for v in variants]
    assert len(set(keys)) == len(keys)
    assert len({v.source for v in variants}) == len(variants)
    for v in variants[:3]:
        cache.load(v.key, v.source)
        assert cache.module_path(v.key).read_text() == v.source


def test_cache_is_reused_by_another_process(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGCOMPILE_CACHE_DIR", str(tmp_path))
    g = gen(mods.causal(), score=mods.softcap(5.0), head_dim=24)
    cache.load(g.key, g.source)  # this process generates and writes the module
    script = textwrap.dedent("""
        import torch
        from ringcompile import mods
        from ringcompile.kernels.triton import cache
        from ringcompile.kernels.triton.codegen import specialise
        g = specialise(mods.causal(), mods.softcap(5.0), head_dim=24, v_head_dim=24, dtype=torch.float32,
                       groups=1, mask_extras=[], score_extras=[])
        module = cache.load(g.key, g.source)
        print(g.key, cache.STATS["generated"], cache.STATS["disk_hits"], hasattr(module, "block_fwd"))
    """)
    run = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [g.key, "0", "1", "True"]


def test_unsupported_op_declines_and_forced_raises(caplog):
    weird = mods.from_callable(lambda s, b, h, q, kv: torch.sin(s), is_mask=False)
    spec = AttentionSpec(score=weird, name="layer0.attn")
    with caplog.at_level(logging.INFO, logger="ringcompile"):
        assert triton_block_kernels(spec) is None
    assert any("sin" in r.getMessage() and "layer0.attn" in r.getMessage() for r in caplog.records)
    with pytest.raises(KernelError, match="sin"):
        triton_block_kernels(spec, forced=True)
    with pytest.raises(KernelError, match="cannot be lowered"):
        select.block_kernels(spec.replace(kernel="triton"), torch.device("cpu"))
    assert select.block_kernels(spec.replace(kernel="auto"), torch.device("cpu")).name != "triton"


def test_data_dependent_mods_decline_and_closed_over_tensors_lower_as_kernel_arguments():
    data_dependent = mods.from_callable(lambda b, h, q, kv: kv <= q if int(q.max()) > 3 else kv >= q, True)
    table = torch.rand(50)
    closed_over = mods.from_callable(lambda s, b, h, q, kv: s + table[kv], False)
    whole = mods.from_callable(lambda s, b, h, q, kv: s + table.sum(), False)
    assert check_lowerable(data_dependent) is not None
    assert check_lowerable(closed_over) is None  # the captured tensor becomes a kernel argument
    assert "used whole" in check_lowerable(whole)  # captured tensors, like extras, may only be indexed
    assert triton_block_kernels(AttentionSpec(mask=data_dependent)) is None


def test_select_uses_triton_when_forced_and_it_runs_on_cpu_under_the_interpreter():
    spec = AttentionSpec(mask=mods.causal(), kernel="triton")
    kernels = select.block_kernels(spec, torch.device("cpu"))
    assert kernels.name == "triton"
    q, k, v = torch.randn(3, 1, 2, 5, 16).unbind(0)
    out, lse = kernels.forward(q, k, v, scale=0.25, mask=spec.mask, seq_len=5)
    ref_out, ref_lse = reference.block_forward(q.double(), k.double(), v.double(), scale=0.25, mask=spec.mask,
                                               seq_len=5)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_cpu_tensors_without_interpreter_raise_when_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = torch.randn(3, 1, 1, 4, 16).unbind(0)
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        TritonBlocks(forced=True).forward(q, k, v, scale=0.25)
    # not forced: the PyTorch block path answers instead
    out, lse = TritonBlocks(forced=False).forward(q, k, v, scale=0.25)
    ref_out, ref_lse = reference.block_forward(q.double(), k.double(), v.double(), scale=0.25)
    assert torch.allclose(out.double(), ref_out, atol=1e-5)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_show_returns_readable_source_for_a_site():
    spec = AttentionSpec(mask=mods.and_masks(mods.causal(), mods.key_padding()), score=mods.alibi())
    src = show(spec, head_dim=64)
    assert "def block_fwd(" in src and "def block_bwd_dkdv(" in src and "def block_bwd_dq(" in src
    assert "causal & padding" in src and "alibi" in src  # the mods' origin, as comments
    assert "mask_x0_ptr" in src and "score_x0_grad_ptr" in src
    assert "kv_stop = tl.minimum(kv_stop, q_last - kv_offset + 1)" in src  # causal tile skipping
    compile(src, "<generated>", "exec")
    from ringcompile import kernels

    assert kernels.show(spec, head_dim=64) == src


def test_lowering_names_variables_after_graph_nodes():
    low = lower_mod(mods.softcap(2.0), [], "score", with_grad=True)
    assert any(line.startswith("score_tanh = ") for line in low.lines)
    assert low.d_score is not None and "score_tanh" in "\n".join(low.grad_lines)
    with pytest.raises(LoweringError, match="one index tensor per dim"):
        lower_mod(mods.key_padding(), [torch.ones(2, 3, 8, dtype=torch.bool)], "mask")


def test_planner_tiles_are_accepted_in_several_forms():
    assert planner_tiles(None) is None
    assert planner_tiles({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8}) == Tiles(64, 32, 8, 2)
    assert planner_tiles(Tiles(32, 32)) == Tiles(32, 32)

    class Planned:
        block_m, block_n, num_warps, num_stages = 128, 64, 4, 3

    assert planner_tiles(Planned()) == Tiles(128, 64, 4, 3)


def test_generated_source_compiles_for_a_cuda_target_without_a_gpu(tmp_path):
    """Triton's real compiler (to a sm_90 cubin) accepts what the interpreter ran: no GPU needed
    (bf16, GQA, sliding window + key padding + ALiBi + softcap, dropout).

    In a fresh process: Triton imported under TRITON_INTERPRET=1 cannot compile for a GPU.
    """
    script = textwrap.dedent("""
        import torch
        from ringcompile import mods
        from ringcompile.kernels.triton import cache
        from ringcompile.kernels.triton.codegen import specialise
        try:
            from ringcompile.kernels.triton.offline import compile_module
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource
        except ImportError as exc:
            print("NO-AOT-API", exc)
            raise SystemExit(0)
        g = specialise(mods.and_masks(mods.sliding_window(64), mods.key_padding()),
                       mods.compose_scores(mods.alibi(), mods.softcap(30.0)), head_dim=80, v_head_dim=80,
                       dtype=torch.bfloat16, groups=4, mask_extras=[torch.ones(2, 8, dtype=torch.bool)],
                       score_extras=[torch.rand(4)], dropout=True)
        compiled = compile_module(cache.load(g.key, g.source), dtype="bf16", extra_dtypes={"mask_x0": "*u8"})
        print(sorted(name for name, k in compiled.items() if "cubin" in k.asm))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RINGCOMPILE_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.startswith("NO-AOT-API"):
        pytest.skip(run.stdout)
    assert run.stdout.strip() == "['block_bwd_dkdv', 'block_bwd_dq', 'block_fwd']"


def test_cli_prints_the_generated_kernels(capsys):
    from ringcompile.cli import main

    assert main(["kernels", "--mask", "causal", "--mask", "padding", "--score", "softcap:30",
                 "--head-dim", "64", "--groups", "4"]) == 0
    out = capsys.readouterr().out
    assert "def block_fwd(" in out and "GROUPS = tl.constexpr(4)" in out and "softcap(30)" in out
    assert "mask_x0_ptr" in out  # the padding mask's extra
