"""A tiny distributed program for ``ringcompile trace`` tests: 2 gloo ranks, ring attention fwd+bwd.

Run as a command (``python ring_script.py``); it spawns its ranks itself, as a user's
training script under torchrun would have one process per rank.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

import ringcompile
from ringcompile.runtime.spawned_ranks import exit_rank, free_port, run_spawned

WORLD = 2


def rank_main(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    ql, kl, vl = (ringcompile.shard(t, dim=2).requires_grad_() for t in (q, k, v))
    out = ringcompile.ring_attention(ql, kl, vl, is_causal=True, strategy="ring", block_size=8, timeout=60)
    out.sum().backward()
    dist.barrier()
    exit_rank(0)


if __name__ == "__main__":
    sys.exit(0 if run_spawned(rank_main, (free_port(),), WORLD, timeout=120) else 1)
