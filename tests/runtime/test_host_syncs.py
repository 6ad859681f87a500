"""No host syncs per block pair on a GPU (issue 16.6).

The tensors live on the "meta" device, which stands in for the GPU: it is not the CPU, so
every device policy takes its GPU branch (the runtime and the launcher ask "is this the
CPU?"), and it holds no values, so nothing can be read on the host. (Fake CUDA tensors
under ``FakeTensorMode`` cannot be sliced or copied without a CUDA build.) A dispatch mode
counts every host read (``bool(t)``, ``int(t)``, ``.item()``: aten ``_local_scalar_dense`` /
``is_nonzero``) and every host-to-device upload (``torch.tensor(..., device=dev)``,
``cpu_tensor.to(dev)``), answering reads with a placeholder so the count, not the first
exception, is what a failure shows. The Triton kernels' compiled module is replaced by a
recorder (no GPU here); everything on the host side of the launch runs for real.
"""

from __future__ import annotations

import torch
from fake_gpu import GPU, EchoCommunicator
from torch.utils._python_dispatch import TorchDispatchMode

from ringcompile import mods
from ringcompile.kernels import dropout
from ringcompile.runtime.local import local_backward, local_forward
from ringcompile.runtime.strategies.common import (
    RingContext,
    backward_pairs,
    chunk_pieces,
    delta_of,
    empty_outputs,
    forward_pairs,
    grad_buffers,
)
from ringcompile.spec import AttentionSpec

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}


class SyncCounter(TorchDispatchMode):
    """Counts host reads of device values and host-to-device uploads."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.uploads: list[str] = []

    def __torch_dispatch__(self, func, types, args, kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and args[0].device.type != "cpu":  # reading a CPU tensor waits for nothing
            self.reads.append(str(func))
            return True if args[0].dtype == torch.bool else 0  # a placeholder value
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is aten._to_copy.default and src is not None and src.device.type == "cpu" \
                and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.uploads.append(str(func))
        if func is aten.copy_.default and args[0].device.type != "cpu" and args[1].device.type == "cpu":
            self.uploads.append(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        # .item(), int(t), float(t) and .tolist() are also counted at the Python level, in case
        # a device check stops them before the dispatcher
        self._saved = {n: getattr(torch.Tensor, n) for n in ("item", "__int__", "__float__", "tolist")}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._reader(name, original))
        self._tensor = torch.tensor  # its upload is not an op the mode sees
        torch.tensor = self._uploader(self._tensor)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        torch.tensor = self._tensor
        return super().__exit__(*exc)

    def _uploader(self, original):
        def tensor(data, *args, device=None, **kwargs):
            if device is not None and torch.device(device).type != "cpu":
                self.uploads.append("torch.tensor")
            return original(data, *args, device=device, **kwargs)
        return tensor

    def _reader(self, name, original):
        def read(t, *args, **kwargs):
            if t.device.type == "cpu":
                return original(t, *args, **kwargs)
            self.reads.append(f"Tensor.{name}")
            return [0] * t.numel() if name == "tolist" else 0
        return read

    @property
    def total(self) -> int:
        return len(self.reads) + len(self.uploads)


def _case(S: int, B: int = 2, H: int = 2, D: int = 16):
    """q/k/v on the stand-in GPU, a key-padding mask (each batch its own length) and a seed tensor."""
    q, k, v = (torch.randn(B, H, S, D, device=GPU) for _ in range(3))
    lengths = torch.tensor([S - 3, S // 2], device=GPU)
    key_mask = torch.arange(S, device=GPU).view(1, -1) < lengths.view(-1, 1)
    seed = torch.randint(0, 2**31, (), dtype=torch.int64, device=GPU)
    return q, k, v, key_mask, seed


SPEC = AttentionSpec(mask=mods.and_masks(mods.causal(), mods.key_padding()), dropout_p=0.1)


def _count_block_loop(kernels, S: int, block: int) -> int:
    """Host syncs of one local forward + backward over S tokens in ``block``-token pairs."""
    q, k, v, key_mask, seed = _case(S)
    dout = torch.randn_like(q)
    with SyncCounter() as counter:
        out, lse = local_forward(q, k, v, [key_mask], [], S, SPEC, block=block, kernels=kernels,
                                 dropout_seed=seed)
        local_backward(dout, q, k, v, out, lse, [key_mask], [], S, SPEC, block=block, kernels=kernels,
                       dropout_seed=seed)
    return counter.total


def test_block_loop_has_no_syncs_the_seed_goes_to_the_kernel_as_a_tensor(triton_on_fake_gpu):
    kernels, launches = triton_on_fake_gpu
    few = _count_block_loop(kernels, 32, 16)        # 3 causal pairs
    n_few = len(launches)
    launches.clear()
    many = _count_block_loop(kernels, 128, 16)      # 36 causal pairs
    n_many = len(launches)
    assert n_many > 4 * n_few > 0  # the block loop did run many more pairs...
    assert few == many == 0, (few, many)  # ...with no syncs: the kernels read the seed on the device


def test_kernels_that_cannot_read_the_seed_on_the_device_read_it_once_per_call(triton_on_fake_gpu):
    """Kernels without ``device_seed`` (CPU, generic) get an int: one read per call, none per pair."""
    import dataclasses

    kernels, _ = triton_on_fake_gpu
    host_seeded = dataclasses.replace(kernels, device_seed=False)
    # (the Triton launcher turns an int seed into a device tensor once per value: the first call uploads
    # it; the counter answers every read with the same placeholder value)
    _count_block_loop(host_seeded, 16, 16)
    assert _count_block_loop(host_seeded, 32, 16) == _count_block_loop(host_seeded, 128, 16) == 2


def test_one_ring_step_with_causal_padding_and_dropout_has_no_syncs(triton_on_fake_gpu):
    """A zigzag ring step (two query pieces x two K/V pieces, forward and backward) on a fake GPU:
    nothing is read when the call's context is built (the seed stays a tensor) nor in the step."""
    kernels, launches = triton_on_fake_gpu
    counts = []
    for S in (64, 512):
        q, k, v, key_mask, seed = _case(S)
        dout = torch.randn_like(q)
        with SyncCounter() as at_setup:
            ctx = RingContext(None, SPEC, "zigzag", S, "zigzag", [key_mask], [], kernels, seed)
        half = S // 4  # rank 0 of 2 in zigzag holds chunks 0 and 3 of 4
        pieces = chunk_pieces([(0, half), (3 * half, S)], S)
        ql, kl, vl, dl = (torch.cat([x[:, :, :half], x[:, :, 3 * half:]], dim=2) for x in (q, k, v, dout))
        with SyncCounter() as in_step:
            out, lse = empty_outputs(ql, vl)
            forward_pairs(ctx, ql, pieces, kl, vl, pieces, out, lse)
            dq, dk, dv = grad_buffers(ql, kl, vl)
            backward_pairs(ctx, dl, ql, out, lse, delta_of(dl, out), pieces, kl, vl, pieces, dq, dk, dv,
                           [None])
        counts.append((at_setup.total, in_step.total))
    assert counts == [(0, 0), (0, 0)], counts
    assert launches  # the kernels did launch


