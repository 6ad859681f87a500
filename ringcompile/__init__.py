"""ringcompile: ``torch.compile(model, backend="ring")`` makes attention sequence-parallel.

Public names are imported lazily so ``import ringcompile`` stays cheap and a backend
registered through the entry point does not pull in Triton or sympy until needed.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from . import ops as _ops  # noqa: F401  (registers torch.ops.ringcompile.*)
from .errors import (
    CommunicationError,
    KernelError,
    OptionError,
    RingCompileError,
    ShapeMismatchError,
    UnshardedAttentionError,
    UnsupportedPatternError,
)
from .options import Options

__version__ = "0.1.0"

if os.environ.get("RINGCOMPILE_TRACE_DIR"):  # a rank of `ringcompile trace -- <command>`
    from .observe.collect import start_from_env

    start_from_env()

# public name -> module that defines it
_LAZY = {
    "explain": "ringcompile.report",
    "ring_attention": "ringcompile.api",
    "shard": "ringcompile.api",
    "gather": "ringcompile.api",
    "plan": "ringcompile.cost_model.planner",
    "plans": "ringcompile.cost_model.planner",
    "estimate_memory": "ringcompile.cost_model.whole_model",
    "ring_backend": "ringcompile.backend",
}

__all__ = [
    "CommunicationError",
    "KernelError",
    "OptionError",
    "Options",
    "RingCompileError",
    "ShapeMismatchError",
    "UnshardedAttentionError",
    "UnsupportedPatternError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ringcompile' has no attribute {name!r}")
