"""Shared helpers for the Triton kernel tests (no tests here): interpreter mode, float64 comparisons.

The Triton interpreter only works in a process whose ``import triton`` happened with
TRITON_INTERPRET=1 (Triton's own jit'd helpers, e.g. the combine function of ``tl.sum``, are
built at import), and such a process cannot compile for a GPU. So, when this module is first
imported (at collection, before any test has run torch.compile, which imports Triton):

* on a machine without CUDA, Triton is imported here in interpreter mode (CPU ``torch.compile``
  is unaffected: Inductor's CPU code is C++), and the kernels run in-process;
* with CUDA, or when Triton was already imported in compiled mode, the Triton tests run once
  in a child pytest with TRITON_INTERPRET=1 and each test here reports its child's outcome.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from ringcompile.kernels import reference

IN_CHILD = os.environ.get("RING_TRITON_CHILD") == "1"


def _interpreter_usable_here() -> bool:
    if IN_CHILD:
        return True
    if torch.cuda.is_available() or os.environ.get("RING_TRITON_FORCE_SUBPROCESS") == "1":
        return False
    if "triton" not in sys.modules:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        except ImportError:
            return True  # the tests will report the missing Triton themselves
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    from triton.language import standard
    from triton.runtime.jit import JITFunction

    return not isinstance(getattr(standard, "_sum_combine", None), JITFunction)


IN_PROCESS = _interpreter_usable_here()
_CHILD_RESULTS: dict[str, tuple[str, str]] | None = None
_CHILD_OUTPUT = ""
_CHILD_OK = False


def _child_results(rootdir: Path) -> dict[str, tuple[str, str]]:
    """Run every tests/kernels/test_triton_*.py once in a TRITON_INTERPRET=1 child pytest."""
    global _CHILD_RESULTS, _CHILD_OUTPUT, _CHILD_OK
    if _CHILD_RESULTS is None:
        files = sorted(str(p.relative_to(rootdir)) for p in Path(__file__).parent.glob("test_triton_*.py"))
        env = {**os.environ, "TRITON_INTERPRET": "1", "RING_TRITON_CHILD": "1"}
        env.pop("RING_TRITON_FORCE_SUBPROCESS", None)
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *files],
                             cwd=rootdir, env=env, capture_output=True, text=True, timeout=1200)
        _CHILD_OUTPUT = run.stdout[-6000:] + run.stderr[-2000:]
        _CHILD_OK = run.returncode == 0
        _CHILD_RESULTS = {}
        for line in run.stdout.splitlines():
            m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)(?: - (.*))?$", line)
            if m:
                _CHILD_RESULTS[m.group(2)] = (m.group(1), m.group(3) or "")
    return _CHILD_RESULTS


@pytest.fixture(autouse=True)
def triton_interpreter(request, tmp_path_factory, monkeypatch):
    """Run generated kernels on CPU tensors (TRITON_INTERPRET=1 is read when a kernel is defined,
    i.e. when its generated module is imported) with a private kernel cache directory."""
    if not IN_PROCESS:
        results = _child_results(Path(request.config.rootpath))
        outcome, message = results.get(request.node.nodeid, ("MISSING", ""))
        if outcome == "PASSED":
            pytest.skip("passed in the TRITON_INTERPRET=1 child pytest (see test_triton_support.py)")
        if outcome == "SKIPPED" or (outcome == "MISSING" and _CHILD_OK):
            pytest.skip(f"skipped in the interpreter child {message}")
        pytest.fail(f"{outcome} in the TRITON_INTERPRET=1 child pytest: {message}\n{_CHILD_OUTPUT}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cache = os.environ.get("RING_TEST_TRITON_CACHE") or str(tmp_path_factory.getbasetemp() / "rc_cache")
    monkeypatch.setenv("RINGCOMPILE_CACHE_DIR", cache)
    yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """|actual - expected| <= tol * (1 + max|expected|), with -inf matching -inf exactly."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    inf_a, inf_e = torch.isinf(actual), torch.isinf(expected)
    assert torch.equal(inf_a, inf_e), f"{what}: infinities differ"
    finite = ~inf_e
    if finite.any():
        err = (actual[finite] - expected[finite]).abs().max().item()
        scale = 1.0 + expected[finite].abs().max().item()
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} * {scale:.3g}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in kernel result"


def assert_ring_matches_float64(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                generator: torch.Generator, **reference_kwargs) -> None:
    """A ring output and its q/k/v gradients against float64 ``attention_reference`` on the full
    tensors (forward within 5e-5, gradients within 1e-4 of a random upstream gradient)."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference.attention_reference(q64, k64, v64, **reference_kwargs)
    assert_close(out.detach(), ref.detach(), 5e-5, "out")
    dout = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
    out.backward(dout.float())
    for got, want, name in zip((q.grad, k.grad, v.grad), torch.autograd.grad(ref, (q64, k64, v64), dout),
                               "qkv", strict=True):
        assert_close(got, want, 1e-4, f"d{name}")


def compare_block(kernels, q, k, v, *, tol: float, scale: float, q_offset: int, kv_offset: int,
                  seq_len: int | None, mask=None, score=None, mask_extras: Sequence[torch.Tensor] = (),
                  score_extras: Sequence[torch.Tensor] = (), backward: bool = True, seed: int = 0,
                  dropout_p: float = 0.0) -> None:
    """Kernel forward (and backward) of one block pair against float64 reference block math."""
    kw = dict(scale=scale, q_offset=q_offset, kv_offset=kv_offset, seq_len=seq_len, mask=mask, score=score,
              mask_extras=list(mask_extras))
    if dropout_p:
        kw.update(dropout_p=dropout_p, dropout_seed=seed)
    se64 = [e.double() if e.is_floating_point() else e for e in score_extras]
    out, lse = kernels.forward(q, k, v, score_extras=list(score_extras), **kw)
    ref_out, ref_lse = reference.block_forward(q.double(), k.double(), v.double(), score_extras=se64, **kw)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(out, ref_out, tol, "out")
    assert_close(lse, ref_lse, tol, "lse")
    if not backward:
        return
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    # a final (out, lse) as in a ring: this block's result merged with another block's partial
    other_out = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    other_lse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)
    fin_out, fin_lse = reference.merge_partials(ref_out, ref_lse, other_out, other_lse)
    dq, dk, dv, dx = kernels.backward(q, k, v, fin_out.to(q.dtype), dout.to(q.dtype), fin_lse.float(),
                                      score_extras=list(score_extras), **kw)
    rq, rk, rv, rx = reference.block_backward(q.double(), k.double(), v.double(), fin_out, dout, fin_lse,
                                              score_extras=se64, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert_close(dq, rq, tol, "dq")
    assert_close(dk, rk, tol, "dk")
    assert_close(dv, rv, tol, "dv")
    for i, (a, b) in enumerate(zip(dx, rx, strict=True)):
        if b is None:
            assert a is None or not a.abs().any(), f"d_extra {i}: expected no gradient"
        else:
            assert a is not None, f"d_extra {i}: missing gradient"
            assert_close(a, b, tol * 10, f"d_extra {i}")
