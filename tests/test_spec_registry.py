"""Spec registry: content keys (no id(), equal across processes), bounded LRU, the metadata-check key."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ringcompile
from ringcompile import mods, spec
from ringcompile.content_key import content_key
from ringcompile.errors import RingCompileError, SpecEvictedError
from ringcompile.runtime import validate
from ringcompile.runtime.dispatch import metadata_check_key
from ringcompile.runtime.group import ResolvedGroup
from ringcompile.spec import AttentionSpec, get_spec, register_spec

# built the same way in this process and in the subprocesses below
SPEC_SOURCE = textwrap.dedent("""
    import torch
    from ringcompile import mods
    from ringcompile.spec import AttentionSpec

    WINDOW = 6

    def make(offset):
        def shifted(b, h, q, kv):
            return (kv <= q + offset) & (q - kv < WINDOW)
        return AttentionSpec(
            mask=mods.and_masks(mods.causal(), mods.from_callable(shifted, True)),
            score=mods.compose_scores(mods.softcap(5.0), mods.alibi()),
            scale=0.125, strategy="ring", tiles={"BLOCK_M": 64, "BLOCK_N": 32}, name="layer3.attn")
""")


def _module_spec(offset: int) -> AttentionSpec:
    namespace: dict = {"__name__": "spec_source"}
    exec(compile(SPEC_SOURCE, "spec_source", "exec", dont_inherit=True), namespace)
    return namespace["make"](offset)


def test_independently_built_equal_specs_share_one_key():
    a, b = _module_spec(2), _module_spec(2)
    assert a is not b and a.mask is not b.mask
    assert a.content.stable and a.content == b.content
    assert register_spec(a) == register_spec(b) == a.content.digest
    window = [AttentionSpec(mask=mods.sliding_window(5)) for _ in range(2)]
    assert window[0].content == window[1].content


@pytest.mark.parametrize("change", [
    dict(scale=0.25), dict(strategy="zigzag"), dict(mask=mods.causal()), dict(dropout_p=0.1),
    dict(tiles={"BLOCK_M": 64, "BLOCK_N": 64}), dict(name="other"), dict(block_size=128),
])
def test_any_differing_field_changes_the_key(change):
    a = _module_spec(2)
    assert a.replace(**change).content != a.content


def test_closure_values_and_globals_are_part_of_a_mods_key():
    assert _module_spec(2).content != _module_spec(3).content  # closed-over offset
    t1, t2 = torch.arange(4.0), torch.arange(4.0) + 1
    assert content_key(lambda s, b, h, q, kv: s + t1[kv]) != content_key(lambda s, b, h, q, kv: s + t2[kv])
    assert content_key(lambda s, b, h, q, kv: s + t1[kv]) == content_key(lambda s, b, h, q, kv: s + t1[kv])


def test_two_processes_compute_the_same_key(tmp_path):
    (tmp_path / "spec_source.py").write_text(SPEC_SOURCE)
    code = "import spec_source; s = spec_source.make(2); print(s.content.digest, s.content.stable)"
    # another process, with str hashing seeded differently from this one
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [_module_spec(2).content.digest, "True"]


def test_a_value_without_stable_description_is_flagged_and_never_cached_for_the_check():
    marker = object()
    unstable = AttentionSpec(mask=mods.from_callable(lambda b, h, q, kv: kv <= q if marker else q, True))
    assert not unstable.content.stable
    q = torch.randn(1, 2, 4, 8)
    group = ResolvedGroup(None, 0, 2)
    assert metadata_check_key(q, q, q, 8, unstable, group, "ring", "contiguous", None) is None
    # two different unstable specs never share a registry entry
    other = AttentionSpec(mask=mods.from_callable(lambda b, h, q, kv: kv <= q if marker else q, True))
    assert register_spec(unstable) != register_spec(other)
    assert get_spec(register_spec(unstable)) is unstable


def test_metadata_check_key_is_by_content():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    group = ResolvedGroup(None, 1, 4)
    args = (8 * 4, "ring", "contiguous", 4)
    a = metadata_check_key(q, k, k, args[0], _module_spec(2), group, *args[1:])
    b = metadata_check_key(q, k, k, args[0], _module_spec(2), group, *args[1:])
    assert a == b and "id" not in repr(a)
    assert a != metadata_check_key(q, k, k, args[0], _module_spec(3), group, *args[1:])
    assert a != metadata_check_key(q, k[:, :1], k[:, :1], args[0], _module_spec(2), group, *args[1:])


class _FakeGpuComm:
    """Two ranks on a pretend GPU: counts the metadata all_gathers, returns agreeing rows."""

    world_size, rank = 2, 0
    device = torch.device("meta")

    def __init__(self):
        self.gathers = 0

    def all_gather(self, t, step, what):
        self.gathers += 1
        rows = [torch.tensor(self.meta), torch.tensor(self.meta)]
        return type("Done", (), {"wait": lambda self: rows})()


def test_equal_specs_built_twice_skip_the_second_check_alike(monkeypatch):
    monkeypatch.setattr(validate, "_CHECKED", type(validate._CHECKED)())
    comm = _FakeGpuComm()
    q = torch.randn(1, 2, 4, 8)
    comm.meta = validate.metadata(q, q, q, 8, "ring", "contiguous", 0, 0)
    group = ResolvedGroup(None, 0, 2)
    for _ in range(2):  # a fresh spec object each time (what a recompile produces)
        key = metadata_check_key(q, q, q, 8, _module_spec(2), group, "ring", "contiguous", None)
        validate.check_ranks_agree(comm, comm.meta, key)
    assert comm.gathers == 1
    other = metadata_check_key(q, q, q, 8, _module_spec(3), group, "ring", "contiguous", None)
    validate.check_ranks_agree(comm, comm.meta, other)
    assert comm.gathers == 2


@pytest.fixture
def small_registry():
    size = spec.registry_size()
    spec.set_registry_size(3)
    yield
    spec.set_registry_size(size)


def test_registry_is_a_bounded_lru_and_an_evicted_spec_is_a_clear_error(small_registry):
    keys = [register_spec(AttentionSpec(scale=0.1 * (i + 1), name="lru")) for i in range(3)]
    get_spec(keys[0])  # used: now the most recent
    newer = register_spec(AttentionSpec(scale=0.9, name="lru"))
    assert len(spec._REGISTRY) == 3
    assert get_spec(keys[0]).scale == pytest.approx(0.1) and get_spec(newer).scale == pytest.approx(0.9)
    with pytest.raises(SpecEvictedError, match="set_registry_size") as err:
        get_spec(keys[1])
    assert isinstance(err.value, RingCompileError) and "RINGCOMPILE_SPEC_REGISTRY_SIZE" in str(err.value)
    assert get_spec(register_spec(AttentionSpec(scale=0.2, name="lru"))).scale == pytest.approx(0.2)
    with pytest.raises(RingCompileError, match="at least 1"):
        spec.set_registry_size(0)


def test_ring_attention_survives_eviction_of_its_cached_spec(small_registry):
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)

    def window(b, h, qi, kv):
        return (qi - kv).abs() < 3

    first = ringcompile.ring_attention(q, k, v, mask_mod=window)
    for i in range(4):
        register_spec(AttentionSpec(scale=0.3 + i, name="filler"))
    again = ringcompile.ring_attention(q, k, v, mask_mod=window)
    torch.testing.assert_close(first, again)
