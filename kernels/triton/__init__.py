"""Generated Triton kernels for attention blocks."""

from __future__ import annotations

from ringcompile.spec import AttentionSpec


def triton_block_kernels(spec: AttentionSpec, forced: bool = False):
    """BlockKernels generated for ``spec``, or None (logged) when the site cannot be lowered."""
    return None
