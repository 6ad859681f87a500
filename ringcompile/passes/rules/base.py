"""The attention-rule registry: each spelling of attention is one ``Rule`` (what it anchors on, what it
extracts). ``passes.find_attention`` asks the registered rules about every node; a rule returns a
``Match``, ``None`` (not its spelling) or raises ``Decline`` with the reason it gives up.

Adding a spelling means one ``register_rule(Rule(name, anchors, extract))`` call (in any module imported
before discovery runs; see docs/ARCHITECTURE.md "How to add a spelling") and one test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx

from ringcompile.site import AttentionSite


class Decline(Exception):
    """Raised by a rule's extractor: the candidate is this rule's spelling but fails a check."""


class NotAttention(Decline):
    """Raised by a rule's extractor: the candidate is not attention at all (reported, never warned)."""


@dataclasses.dataclass
class Match:
    """What a rule found at one anchor node: the site, ready for the rewrite."""

    rule: str
    site: AttentionSite


Extractor = Callable[[fx.Node, int], "Match | None"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One attention spelling.

    name:    shown in explain() when the rule declines (``"<name>: <reason>"``).
    anchors: node targets the rule looks at (e.g. the softmax overloads), or a predicate on the node.
    extract: ``(anchor node, site index) -> Match | None``; raises ``Decline`` / ``NotAttention``.
    pattern: the candidate kind reported for a rejection ("softmax", "sdpa", "flex").
    """

    name: str
    anchors: frozenset[Any] | Callable[[fx.Node], bool]
    extract: Extractor
    pattern: str = "softmax"

    def matches(self, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if callable(self.anchors):
            return bool(self.anchors(node))
        return node.target in self.anchors


RULES: list[Rule] = []


def register_rule(rule: Rule, *, before: str | None = None) -> Rule:
    """Add ``rule`` to the registry (replacing a rule of the same name); ``before``: ask it before the
    rule of that name (rules anchored on the same node are asked in order, the first match wins)."""
    RULES[:] = [r for r in RULES if r.name != rule.name]
    names = [r.name for r in RULES]
    RULES.insert(names.index(before) if before in names else len(RULES), rule)
    return rule


def rules_for(node: fx.Node, rules: Iterable[Rule] | None = None) -> list[Rule]:
    return [r for r in (RULES if rules is None else rules) if r.matches(node)]
