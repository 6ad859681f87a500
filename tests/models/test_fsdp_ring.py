"""Data parallel x ring on 4 gloo ranks as a (dp=2, cp=2) DeviceMesh, against one process (issue 15 item 6).

FSDP2 (``fully_shard(block, mesh=mesh["dp"])`` per block, then the root) or DDP on the dp dimension,
the ring on ``mesh["cp"]`` (``options={"group": mesh, "mesh_dim": "cp"}``). Each dp rank trains on its
half of the batch, sequence-sharded over its cp pair; after a few SGD steps every parameter equals
the one-process model trained on the whole batch (float64), and every graph that holds attention was
sequence-sharded (the shard report, not only the loss).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import run_cases  # noqa: E402

pytestmark = pytest.mark.multirank
V, S, STEPS, LR = 61, 16, 3, 0.5


def _model():
    from nanogpt import GPT

    torch.manual_seed(0)
    return GPT(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=16).double()


def _batches(dp: int):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, V, (2 * dp, S), generator=g), torch.randint(0, V, (2 * dp, S), generator=g))
            for _ in range(STEPS)]


def _one_process_params(dp: int) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for ids, labels in _batches(dp):
        opt.zero_grad()
        model(ids, labels)[1].backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def train(rank: int, world: int, wrap: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from ringcompile import backend

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "cp"))
    dp = mesh.get_local_rank("dp")
    torch._dynamo.reset()
    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    if wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        trained = model
    else:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    first = len(backend.HISTORY)
    compiled = torch.compile(trained, backend="ring", dynamic=False,
                             options={"inner": "eager", "group": mesh, "mesh_dim": "cp"})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for ids, labels in _batches(2):
        opt.zero_grad()
        compiled(ids[2 * dp:2 * dp + 2], labels[2 * dp:2 * dp + 2])[1].backward()
        opt.step()
    got = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in model.parameters()]
    ref = _one_process_params(2)
    entries = backend.HISTORY[first:]
    return {"err": max((a - b).abs().max().item() for a, b in zip(got, ref, strict=True)),
            "moved": min((a - b).abs().max().item() for a, b in zip(ref, initial, strict=True)),
            "graphs": [(sum(s.rewritten for s in e.sites), e.graph.meta.get("ringcompile_shard") is not None,
                        getattr(e.graph.meta.get("ringcompile_shard"), "world_size", None))
                       for e in entries if e.graph is not None],
            "fallbacks": [e.fallback_reason for e in entries if e.fallback_reason],
            "rejected": [(r.pattern, r.reason) for e in entries for r in e.rejected]}


def case_fsdp2(rank, world):
    return train(rank, world, "fsdp")


def case_ddp(rank, world):
    return train(rank, world, "ddp")


@pytest.fixture(scope="module")
def results():
    return run_cases("test_fsdp_ring", ["case_fsdp2", "case_ddp"], world=4, timeout=500)


@pytest.mark.parametrize("name", ["case_fsdp2", "case_ddp"])
def test_data_parallel_times_ring_equals_one_process(results, name):
    for r, out in enumerate(results[name]):
        assert "error" not in out, f"rank {r}: {out['error']}"
        assert not out["fallbacks"] and not out["rejected"], out
        attention = [g for g in out["graphs"] if g[0]]
        assert attention and all(sharded and n == 2 for _, sharded, n in attention), out["graphs"]
        assert out["moved"] > 1e-3, "the steps must change every parameter"
        assert out["err"] <= 1e-12, f"rank {r}: parameters differ from one process by {out['err']}"
