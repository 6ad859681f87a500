"""Every package folder of the tree is listed in pyproject, so a wheel (not only an editable install) imports.

A sub-package missing from ``[tool.setuptools] packages`` is silently left out of a wheel: the editable
install used by the tests still finds it, and only a user's ``pip install ringcompile`` breaks.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _listed() -> tuple[set[str], dict[str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), dict(config.get("package-dir", {}))


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    """The folder a dotted package name maps to, through the longest ``package-dir`` prefix."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return ROOT.joinpath(package_dir[prefix], *parts[cut:])
    return ROOT.joinpath(*parts)


def test_every_package_folder_is_listed() -> None:
    packages, package_dir = _listed()
    tops = [name for name in packages if "." not in name or name in package_dir]
    roots = {name: _folder_of(name, package_dir) for name in tops}
    missing = []
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder)
            dotted = ".".join([name, *relative.parts]) if relative.parts else name
            if dotted not in packages:
                missing.append(dotted)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(set(missing))}"


def test_every_listed_package_exists() -> None:
    packages, package_dir = _listed()
    absent = [name for name in packages if not (_folder_of(name, package_dir) / "__init__.py").is_file()]
    assert not absent, f"listed in pyproject but no __init__.py: {absent}"


def test_the_repository_root_holds_one_import_package() -> None:
    """Running from a checkout puts its root on ``sys.path``; any package folder there beside ``ringcompile``
    shadows an installed distribution of that name. transformers 5.25 requires Hugging Face's ``kernels``,
    and a top-level ``kernels/`` folder here made ``import transformers``' model code fail under
    ``python -m pytest`` (it imported our folder as theirs)."""
    tops = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    others = [t for t in tops if t != "ringcompile"]
    assert tops == ["ringcompile"], f"move these under ringcompile/: {others}"
