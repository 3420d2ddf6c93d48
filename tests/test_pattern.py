"""The declarative pattern matcher: bindings, one-use rule, commutativity, reasons."""

from __future__ import annotations

from braze.ir import Graph, TensorType, T
from braze.passes import Op, Opt, Var, match


def _graph():
    g = Graph()
    x = g.add_input("x", TensorType((T, 4), "f32"))
    w = g.add_param("w", TensorType((4,), "f32"))
    s = g.op("silu", x)
    y = g.op("mul", w, s)          # operands in the "wrong" order for the pattern below
    return g, x, w, s, y


def test_binds_and_commutes():
    g, x, w, s, y = _graph()
    m = match(Op("mul", Op("silu", Var("a")), Var("b", kind="param")), y, g)
    assert m and m["a"] is x and m["b"] is w and len(m.nodes) == 2


def test_one_use_rule():
    g, x, w, s, y = _graph()
    g.set_output("extra", s)
    m = match(Op("mul", Op("silu", Var("a")), Var("b")), y, g)
    assert not m and "outside the pattern" in m.reason


def test_reason_is_the_deepest_failure():
    g, x, w, s, y = _graph()
    pat = Op("mul", Op("silu", Var("a", kind="param")), Var("b"))
    m = match(pat, y, g)
    # the swapped order fails shallowly (w is not a silu); the real reason is deeper
    assert not m and "pattern wants a param" in m.reason


def test_opt_and_attribute_capture():
    g, x, w, s, y = _graph()
    c = g.op("cast", y, dtype="f16")
    pat = Opt(Op("cast", Var("v"), dtype=Var("dt")), Var("v"))
    m = match(pat, c, g)
    assert m and m["v"] is y and m["dt"] == "f16"
    m = match(pat, y, g)
    assert m and m["v"] is y


def test_reason_is_the_failure_after_the_most_matched_at_equal_depth():
    """mul(silu(x), %y) against mul(silu(a), param b): the given order matches silu(x) and
    fails on %y (not a param); the swapped order fails at once (%y is no silu), at the same
    depth. The reason is the first's: --explain named the wrong mismatch."""
    g = Graph()
    x = g.add_input("x", TensorType((T, 4), "f32"))
    y = g.add_input("y", TensorType((T, 4), "f32"))
    out = g.op("mul", g.op("silu", x), y)
    m = match(Op("mul", Op("silu", Var("a")), Var("b", kind="param")), out, g)
    assert not m and "pattern wants a param" in m.reason and "%y" in m.reason, m.reason
