"""The readers of artifact text (graph.bir dimensions and attributes, launch-plan expressions)
are small grammars: they agree with an independent reference on what they accept, and on
anything else they fail fast with a BrazeError (never a hang, a RecursionError, an
IndexError or a ZeroDivisionError escaping as "internal error").

The references: Python's own evaluation of the expressions we generate (launch
expressions mean what they mean in Python) and sympy's parser for dimensions (safe here:
the generated text has no `**`).
"""

from __future__ import annotations

import sys

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir import BrazeError, parse_graph, verify
from braze.ir.parser import parse_attrs
from braze.ir.types import SYMBOLS, parse_dim
from braze.launch import compile_expr

# a hang guard that counts work instead of timing it (a busy machine must not fail it):
# the Python and C calls a parse may make. A cold parse and verify of GOOD (sympy warming
# up) makes about 1.2 million; a warm one a few thousand; an exponential parse billions.
BASE_CALLS = 2_000_000
CALLS_PER_CHAR = 200


def _calls(fn, *args) -> int:
    """The function calls fn(*args) makes (returning or raising BrazeError)."""
    n = 0

    def count(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1
    sys.setprofile(count)
    try:
        fn(*args)
    except BrazeError:
        pass
    finally:
        sys.setprofile(None)
    return n


def _bounded(text: str, fn, *args) -> None:
    calls = _calls(fn, *args)
    assert calls < BASE_CALLS + CALLS_PER_CHAR * len(text), \
        f"{calls} calls for {len(text)} characters: superlinear work"

SIZES = st.fixed_dictionaries({k: st.integers(1, 5000) for k in ("T", "S", "MB", "NB")})




# -- launch-plan expressions -------------------------------------------------------------

LAUNCH_EXPR = st.recursive(
    st.integers(0, 10**6).map(str) | st.sampled_from(["T", "S", "MB", "NB"]),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "//", "%"]), inner)
          .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda a: f"-{a}"),
        st.tuples(inner, inner).map(lambda t: f"cdiv({t[0]}, {t[1]})"),
        st.lists(inner, min_size=2, max_size=3).map(lambda a: f"max({', '.join(a)})"),
        st.lists(inner, min_size=2, max_size=3).map(lambda a: f"min({', '.join(a)})"),
    ),
    max_leaves=12,
)


