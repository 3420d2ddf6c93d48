"""The grammar of a dimension in IR text, read without sympy's parser.

    dim    := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := "-" factor | INT | SYMBOL | FUNC "(" dim ("," dim)* ")" | "(" dim ")"

SYMBOL is one of the declared sizes (T, S, NB, MB), FUNC one of ceiling, floor, Max, Min.
There is no `**`: `9**9**8` as sympy would read it computes a number with hundreds of
millions of digits, so a hostile graph.bir could hang whoever parses it. Text length,
nesting depth and literal digits are bounded, so every dimension is read in time linear
in its (short) text and sympy only combines a few small terms.
"""

from __future__ import annotations

import operator

import sympy

from .errors import BrazeError
from .token_reader import TokenReader

MAX_TEXT = 256          # the longest dims we print are ~20 characters (`ceiling(T/16) + 1`)
MAX_DEPTH = 16          # nested parentheses and calls
MAX_DIGITS = 20         # a literal below 10**20 covers every size up to 2**63

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_FUNCS = {"ceiling": (sympy.ceiling, 1), "floor": (sympy.floor, 1), "Max": (sympy.Max, 2),
          "Min": (sympy.Min, 2)}


def read_dim(text: str, symbols: dict) -> sympy.Expr:
    """`text` as a sympy expression over `symbols` (name -> sympy.Symbol); BrazeError if it
    is not a dimension of the grammar above."""
    r = TokenReader(text, MAX_TEXT, MAX_DEPTH, MAX_DIGITS)

    def combine(op, lhs, rhs):
        return _OPS[op](lhs, rhs)

    def dim():
        return r.chain(term, ("+", "-"), combine)

    def term():
        return r.chain(factor, ("*", "/"), combine)

    def factor():
        with r.nested():
            integer, name, punct = r.take()
            if punct == "-":
                return -factor()
            if integer is not None:
                return sympy.Integer(r.integer(integer))
            if punct == "(":
                value = dim()
                r.take(")")
                return value
            if name in symbols:
                return symbols[name]
            if name in _FUNCS:
                fn, arity = _FUNCS[name]
                args = r.arguments(dim)
                if len(args) != arity and not (arity == 2 and len(args) > 2):
                    raise BrazeError(f"{name} takes "
                                     f"{'one argument' if arity == 1 else 'two or more arguments'}")
                return fn(*args)
            if name is not None:
                raise BrazeError(f"unknown symbol {name!r}")
            raise BrazeError(f"unexpected {punct!r}")

    value = dim()
    r.end()
    return value
