"""No import cycles inside the package, and passes reach the runtime only through ringcompile.graph_ops."""

import pytest
from import_graph import cycles, import_graph

# known cycles still open (none now); a strict xfail turns a fixed one into a failure, so the list
# cannot go stale
KNOWN: list[list[str]] = []


def test_no_new_import_cycles():
    found = cycles(import_graph())
    assert [c for c in found if c not in KNOWN] == []


@pytest.mark.parametrize("cycle", KNOWN, ids=lambda c: " <-> ".join(c))
@pytest.mark.xfail(strict=True, reason="known cycle, still open (issue 11 item 4)")
def test_known_cycle_is_gone(cycle):
    assert cycle not in cycles(import_graph())


def test_passes_reach_the_runtime_only_through_graph_ops():
    graph = import_graph()
    direct = sorted((a, b) for a, bs in graph.items() for b in bs
                    if a.startswith("ringcompile.passes") and b.startswith("ringcompile.runtime"))
    assert direct == []


def test_scan_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
