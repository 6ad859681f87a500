"""ringcompile: ``torch.compile(model, backend="ring")`` makes attention sequence-parallel."""

from . import ops as _ops  # noqa: F401  (registers torch.ops.ringcompile.*)
from .errors import (
    CommunicationError,
    KernelError,
    OptionError,
    RingCompileError,
    ShapeMismatchError,
    UnsupportedPatternError,
)
from .options import Options

__version__ = "0.1.0"

__all__ = [
    "CommunicationError",
    "KernelError",
    "OptionError",
    "Options",
    "RingCompileError",
    "ShapeMismatchError",
    "UnsupportedPatternError",
    "__version__",
]
