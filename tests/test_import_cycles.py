"""No import cycles inside the package, and passes reach the runtime only through ringcompile.graph_ops."""

from import_graph import cycles, import_graph


def test_no_import_cycles():
    # the last two (kernels.select/triton, runtime.dispatch/simulated) were broken in session 4
    assert cycles(import_graph()) == []


def test_passes_reach_the_runtime_only_through_graph_ops():
    graph = import_graph()
    direct = sorted((a, b) for a, bs in graph.items() for b in bs
                    if a.startswith("ringcompile.passes") and b.startswith("ringcompile.runtime"))
    assert direct == []


def test_scan_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