def test_layout_index_tensors_are_uploaded_once_per_device_and_content():
    from ringcompile.runtime.collectives import _shift_index, layout_index, slice_local
    from ringcompile.runtime.layouts import local_indices

    x = torch.randn(2, 37, 3, device=GPU)  # 37 tokens, padded to 40
    with SyncCounter() as first:
        slice_local(x, 1, 1, 37, 40, "zigzag", 2, 1)
        _shift_index(40, 2, 1, "zigzag", 3, GPU)
    with SyncCounter() as again:
        for _ in range(3):
            y = slice_local(x, 1, 1, 37, 40, "zigzag", 2, 1)
            _shift_index(40, 2, 1, "zigzag", 3, GPU)
    assert len(first.uploads) == 3 and again.total == 0, (first.uploads, again.uploads)
    assert y.shape == (2, 20, 3)
    cpu = layout_index(40, 2, 1, "zigzag", torch.device("cpu"))
    assert torch.equal(cpu, local_indices(40, 2, 1, "zigzag"))  # the content, per device
    assert layout_index(40, 2, 0, "zigzag", torch.device("cpu")) is not cpu


def test_the_counter_sees_every_kind_of_sync():
    """What the counter must catch, so the zero counts above mean something."""
    x = torch.randn(4, device=GPU)
    with SyncCounter() as c:
        bool(x.any())
        x.sum().item()
        int(x[0])
        torch.tensor([1, 2], device=GPU)
        torch.ones(3).to(GPU)
        torch.ones(1).item()  # a CPU read: free, not counted
    assert len(c.reads) == 3 and len(c.uploads) == 2, (c.reads, c.uploads)


