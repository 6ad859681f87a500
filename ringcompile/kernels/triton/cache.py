"""Generated kernel modules on disk, keyed by the specialisation hash, reused across processes.

Each specialisation is written once to ``$RINGCOMPILE_CACHE_DIR`` (default
``~/.cache/ringcompile/triton/``) as a readable ``.py`` module and imported from that file
(Triton's ``@triton.jit`` reads the kernel source back from the file). Triton's own compiled
binaries are cached by Triton as usual.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import sys
import tempfile
import threading
import types
from pathlib import Path

from ringcompile.log import get_logger

log = get_logger(__name__)

STATS: collections.Counter[str] = collections.Counter()  # generated / disk_hits / memory_hits
_MODULES: dict[tuple[str, bool], types.ModuleType] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("RINGCOMPILE_CACHE_DIR")
    path = Path(root) / "triton" if root else Path.home() / ".cache" / "ringcompile" / "triton"
    path.mkdir(parents=True, exist_ok=True)
    return path


def interpret_mode() -> bool:
    """Whether ``@triton.jit`` currently builds interpreter functions (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older Triton reads the variable directly
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """Whether Triton itself was imported in interpreter mode (its jit'd helpers, e.g. the
    combine function of ``tl.sum``, are built at import and only then run on CPU tensors)."""
    try:
        from triton.language import standard
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return not isinstance(getattr(standard, "_sum_combine", None), JITFunction)


def module_path(key: str) -> Path:
    return cache_dir() / f"attn_{key}.py"


def load(key: str, source: str) -> types.ModuleType:
    """The imported module for ``key``, writing ``source`` to the cache first if it is new."""
    interpret = interpret_mode()
    with _LOCK:
        cached = _MODULES.get((key, interpret))
        if cached is not None:
            STATS["memory_hits"] += 1
            return cached
        path = module_path(key)
        if path.exists() and path.read_text() == source:
            STATS["disk_hits"] += 1
            log.debug("triton kernel cache hit: %s", path)
        else:
            _write_atomically(path, source)
            STATS["generated"] += 1
            log.info("generated triton kernels %s", path)
        name = f"ringcompile_generated_attn_{key}{'_interp' if interpret else ''}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _MODULES[(key, interpret)] = module
        return module


def clear_memory() -> None:
    """Forget imported modules (the next load reads the disk cache, as a new process would)."""
    with _LOCK:
        for key, interpret in list(_MODULES):
            sys.modules.pop(f"ringcompile_generated_attn_{key}{'_interp' if interpret else ''}", None)
        _MODULES.clear()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
