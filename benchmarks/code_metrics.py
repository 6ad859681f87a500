"""Lines per file and the longest functions of the ringcompile package (issue 11's measurements).

Run: ``python benchmarks/code_metrics.py [--top N] [ROOT]``. Counts physical lines per ``.py`` file
under the package folders and, per function (methods and nested functions included), the lines from
its ``def`` (decorators excluded) to its last line.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

# the last three: trees before session 8 kept them at the top, beside ringcompile/
PACKAGE_DIRS = ("ringcompile", "passes", "kernels", "cost_model")


def package_files(root: Path) -> list[Path]:
    """Every ``.py`` file of the package folders under ``root``, sorted."""
    return sorted(p for d in PACKAGE_DIRS if (root / d).is_dir() for p in (root / d).rglob("*.py"))


def functions(path: Path) -> list[tuple[int, str]]:
    """``(lines, qualified name)`` for every function defined in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((child.end_lineno - child.lineno + 1, name))
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.root)
    files = package_files(root)
    total = 0
    print("lines  file")
    for f in files:
        n = len(f.read_text().splitlines())
        total += n
        print(f"{n:5d}  {f.relative_to(root)}")
    print(f"{total:5d}  total ({len(files)} files)")
    funcs = sorted(((n, f"{f.relative_to(root)}:{name}") for f in files for n, name in functions(f)),
                   reverse=True)
    print(f"\nthe {args.top} longest functions")
    for n, name in funcs[:args.top]:
        print(f"{n:5d}  {name}")


if __name__ == "__main__":
    main()
