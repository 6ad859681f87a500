"""Canonicalise a Dynamo (torch IR) graph into one pre-autograd aten graph.

Dynamo records ops the way the user spelled them (``@``, ``torch.matmul``, ``F.softmax``,
``.float()``...). Retracing with ``make_fx(pre_dispatch=True)`` spells them all as aten ops
above autograd, so discovery matches one form and the rewritten graph still trains.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch.fx.experimental.proxy_tensor import make_fx

from ringcompile.errors import UnsupportedPatternError
from ringcompile.log import get_logger

from . import hops
from .aten import EXAMPLE_KEY, SOURCE_KEY

log = get_logger(__name__)

_COPIED_META = ("stack_trace", "nn_module_stack")


def source_name(node: fx.Node) -> str | None:
    """The Dynamo source name (e.g. ``L['x']``) of a Dynamo placeholder, if recorded."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name
    return name if isinstance(name, str) else name()


def _is_module_state(source: str | None) -> bool:
    """Parameters and buffers of modules: constant tensors whose values may be inspected."""
    if not source:
        return False
    return any(tag in source for tag in ("._buffers[", "._parameters[", ".buffers[", ".parameters[",
                                         "_buffers", "_parameters"))


# Mode switches Dynamo records that the pre-dispatch retrace drops (torch 2.11-2.13): the ops after them
# would run with grad on, so the retraced graph would train what the model never differentiates.
_DROPPED_MODE_SWITCHES = ("_enter_inference_mode", "_exit_inference_mode")


def _refuse_dropped_modes(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and name in _DROPPED_MODE_SWITCHES:
            raise UnsupportedPatternError(
                f"the graph switches torch.inference_mode ({name}), which the aten retrace drops (the "
                "inference-mode ops would get gradients); the graph is left unchanged. Use torch.no_grad() "
                "inside the compiled model instead")


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Retrace ``gm`` (a Dynamo graph) into an aten pre-dispatch graph with fake-tensor metadata.

    Placeholders of the result match ``gm``'s one to one (SymInt placeholders included), carry
    ``meta["ringcompile_source"]`` and, for module buffers/parameters, ``meta["ringcompile_example"]``.
    """
    _refuse_dropped_modes(gm)
    if hops.has_hops(gm):
        gm = hops.flatten_hops(gm)  # a copy: the original graph stays intact for the fallback
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes: list[Any] = []
    for n in placeholders:
        if "example_value" not in n.meta:
            raise UnsupportedPatternError(f"graph input {n.name} has no example value; cannot retrace")
        fakes.append(n.meta["example_value"])
    fake_mode = torch._guards.detect_fake_mode(fakes)
    if fake_mode is None:
        raise UnsupportedPatternError("no fake mode found on the graph inputs; cannot retrace")
    # Under dynamic=True Dynamo turns float module attributes (e.g. nn.Embedding.norm_type) into
    # 0-d tensor inputs read back with .item(); let that trace as an unbacked scalar.
    allowed = fake_mode.allow_scalar_outputs
    fake_mode.allow_scalar_outputs = fake_mode.shape_env is not None
    retracer = _Retracer(gm)  # reads real example values: outside the fake mode
    try:
        with fake_mode, fx_traceback.preserve_node_meta():
            aten_gm = make_fx(retracer.run, pre_dispatch=True, tracing_mode="fake")(*fakes)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "leave the graph alone"
        raise UnsupportedPatternError(f"could not retrace the graph at aten level: {exc}") from exc
    finally:
        fake_mode.allow_scalar_outputs = allowed

    new_placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(new_placeholders) != len(placeholders):
        raise UnsupportedPatternError(
            f"retraced graph has {len(new_placeholders)} inputs, expected {len(placeholders)}")
    for old, new in zip(placeholders, new_placeholders, strict=True):
        src = source_name(old)
        new.meta[SOURCE_KEY] = src
        new.meta["ringcompile_dynamo_name"] = old.name
        if _is_module_state(src):
            grapharg = old.meta.get("grapharg")
            example = getattr(grapharg, "example", None)
            if isinstance(example, torch.Tensor):
                new.meta[EXAMPLE_KEY] = example
        for key in _COPIED_META:
            if key in old.meta and key not in new.meta:
                new.meta[key] = old.meta[key]
    aten_gm.meta[hops.REJECTED_KEY] = gm.meta.get(hops.REJECTED_KEY, [])
    hops.apply_selective_policies(aten_gm, gm.meta.get(hops.AC_CONTEXT_KEY, {}))
    log.debug("normalised graph:\n%s", aten_gm.graph)
    return aten_gm


class _Retracer(fx.Interpreter):
    """Replays the Dynamo graph, pinning unspecialised float inputs read back with ``.item()``.

    Under dynamic shapes Dynamo passes float module attributes (LayerNorm's eps, an attention
    scale, a dropout p) as 0-d tensors and reads them with ``.item()``; traced symbolically they
    become unbacked floats that ops like layer_norm cannot take. Their value at compile time is
    used instead, with a run-time assertion in the graph so a changed value fails loudly
    rather than computing with the old one.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.pinned: dict[fx.Node, float | int | bool] = {}
        for n in gm.graph.nodes:
            if n.op != "placeholder" or not n.users:
                continue
            if not all(u.op == "call_method" and u.target == "item" for u in n.users):
                continue
            example = getattr(n.meta.get("grapharg"), "example", None)
            if isinstance(example, torch.Tensor) and example.dim() == 0:
                self.pinned[n] = example.item()
            elif isinstance(example, (float, int, bool)):
                self.pinned[n] = example

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_method" and n.target == "item" and n.args[0] in self.pinned:
            value = self.pinned[n.args[0]]
            tensor = self.env[n.args[0]]
            torch._assert_async(torch.eq(tensor, value),
                                f"ringcompile: {n.args[0].name} changed since compilation (was {value!r}); "
                                "recompile the model (torch._dynamo.reset()) after changing it")
            return value
        if n.op == "call_function" and hops.is_autograd_function(n.target):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return hops.emit_autograd_function(n.target, args, kwargs)
        return super().run_node(n)


def fake_mode_of(gm: fx.GraphModule) -> Any:
    """The fake mode the graph's metadata lives in (None when there is none)."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return torch._guards.detect_fake_mode([v for v in vals if v is not None])
