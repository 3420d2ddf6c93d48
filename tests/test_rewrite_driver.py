"""The rewrite driver (passes/rewrite.py): what it visits, counts, reports and erases."""

from __future__ import annotations

import textwrap

from braze.ir import parse_graph, print_graph, verify
from braze.passes import PassContext, Rewriter, Rule, rewrite

CHAIN = textwrap.dedent("""\
    graph @g(%x: f32[T, 4]) {
      %0: f32[T, 4] = neg(%x)
      %1: f32[T, 4] = exp(%0)
      %2: f32[T, 4] = neg(%1)
      %3: f32[T, 4] = exp(%2)
      return y=%3
    }
""")


def test_visits_each_root_in_order_or_reverse():
    for reverse, want in ((False, ["0", "2"]), (True, ["2", "0"])):
        g, seen = parse_graph(CHAIN), []
        n = rewrite(g, PassContext(), [Rule("neg", lambda node, rw: seen.append(
            node.results[0].name))], reverse=reverse)
        assert seen == want and n == 0
        assert print_graph(g) == print_graph(parse_graph(CHAIN))


def test_counts_rewrites_and_reports_only_near_misses():
    g, ctx = parse_graph(CHAIN), PassContext()
    ctx.current = "test"

    def fold(node, rw):
        if node.operands[0].kind == "input":
            return "reads a graph input"            # a near miss: reported
        if node.operands[0].producer.op == "exp":
            with rw.g.inserting_before(node):
                new = rw.g.op("sin", node.operands[0])
            rw.replace(node.results[0], new, dead=[node])
            return 1
        return None                                  # not this pattern: silent

    assert rewrite(g, ctx, [Rule("neg", fold, explain="no: ")]) == 1
    assert [(r.pass_name, r.node, r.reason) for r in ctx.refusals] == \
        [("test", "%0 = neg(...)", "no: reads a graph input")]
    verify(g)
    assert [n.op for n in g.nodes] == ["neg", "exp", "sin", "exp"]


def test_erased_nodes_are_skipped_and_new_nodes_not_visited():
    g, seen = parse_graph(CHAIN), []

    def erase_ahead(node, rw):
        seen.append(node.results[0].name)
        if node.results[0].name == "0":             # the second neg goes: %1 and %3 now read %0
            second = rw.g.nodes[2]
            rw.replace(second.results[0], node.results[0], dead=[second])
            with rw.g.inserting_before(rw.g.nodes[-1]):
                rw.g.op("neg", node.results[0])     # a new root: not part of this walk
        return 0

    rewrite(g, PassContext(), [Rule("neg", erase_ahead)])
    assert seen == ["0"]
    verify(g)


def test_replace_erases_whole_dead_chains_and_keeps_read_nodes():
    g = parse_graph(textwrap.dedent("""\
        graph @g(%x: f32[T, 4]) {
          %0: f32[T, 4] = neg(%x)
          %1: f32[T, 4] = exp(%0)
          %2: f32[T, 4] = sin(%1)
          %3: f32[T, 4] = cos(%0)
          return y=%2, z=%3
        }
    """))
    rw = Rewriter(g, PassContext())
    nodes = list(g.nodes)
    with g.inserting_before(nodes[2]):
        new = g.op("tanh", g.inputs[0])
    rw.replace(nodes[2].results[0], new, dead=nodes[:3])    # neg stays: cos still reads it
    verify(g)
    assert [n.op for n in g.nodes] == ["neg", "tanh", "cos"]


def test_claimed_nodes_are_not_roots_again():
    g, seen = parse_graph(CHAIN), []
    rw = Rewriter(g, PassContext())

    def claim_all(node, rw):
        rw.claim(rw.g.nodes)
        seen.append(node.op)
        return "refused, but the nodes it looked at are spoken for"

    rw.run([Rule(("neg", "exp"), claim_all)])
    rw.run([Rule(("neg", "exp"), claim_all)])
    assert seen == ["neg"] and len(rw.ctx.refusals) == 1


def test_rebuild_takes_over_names_and_readers_in_place():
    g = parse_graph(CHAIN)
    rw = Rewriter(g, PassContext())
    n1, n2 = g.nodes[1], g.nodes[2]
    rw.rebuild(n1, [n1, n2], "tanh", [g.nodes[0].results[0]], {}, replacing=[n2.results[0]])
    verify(g)
    assert print_graph(g).splitlines()[2].strip() == "%2: f32[T, 4] = tanh(%0)"
    assert [n.op for n in g.nodes] == ["neg", "tanh", "exp"]
