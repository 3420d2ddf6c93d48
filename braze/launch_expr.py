"""The integer expressions of launch plans (grids, sizes, workspace shapes), read by a grammar.

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "//" | "%") unary)*
    unary  := "-" unary | INT | SIZE | FUNC "(" expr ("," expr)* ")" | "(" expr ")"

SIZE is a step size (T, S, MB, NB), FUNC one of cdiv(a, b), max(...), min(...); the
operators mean what they mean in Python. A plan is data from an artifact, so the reader
bounds text length, nesting and literal digits, and every failure, reading or evaluating
(a division by zero at some batch size), is a BrazeError naming the expression.
"""

from __future__ import annotations

import operator

from braze.ir.errors import BrazeError
from braze.ir.token_reader import TokenReader

SIZES = ("T", "S", "MB", "NB", "R")
MAX_TEXT = 1024         # codegen writes expressions of a few dozen characters
MAX_DEPTH = 32
MAX_DIGITS = 20

_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": operator.floordiv,
           "%": operator.mod}
_FUNCS = {"cdiv": lambda a: -(-a[0] // a[1]), "max": max, "min": min}
_ARITY = {"cdiv": (2, 2), "max": (2, None), "min": (2, None)}


def compile_expr(text):
    """An integer expression over T, S, MB, NB -> a function of those sizes (a dict)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return lambda sizes: text
    if not isinstance(text, str):
        raise BrazeError(f"launch expression {text!r} is not a string or an integer")
    try:
        fn = _read(text)
    except BrazeError as e:
        raise BrazeError(f"launch expression {text[:80]!r}: {e}") from None

    def evaluate(sizes):
        try:
            return fn(sizes)
        except ZeroDivisionError:
            raise BrazeError(f"launch expression {text[:80]!r} divides by zero at "
                             f"{_show_sizes(sizes)}") from None
        except KeyError as e:
            raise BrazeError(f"launch expression {text[:80]!r} needs size {e} and is "
                             f"evaluated at {_show_sizes(sizes)}") from None

    evaluate({"T": 1, "S": 1, "MB": 1, "NB": 1, "R": 1})   # reject bad expressions at load, not at run
    return evaluate


def _show_sizes(sizes) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def _read(text: str):
    """Recursive descent straight into closures: evaluating a plan's expression is a few
    Python calls, with no tree walked per batch size."""
    r = TokenReader(text, MAX_TEXT, MAX_DEPTH, MAX_DIGITS, punct=r"//|\S")

    def combine(op, lhs, rhs):
        fn = _BINARY[op]
        return lambda sizes: fn(lhs(sizes), rhs(sizes))

    def expr():
        return r.chain(term, ("+", "-"), combine)

    def term():
        return r.chain(unary, ("*", "//", "%"), combine)

    def unary():
        with r.nested():
            integer, name, punct = r.take()
            if punct == "-":
                inner = unary()
                return lambda sizes: -inner(sizes)
            if integer is not None:
                value = r.integer(integer)
                return lambda sizes: value
            if punct == "(":
                fn = expr()
                r.take(")")
                return fn
            if name in SIZES:
                return lambda sizes: sizes[name]
            if name in _FUNCS:
                args = r.arguments(expr)
                low, high = _ARITY[name]
                if len(args) < low or (high is not None and len(args) > high):
                    raise BrazeError(f"{name} takes "
                                     f"{'two arguments' if high else 'two or more arguments'}")
                call = _FUNCS[name]
                return lambda sizes: call([a(sizes) for a in args])
            if name is not None:
                raise BrazeError(f"unknown name {name!r} (sizes are {', '.join(SIZES)}; "
                                 f"functions cdiv, max, min)")
            raise BrazeError(f"unexpected {punct!r}")

    fn = expr()
    r.end()
    return fn
