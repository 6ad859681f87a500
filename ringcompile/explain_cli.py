"""``ringcompile explain``: print what the backend finds in a small built-in model."""

from __future__ import annotations

import argparse
import time

import torch

from .models import MODELS, ModelConfig, build_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain",
                              help="report the attention the ring backend finds in a built-in model")
    p.add_argument("--model", choices=sorted(MODELS), default="llama", help="built-in model (default: llama)")
    p.add_argument("--seq", type=int, default=256, help="sequence length of the example input (default: 256)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input (default: 1)")
    p.add_argument("--layers", type=int, default=2, help="number of layers (default: 2)")
    p.add_argument("--check", action="store_true",
                   help="also run the model compiled with backend='ring' and compare it with eager")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .report import explain

    cfg = ModelConfig(layers=args.layers, max_seq=max(args.seq, 16),
                      kv_heads=2 if args.model == "llama" else 4)
    model = build_model(args.model, cfg).eval()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab, (args.batch, args.seq), generator=gen)
    start = time.perf_counter()
    report = explain(model, input_ids)
    print(f"model: {args.model} ({cfg.layers} layers, {cfg.heads} heads, {cfg.kv_heads} kv heads, "
          f"dim {cfg.dim}), input (batch {args.batch}, seq {args.seq})")
    print(report)
    print(f"explained in {time.perf_counter() - start:.1f} s")
    if args.check:
        compiled = torch.compile(model, backend="ring", options={"inner": "eager"})
        with torch.no_grad():
            diff = (compiled(input_ids) - model(input_ids)).abs().max().item()
        print(f"compiled vs eager logits: max abs difference {diff:.2e}")
        if not diff < 1e-3:
            return 1
    return 0 if report.rewritten else 1
