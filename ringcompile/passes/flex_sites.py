"""After the rewrite: a FlexAttention caller that asked for ``return_lse`` reads the ring op's lse.

The sites themselves come from the ``flex`` attention rule (``passes/rules/flex.py``); the pre-retrace
half, which turns each ``flex_attention`` call into a marker, is ``passes.flex``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch.fx as fx

from ringcompile.errors import UnsupportedPatternError
from ringcompile.log import get_logger
from ringcompile.site import AttentionSite

from .find_attention import fold_permutes
from .flex import _CALLS, hold_call, is_marker
from .flex_guards import GUARDS_KEY

log = get_logger(__name__)


def connect_lse(gm: fx.GraphModule, sites: Sequence[AttentionSite], rejected: Sequence[Any] = ()) -> None:
    """After the rewrite: readers of a marker's lse read the ring op's lse. A marker left (its rule
    declined it, reason in ``rejected``) runs as the original flex op when other sites of the graph were
    rewritten and it needs no gradient; otherwise the graph falls back, with the reason."""
    from ringcompile.ops import RingCall, is_ring_call

    calls = [RingCall.from_node(n) for n in gm.graph.nodes if is_ring_call(n)]
    guards: list = []
    for site in sites:
        marker = next((n for n in site.nodes if is_marker(n)), None)
        if marker is None or not site.rewritten or marker.graph is not gm.graph:
            continue
        call = _CALLS.get(marker.args[5])
        guards += call.guards if call is not None else []
        lse_users = [u for u in marker.users if u.target is operator.getitem and u.args[1] == 1]
        if not lse_users:
            continue
        ring = [c for c in calls if _base(c.q) is site.q and _base(c.k) is site.k and _base(c.v) is site.v
                and c.spec.mask is site.mask and c.spec.score is site.score]
        if not ring:
            raise UnsupportedPatternError(f"flex_attention at {site.location}: lost its ring call for lse")
        with gm.graph.inserting_after(ring[0].node):
            lse = gm.graph.call_function(operator.getitem, (ring[0].node, 1))
        lse.meta.update(ring[0].node.meta)
        lse.meta["val"] = ring[0].node.meta["val"][1]
        for u in lse_users:
            u.replace_all_uses_with(lse)
    gm.graph.eliminate_dead_code()
    left = [n for n in gm.graph.nodes if is_marker(n)]
    if left:
        why = {getattr(r, "node", None): r.reason for r in rejected}
        why.update({n: s.reason for s in sites for n in s.nodes if is_marker(n) and s.reason})
        where = {n: _CALLS[n.args[5]].location if n.args[5] in _CALLS else n.name for n in left}
        what = "; ".join(f"{where[n]}: {why.get(n, 'not rewritten')}" for n in left)
        if not calls:  # nothing rewritten: the original graph is the faithful one
            raise UnsupportedPatternError(f"FlexAttention call(s) not rewritten: {what}")
        if any(_needs_grad(a) for n in left for a in n.args[:3]):
            raise UnsupportedPatternError(
                f"FlexAttention call(s) not rewritten: {what}; a refused call can only run on its own (as "
                "the original flex op, the other sites still sharded) without gradients, so the graph falls "
                "back")
        for n in left:  # they run as the original flex op (flex.run_original) on replicated inputs
            hold_call(n.args[5], gm)
        log.info("flex: %d refused call(s) run as the original flex op; the graph's other sites are "
                 "rewritten: %s", len(left), what)
    if guards:  # checked by the backend before every call (passes.flex_guards)
        gm.meta[GUARDS_KEY] = [*gm.meta.get(GUARDS_KEY, []), *guards]
    gm.recompile()


def _needs_grad(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return bool(getattr(val, "requires_grad", False))


def _base(node: Any) -> Any:
    return fold_permutes(node, (0, 1, 2, 3))[0] if isinstance(node, fx.Node) else node



__all__ = ["connect_lse"]
