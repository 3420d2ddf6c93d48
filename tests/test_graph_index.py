"""The graph's use and position indexes agree with a scan of the schedule, whatever changes it.

Random sequences of the edits passes make (append, insert before a node, rewire
operands, replace all uses, erase a node nobody reads, remove dead code) are
applied to a small graph; after each one, `users(v)` must equal the readers a
scan of `g.nodes` finds (in schedule order, once per operand slot) and
`index(n)` the node's place in the list.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir import BrazeError, Graph, T, TensorType


def scanned_users(g: Graph, v) -> list:
    return [n for n in g.nodes for o in n.operands if o is v]


def check(g: Graph) -> None:
    for i, n in enumerate(g.nodes):
        assert g.index(n) == i
        assert g.contains(n)
    values = list(g.inputs) + [r for n in g.nodes for r in n.results]
    for v in values:
        assert g.users(v) == scanned_users(g, v), v
        assert g.num_users(v) == len(scanned_users(g, v))


def _graph() -> Graph:
    g = Graph("idx")
    x = g.add_input("x", TensorType((T, 4), "f32"))
    g.op("neg", x)
    return g


EDITS = st.lists(st.tuples(st.sampled_from(["append", "insert", "rewire", "replace", "erase",
                                             "dead", "burst"]),
                           st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)),
                 min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(EDITS)
def test_indexes_match_a_scan_after_any_edits(edits):
    g = _graph()
    for kind, i, j in edits:
        values = list(g.inputs) + [r for n in g.nodes for r in n.results]
        a, b = values[i % len(values)], values[j % len(values)]
        nodes = list(g.nodes)
        if kind == "append":
            g.op("add", a, b)
        elif kind == "insert" and nodes:
            at = nodes[i % len(nodes)]
            with g.inserting_before(at):
                g.op("mul", a, a)           # reading a value defined later is fine here
        elif kind == "burst" and nodes:     # many inserts at one spot: keys run out, renumber
            at = nodes[i % len(nodes)]
            with g.inserting_before(at):
                for _ in range(40):
                    g.op("neg", a)
        elif kind == "rewire" and nodes:
            n = nodes[i % len(nodes)]
            n.operands = [b] * len(n.operands)
        elif kind == "replace" and a is not b:
            g.replace_all_uses(a, b)
        elif kind == "erase" and nodes:
            n = nodes[i % len(nodes)]
            if not any(g.users(r) for r in n.results):
                g.erase_node(n)
                assert not g.contains(n)
        elif kind == "dead":
            if nodes:
                g.set_output("out", nodes[-1].results[0])
            g.remove_dead()
        check(g)


def test_the_schedule_changes_only_through_the_graph():
    g = _graph()
    n = g.nodes[0]
    for edit in (lambda: g.nodes.append(n), lambda: g.nodes.remove(n),
                 lambda: g.nodes.insert(0, n), lambda: g.nodes.__setitem__(0, n),
                 lambda: g.nodes.__delitem__(0), lambda: g.nodes.sort(key=id)):
        with pytest.raises(TypeError, match="only through the graph"):
            edit()
    with pytest.raises(TypeError):
        n.operands[0] = g.inputs[0]          # a tuple: replaced whole, through the graph
    g.nodes = list(g.nodes)                  # wholesale replacement reindexes
    check(g)


def test_index_of_a_node_not_in_the_graph_is_an_error():
    g = _graph()
    n = g.nodes[0]
    g.erase_node(n)
    with pytest.raises(BrazeError, match="is not in graph"):
        g.index(n)
    with pytest.raises(BrazeError, match="is not in graph"):
        with g.inserting_before(n):
            pass
