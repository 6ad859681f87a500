"""Where a node came from, for reports: its module path and source line.

Its own module because every stage names locations (discovery, the HOP pass, the pipeline's
accounting), and none of them should import another stage for it.
"""

from __future__ import annotations

import re

import torch.fx as fx


def module_path(source: str) -> str:
    """``L['self'].layers[0]._modules['attn']`` -> ``layers.0.attn`` (``G['mha']`` -> ``mha``)."""
    path = re.sub(r"""^[LG]\[(['"])(.+?)\1\]""", r"\2", source)
    path = re.sub(r"""^[LG]\[['"]""", "", path)  # a frame local whose quote was cut: L['blocks[1].attn
    path = re.sub(r"""\._(?:modules|parameters|buffers)\[(['"])([^'"]+)\1\]""", r".\2", path)
    path = re.sub(r"""\[(['"])([^'"]+)\1\]""", r".\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = path.replace("'", "").replace('"', "")
    for prefix in ("self.", "self"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path


def location_of(node: fx.Node) -> str:
    """Module path and source line of a node, for reports."""
    where = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        where = module_path(str(list(stack.values())[-1][0]))
    trace = node.meta.get("stack_trace") or ""
    line = ""
    for text in reversed(trace.strip().splitlines()):
        text = text.strip()
        if text.startswith("File "):
            parts = text.split('"')
            if len(parts) >= 3:
                fname = parts[1].rsplit("/", 1)[-1]
                lineno = parts[2].split(",")[1].strip().replace("line ", "") if "," in parts[2] else "?"
                func = parts[2].rsplit(" in ", 1)[-1] if " in " in parts[2] else ""
                line = f"{fname}:{lineno}" + (f" ({func})" if func else "")
            break
    if where and line:
        return f"{where} @ {line}"
    return where or line or node.name
