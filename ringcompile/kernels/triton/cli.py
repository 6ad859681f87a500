"""``ringcompile kernels``: print the Triton source generated for a mask/score combination."""

from __future__ import annotations

import argparse
import sys

import torch

from ringcompile import mods
from ringcompile.errors import RingCompileError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_mask(text: str) -> mods.Mod:
    """causal | window:W (causal sliding window) | window2:W (two-sided) | padding."""
    name, _, arg = text.partition(":")
    if name == "causal":
        return mods.causal()
    if name in ("window", "window2"):
        return mods.sliding_window(int(arg), is_causal=name == "window")
    if name == "padding":
        return mods.key_padding()
    raise argparse.ArgumentTypeError(f"unknown mask {text!r}: use causal, window:W, window2:W or padding")


def parse_score(text: str) -> mods.Mod:
    """alibi | softcap:C."""
    name, _, arg = text.partition(":")
    if name == "alibi":
        return mods.alibi()
    if name == "softcap":
        return mods.softcap(float(arg))
    raise argparse.ArgumentTypeError(f"unknown score mod {text!r}: use alibi or softcap:C")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("kernels",
                              help="print the Triton kernels generated for a mask/score combination")
    p.add_argument("--mask", type=parse_mask, action="append", default=[],
                   help="causal, window:W, window2:W or padding (repeat to combine with AND)")
    p.add_argument("--score", type=parse_score, action="append", default=[],
                   help="alibi or softcap:C (repeat to apply in order)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--groups", type=int, default=1, help="query heads per KV head (GQA)")
    p.add_argument("--dropout", action="store_true", help="include attention dropout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import show

    mask = mods.and_masks(*args.mask) if args.mask else None
    score = mods.compose_scores(*args.score) if args.score else None
    site = type("Site", (), {"mask": mask, "score": score})()
    try:
        print(show(site, head_dim=args.head_dim, dtype=DTYPES[args.dtype], groups=args.groups,
                   dropout=args.dropout))
    except RingCompileError as exc:
        print(f"cannot generate kernels: {exc}", file=sys.stderr)
        return 1
    return 0
