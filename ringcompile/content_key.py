"""Stable content keys: the same description gives the same key in every process and on every rank.

Keys never use ``id()`` or a per-process counter: an address can be reused on one rank and
not on another, and a recompiled graph in a new process must find its spec again. Functions
(mask/score mods) are identified by their module, qualified name, bytecode, constants, and
the values they close over or read as globals. ``content_key`` reports whether every part
could be keyed this way (``stable``); a value with no stable description (an arbitrary
object or nn.Module: a repr need not show the state that matters) is named by its type
only, so such a key is not trusted for decisions that must agree across ranks (the
metadata-check cache runs the check every call instead).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import types
from typing import Any

import torch

_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_MAX_DEPTH = 12


class _Unstable(Exception):
    """Raised inside the walk when a value has no stable description."""


@dataclasses.dataclass(frozen=True)
class ContentKey:
    """``digest``: hex of the description; ``stable``: no part fell back to a type name."""

    digest: str
    stable: bool


def content_key(value: Any) -> ContentKey:
    """The content key of any value (a spec's fields, a mod, a closure...)."""
    walker = _Walker()
    text = repr(walker.describe(value, 0))
    return ContentKey(hashlib.sha1(text.encode()).hexdigest()[:20], not walker.unstable)


class _Walker:
    def __init__(self) -> None:
        self.unstable: list[str] = []
        self._active: set[int] = set()  # objects being described (recursion through closures/globals)

    def describe(self, x: Any, depth: int) -> Any:
        if isinstance(x, _SCALARS):
            return (type(x).__name__, repr(x))
        if depth > _MAX_DEPTH or id(x) in self._active:
            return self._fallback(x, "nested too deep or recursive")
        self._active.add(id(x))
        try:
            return self._describe(x, depth + 1)
        finally:
            self._active.discard(id(x))

    def _fallback(self, x: Any, why: str) -> Any:
        self.unstable.append(f"{type(x).__qualname__} ({why})")
        return ("unstable", type(x).__module__, type(x).__qualname__)

    def _describe(self, x: Any, depth: int) -> Any:  # noqa: C901 - one case per kind of value
        d = self.describe
        if isinstance(x, (tuple, list)):
            return (type(x).__name__, tuple(d(e, depth) for e in x))
        if isinstance(x, (set, frozenset)):
            return ("set", tuple(sorted(repr(d(e, depth)) for e in x)))
        if isinstance(x, dict):
            return ("dict", tuple(sorted((repr(d(k, depth)), d(v, depth)) for k, v in x.items())))
        if isinstance(x, enum.Enum):
            return ("enum", type(x).__qualname__, x.name)
        if isinstance(x, (torch.dtype, torch.device, torch.Size)):
            return (type(x).__name__, str(x))
        if isinstance(x, torch.Tensor):
            return self._tensor(x)
        if isinstance(x, types.ModuleType):
            return ("module", x.__name__)
        if isinstance(x, types.CodeType):
            return ("code", x.co_name, x.co_code, tuple(d(c, depth) for c in x.co_consts), x.co_names,
                    x.co_argcount, x.co_kwonlyargcount, x.co_flags)
        if isinstance(x, functools.partial):
            return ("partial", d(x.func, depth), d(x.args, depth), d(x.keywords, depth))
        if isinstance(x, types.FunctionType):
            return self._function(x, depth)
        if isinstance(x, types.MethodType):
            return ("method", d(x.__func__, depth), d(x.__self__, depth))
        if isinstance(x, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            return ("builtin", getattr(x, "__module__", None), x.__qualname__)
        if isinstance(x, type):
            return ("type", x.__module__, x.__qualname__)
        if isinstance(x, torch.fx.GraphModule):
            return self._graph_module(x, depth)
        if isinstance(x, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return ("op", str(x))
        if isinstance(x, (slice, range)):
            return (type(x).__name__, d(x.start, depth), d(x.stop, depth), d(x.step, depth))
        if isinstance(x, (torch.layout, torch.memory_format)) or x is Ellipsis:
            return (type(x).__name__, str(x))
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return ("dataclass", type(x).__module__, type(x).__qualname__,
                    tuple((f.name, d(getattr(x, f.name), depth)) for f in dataclasses.fields(x)
                          if f.compare and f.name != "graph"))
        # anything else (modules, arbitrary objects): a repr need not show all the state that
        # matters (an nn.Module's repr omits its weights), so it is never trusted as content
        return self._fallback(x, "no stable description of its state")

    def _graph_module(self, gm: torch.fx.GraphModule, depth: int) -> Any:
        """Its code plus every attribute the code reads (tensor constants, submodules)."""
        attrs = []
        for node in gm.graph.nodes:
            if node.op in ("get_attr", "call_module"):
                value: Any = gm
                for part in str(node.target).split("."):
                    value = getattr(value, part, None)
                attrs.append((str(node.target), self.describe(value, depth)))
        return ("graph", gm.code, tuple(attrs))

    def _function(self, fn: types.FunctionType, depth: int) -> Any:
        cells = []
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                cells.append((name, self.describe(cell.cell_contents, depth)))
            except ValueError:  # an empty cell
                cells.append((name, "empty"))
        globals_read = tuple((name, self._global(fn.__globals__[name], depth))
                             for name in _names_read(fn.__code__) if name in fn.__globals__)
        return ("function", fn.__module__, fn.__qualname__, self.describe(fn.__code__, depth),
                self.describe(fn.__defaults__, depth), self.describe(fn.__kwdefaults__, depth),
                tuple(cells), globals_read)

    def _global(self, value: Any, depth: int) -> Any:
        """Globals a function reads: modules and functions by name (not their whole closure)."""
        if isinstance(value, types.ModuleType):
            return ("module", value.__name__)
        if isinstance(value, (types.FunctionType, type)):
            return ("named", getattr(value, "__module__", None), value.__qualname__)
        return self.describe(value, depth)

    def _tensor(self, t: torch.Tensor) -> Any:
        try:
            data = t.detach().to("cpu").contiguous()
            raw = data.view(torch.uint8) if data.dim() else data.reshape(1).view(torch.uint8)
            digest = hashlib.sha1(raw.numpy().tobytes()).hexdigest()
        except Exception:  # fake/meta tensors, exotic dtypes: no readable content
            return self._fallback(t, "its values cannot be read")
        return ("tensor", str(t.dtype), tuple(t.shape), digest)


def _names_read(code: types.CodeType) -> tuple[str, ...]:
    """Global names read by ``code`` and the code objects nested in it."""
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.extend(_names_read(c))
    return tuple(dict.fromkeys(names))
