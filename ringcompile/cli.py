"""The ``ringcompile`` command: explain, demo, plan, calibrate, kernels, trace.

Each subcommand lives beside the code it drives and registers itself here through a
``(name, add_parser)`` entry; ``add_parser(subparsers)`` must set ``func`` on its parser.
The CLI is the only place in the package that prints.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand name -> "module:function" that adds its parser
SUBCOMMANDS = {
    "explain": "ringcompile.explain_cli:add_parser",
    "demo": "ringcompile.demo:add_parser",
    "plan": "ringcompile.cost_model.cli:add_plan_parser",
    "calibrate": "ringcompile.cost_model.cli:add_calibrate_parser",
    "kernels": "ringcompile.kernels.triton.cli:add_parser",
    "trace": "ringcompile.observe.cli:add_parser",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringcompile", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, target in SUBCOMMANDS.items():
        module, func = target.split(":")
        try:
            add = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:  # a subcommand not built yet stays listed
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda args, exc=exc: _unavailable(exc))
            continue
        add(sub)
    return parser


def _unavailable(exc: Exception) -> int:
    print(f"this subcommand is unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
