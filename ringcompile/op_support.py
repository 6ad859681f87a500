"""What every ringcompile custom op shares: its tags and the CUDA device guard around its work.

Ops that wait on collectives from the host, or copy host lists to the device, cannot be
captured in a CUDA graph; they carry ``torch.Tag.cudagraph_unsafe`` so Inductor's cudagraph
trees split around them instead of failing mid-capture. The tag exists only in newer torch
releases, so it is added where it exists (``SYNCING`` is then empty, and nothing changes).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

_TAG = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAKES_TAGS = "tags" in inspect.signature(torch.library.custom_op).parameters

# keyword arguments for ``torch.library.custom_op`` of an op that syncs with the host
SYNCING: dict = {"tags": (_TAG,)} if _TAG is not None and _TAKES_TAGS else {}


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for CUDA tensors (launches, events and streams go to their
    GPU, not the current one); a no-op on every other device."""
    if torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
