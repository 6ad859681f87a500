"""One exception family for everything ringcompile raises on purpose."""

from __future__ import annotations


class RingCompileError(RuntimeError):
    """Base class: something the user can fix; the message says what and how."""


class OptionError(RingCompileError, ValueError):
    """An option passed through ``torch.compile(..., options=...)`` or a keyword is invalid."""


class UnsupportedPatternError(RingCompileError):
    """A graph pattern cannot be rewritten; callers fall back to the original graph."""


class ShapeMismatchError(RingCompileError, ValueError):
    """Tensors (or ranks) disagree on shapes, dtypes or sequence length."""


class CommunicationError(RingCompileError):
    """A collective failed or timed out; the message names the rank and the ring step."""


class KernelError(RingCompileError):
    """A generated kernel could not be built or launched."""


class UnshardedAttentionError(RingCompileError):
    """``require_sharded=True`` and a graph would run some attention unsharded; the message names it."""


class SpecEvictedError(RingCompileError):
    """A compiled graph called a spec the bounded registry evicted; the message says how to keep it."""


class MissingDependencyError(RingCompileError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""