def _strategy_syncs(strategy: str, kernels, S: int, comm, monkeypatch) -> tuple[int, list[str]]:
    """Host syncs of one ``strategy`` forward + backward on the stand-in GPU, causal + key padding and
    dropout with a seed tensor, counted from building the call's context to the last gradient."""
    from ringcompile.runtime.strategies import hybrid, ulysses

    monkeypatch.setattr(ulysses, "block_kernels", lambda spec, device: kernels)  # head groups: Triton
    module = {"ulysses": ulysses, "hybrid": hybrid}[strategy]
    layout = "zigzag"
    B, H, D = 2, 4, 16
    local = S // comm.world_size
    q, k, v, dout = (torch.randn(B, H, local, D, device=GPU) for _ in range(4))
    key_mask = torch.arange(S, device=GPU).view(1, -1) < torch.tensor([S - 3, S // 2], device=GPU).view(-1, 1)
    seed = torch.randint(0, 2**31, (), dtype=torch.int64, device=GPU)
    spec = AttentionSpec(mask=mods.and_masks(mods.causal(), mods.key_padding()), dropout_p=0.1)
    with SyncCounter() as counter:
        ctx = RingContext(comm, spec, strategy, S, layout, [key_mask], [], kernels, seed)
        out, lse = module.forward(ctx, q, k, v)
        module.backward(ctx, dout, q, k, v, out, lse)
    return counter.total, counter.reads + counter.uploads


def test_ulysses_with_a_seed_tensor_under_dropout_has_no_syncs(triton_on_fake_gpu, monkeypatch):
    """Rank 1 of 2 holds heads [2, 4): its seed carries the head offset without being read (it was
    read with ``.item()`` once per call), so a whole Ulysses forward + backward reads nothing."""
    kernels, launches = triton_on_fake_gpu
    for S in (32, 128):
        total, what = _strategy_syncs("ulysses", kernels, S, EchoCommunicator(1, 2), monkeypatch)
        assert total == 0, what
    assert {name for name, _ in launches} == {"block_fwd", "block_bwd_dkdv", "block_bwd_dq"}


def test_hybrid_with_a_seed_tensor_under_dropout_has_no_syncs(triton_on_fake_gpu, monkeypatch):
    """Inner rank 1 of a 2 x 2 group (heads [2, 4), the ring over nodes): no host read per call. The
    mesh check (one all_gather per call off CUDA, remembered on CUDA) is not what this counts."""
    from ringcompile.runtime.strategies import hybrid
    from ringcompile.runtime.two_level import TwoLevelCommunicator

    monkeypatch.setattr(hybrid, "check_mesh_agrees", lambda comm: None)
    kernels, launches = triton_on_fake_gpu
    for S in (32, 128):
        two = TwoLevelCommunicator(EchoCommunicator(1, 4), EchoCommunicator(0, 2), EchoCommunicator(1, 2))
        total, what = _strategy_syncs("hybrid", kernels, S, two, monkeypatch)
        assert total == 0, what
    assert {name for name, _ in launches} == {"block_fwd", "block_bwd_dkdv", "block_bwd_dq"}


def test_a_declined_mod_reads_the_seed_once_per_call_not_once_per_fallback_pair(monkeypatch):
    """When Triton declines a site at launch, the kernels run the reference math FALLBACK_BLOCK pairs at
    a time: the seed tensor is read once per kernel call there (it was read once per pair)."""
    from ringcompile.kernels.triton import launch

    monkeypatch.setattr(launch.TritonBlocks, "_module", lambda self, *a, **k: (None, None))
    monkeypatch.setattr(launch, "FALLBACK_BLOCK", 8)
    blocks = launch.TritonBlocks(forced=False)
    counts = []
    for S in (16, 64):  # 3 and 36 causal fallback pairs per call
        q, k, v, key_mask, seed = _case(S)
        kw = dict(scale=0.25, seq_len=S, mask=SPEC.mask, mask_extras=[key_mask], dropout_p=0.1,
                  dropout_seed=dropout.with_head_offset(seed, 2))
        with SyncCounter() as counter:
            out, lse = blocks.forward(q, k, v, **kw)
            blocks.backward(q, k, v, out, torch.randn_like(q), lse, **kw)
        counts.append(len(counter.reads))
    assert counts == [2, 2], counts  # one read per call (forward, backward), whatever the pair count
