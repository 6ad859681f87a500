"""Attention rules as data: ``base`` holds the registry, each other module one family of spellings.

Importing this package registers the built-in rules, in the order they are asked: flex, SDPA, then the
softmax spellings (the row-max shift check, sinks, Bloom's head split, a read lse, the plain chain);
``decode`` (SDPA over a sharded KV cache) is asked before SDPA. Other modules add theirs with
``register_rule``; FlexAttention's rule (``flex``) anchors on the marker ``passes.flex`` leaves.
"""

from __future__ import annotations

from . import (  # noqa: F401 - registration order (flex is asked first on its marker)
    decode,  # noqa: F401,I001 - asked before sdpa on attention over a sharded KV cache
    flex,
    sdpa,
    softmax,
)
from .base import RULES, Decline, Match, NotAttention, Rule, register_rule, rules_for

__all__ = ["RULES", "Decline", "Match", "NotAttention", "Rule", "register_rule", "rules_for"]
