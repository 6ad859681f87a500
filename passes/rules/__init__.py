"""Attention rules as data: ``base`` holds the registry, each other module one family of spellings.

Importing this package registers the built-in rules, in the order they are asked: SDPA, then the
softmax spellings (sinks, Bloom's head split, the plain chain). Other modules add theirs with
``register_rule`` (e.g. ``passes.flex`` for FlexAttention).
"""

from __future__ import annotations

from . import sdpa, softmax  # noqa: F401 - registration order
from .base import RULES, Decline, Match, NotAttention, Rule, register_rule, rules_for

__all__ = ["RULES", "Decline", "Match", "NotAttention", "Rule", "register_rule", "rules_for"]
