"""Find attention in a normalised aten graph: ask the registered rules (``passes.rules``) about every node.

Each spelling of attention is one ``Rule`` (an SDPA call; softmax(q.k^T) @ v as a plain chain, with
Bloom's head split, or with attention sinks). A rule returns a ``Match`` (the site), ``None`` (not its
spelling: the next rule is asked) or declines with a reason; the first rule that applies decides.
Declines are reported as "attention-like, not rewritten" with the reason and the rule's name; a
softmax that is not attention at all (a router, a softmax over features) is reported as "not
attention" and never warned about. Discovery does not modify the graph.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch.fx as fx

from ringcompile.log import get_logger
from ringcompile.site import AttentionSite

from . import rules as _rules  # noqa: F401 - registers the built-in rules
from .locations import location_of, module_path  # noqa: F401  (module_path re-exported)
from .rules.base import RULES, Decline, Match, NotAttention, Rule, register_rule, rules_for  # noqa: F401
from .rules.chain import not_attention_reason  # noqa: F401
from .rules.ops import CAST_OPS, CHAIN_OPS, DROPOUT_OPS, MATMUL_OPS, SDPA_OPS, SOFTMAX_OPS, is_chain_op  # noqa: F401
from .rules.shapes import fold_permutes, permuted_shape, same_size, strip_kv_repeats, strip_repeat  # noqa: F401

log = get_logger(__name__)


@dataclasses.dataclass
class Rejected:
    """An attention-like subgraph that was not turned into a site, and why (``rule``: who declined)."""

    location: str
    pattern: str
    reason: str
    node: fx.Node | None = None
    attention: bool = True  # False: the candidate is not attention at all (a router, a feature softmax)
    rule: str | None = None


class Discovery(NamedTuple):
    sites: list[AttentionSite]
    rejected: list[Rejected]


def find_attention(gm: fx.GraphModule) -> Discovery:
    """All attention sites of ``gm`` (not modified) plus the attention-like subgraphs left alone."""
    sites: list[AttentionSite] = []
    rejected: list[Rejected] = []
    claimed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        rules = rules_for(node)
        if not rules:
            continue
        outcome = ask_rules(node, rules, len(sites))
        if outcome is None:
            continue
        if isinstance(outcome, Rejected):
            rejected.append(outcome)
            continue
        site = outcome.site
        if site.nodes & claimed:
            rejected.append(Rejected(site.location, site.pattern, "overlaps another attention site", node,
                                     rule=outcome.rule))
            continue
        claimed |= site.nodes
        sites.append(site)
    return Discovery(sites, rejected)


def ask_rules(node: fx.Node, rules: list[Rule], index: int) -> Match | Rejected | None:
    """The first rule that applies to ``node`` decides: its match, or its decline as a Rejected."""
    for rule in rules:
        try:
            match = rule.extract(node, index)
        except NotAttention as exc:
            return Rejected(location_of(node), rule.pattern, f"not attention: {exc} [rule {rule.name}]",
                            node, attention=False, rule=rule.name)
        except Decline as exc:
            log.info("attention-like subgraph at %s not rewritten (rule %s): %s", location_of(node),
                     rule.name, exc)
            return Rejected(location_of(node), rule.pattern, f"{exc} [rule {rule.name}]", node,
                            rule=rule.name)
        except Exception as exc:  # noqa: BLE001 - a matcher bug must cost one site, not the graph
            reason = f"internal error while matching: {type(exc).__name__}: {exc} [rule {rule.name}]"
            log.warning("attention at %s not rewritten: %s", location_of(node), reason)
            return Rejected(location_of(node), rule.pattern, reason, node, rule=rule.name)
        if match is not None:
            return match
    return None