def _python(text: str, sizes: dict):
    return eval(text, {"__builtins__": {}, "cdiv": lambda a, b: -(-a // b), "max": max,
                       "min": min}, dict(sizes))


@settings(max_examples=300, deadline=None)
@given(LAUNCH_EXPR, SIZES)
def test_launch_expressions_mean_what_python_means(text, sizes):
    try:
        want = _python(text, sizes)
    except ZeroDivisionError:
        want = ZeroDivisionError
    try:
        fn = compile_expr(text)
    except BrazeError as e:            # only when it divides by zero at the all-ones probe
        assert "divides by zero" in str(e)
        return
    if want is ZeroDivisionError:
        with pytest.raises(BrazeError, match="divides by zero"):
            fn(sizes)
    else:
        assert fn(sizes) == want


EXPR_ALPHABET = st.text(alphabet="TSMBN0123456789+-*/%(),cdivmaxin _x.[]'\"\\", max_size=60)


@settings(max_examples=400, deadline=None)
@given(st.one_of(EXPR_ALPHABET, st.text(max_size=40)))
def test_any_launch_expression_text_reads_or_is_a_braze_error(text):
    _bounded(text, lambda: compile_expr(text)({"T": 3, "S": 2, "MB": 1, "NB": 4}))


@pytest.mark.parametrize("text", [
    "(" * 5000 + "T" + ")" * 5000, "T+" * 20000 + "T", "-" * 5000 + "T", "9**9**8", "T**2",
    "cdiv(T)", "cdiv(T, 0)", "max()", "T // (S - 1)", "__import__('os')", "9" * 5000,
    "T.__class__", "[T]", "T if S else MB", "lambda: 0", "\\", "",
])
def test_hostile_launch_expressions(text):
    with pytest.raises(BrazeError, match="launch expression"):
        compile_expr(text)({"T": 4, "S": 1, "MB": 1, "NB": 1})
    _bounded(text, lambda: compile_expr(text)({"T": 4, "S": 1, "MB": 1, "NB": 1}))


@pytest.mark.parametrize("value", [None, 1.5, [1], {"a": 1}, True])
def test_launch_expression_of_the_wrong_json_type(value):
    with pytest.raises(BrazeError, match="launch expression"):
        compile_expr(value)


# -- dimensions ----------------------------------------------------------------------------

DIM = st.recursive(
    st.integers(0, 10**6).map(str) | st.sampled_from(list(SYMBOLS)),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner)
          .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda a: f"-{a}"),
        st.tuples(inner, st.sampled_from(["2", "16", "3"]))
          .map(lambda t: f"ceiling({t[0]}/{t[1]})"),
        st.tuples(inner, st.sampled_from(["2", "16", "3"]))
          .map(lambda t: f"floor({t[0]}/{t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"Max({t[0]}, {t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"Min({t[0]}, {t[1]})"),
    ),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(DIM)
def test_dimensions_read_as_sympy_reads_them(text):
    want = sympy.sympify(text, locals={**SYMBOLS, "ceiling": sympy.ceiling,
                                       "floor": sympy.floor, "Max": sympy.Max,
                                       "Min": sympy.Min}, rational=True)
    got = parse_dim(text)
    assert sympy.simplify(sympy.sympify(got) - want) == 0


DIM_ALPHABET = st.text(alphabet="TSNBM0123456789+-*/(), ceilingfloorMaxMin_x.", max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(DIM_ALPHABET, st.text(max_size=30)))
def test_any_dimension_text_reads_or_is_a_braze_error(text):
    _bounded(text, parse_dim, text)


# -- whole graphs -------------------------------------------------------------------------

GOOD = """\
graph @g(%x: f32[T, 4], %n: i64[S + 1]) {
  param @w: f32[3, 4]
  %0: f32[T, 4] = mul(%x) {scalar=0.5}
  %1: f32[T, 3] = linear(%0, @w)
  meta {segments=[["graph", 0, 1]], memory={"arena_bytes": 64, "buffers": {"0": [0, 64]}}}
  return y=%1
}
"""


@pytest.mark.parametrize("line, edit", [
    (1, lambda t: t.replace("f32[T, 4]", "i64[T*(9**9**8)]", 1)),
    (1, lambda t: t.replace("f32[T, 4]", "f32[" + "+".join(["T"] * 20000) + ", 4]", 1)),
    (1, lambda t: t.replace("f32[T, 4]", "f32[" + "(" * 5000 + "T" + ")" * 5000 + ", 4]", 1)),
    (3, lambda t: t.replace("scalar=0.5", "scalar=" + "9" * 5000)),
    (3, lambda t: t.replace("scalar=0.5", 'scalar="\\')),
    (3, lambda t: t.replace("scalar=0.5", 'scalar="\\x"')),
    (5, lambda t: t.replace("segments=[", "segments=" + "[" * 5000 + "[")),
    (5, lambda t: t.replace("arena_bytes\": 64", "arena_bytes\": " + "{" * 5000)),
])
def test_hostile_graph_text_fails_fast_naming_the_line(line, edit):
    text = edit(GOOD)
    with pytest.raises(BrazeError, match=f"graph.bir line {line}:"):
        parse_graph(text, source="graph.bir")
    _bounded(text, parse_graph, text, "graph.bir")


def _mutations():
    """GOOD with one random edit: a span replaced by random text, repeated or nested."""
    chunk = st.one_of(st.text(max_size=12),
                      st.sampled_from(["[", "{", "(", "**", "\\", '"', "9" * 500, "T*", ",",
                                       "=", ":", "%", "@", "}", "]", ")", "\n", "meta {",
                                       "-inf", "nan", "1e999"]))
    return st.tuples(st.integers(0, len(GOOD)), st.integers(0, 8), chunk, st.integers(1, 200))


@settings(max_examples=400, deadline=None)
@given(_mutations())
def test_mutated_graph_text_parses_or_is_a_braze_error(mutation):
    at, cut, chunk, times = mutation
    text = GOOD[:at] + chunk * times + GOOD[at + cut:]

    def parse_and_verify():
        verify(parse_graph(text))
    _bounded(text, parse_and_verify)


def test_attribute_nesting_is_bounded_but_what_braze_writes_reads():
    assert parse_attrs("v=" + "[" * 60 + "]" * 60)["v"] is not None
    with pytest.raises(BrazeError, match="nested more than"):
        parse_attrs("v=" + "[" * 100 + "]" * 100)
