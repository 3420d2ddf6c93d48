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

import re

import sympy

from .errors import BrazeError

MAX_TEXT = 256          # the longest dims we print are ~20 characters (`ceiling(T/16) + 1`)
MAX_DEPTH = 16          # nested parentheses and calls
MAX_DIGITS = 20         # a literal below 10**20 covers every size up to 2**63

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\S))")
_FUNCS = {"ceiling": (sympy.ceiling, 1), "floor": (sympy.floor, 1), "Max": (sympy.Max, 2),
          "Min": (sympy.Min, 2)}


class _Reader:
    def __init__(self, text: str, symbols: dict):
        self.tokens = _tokenize(text)
        self.pos, self.depth, self.symbols = 0, 0, symbols

    def peek(self) -> tuple | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, punct: str | None = None) -> tuple:
        tok = self.peek()
        if tok is None:
            raise BrazeError("the text ends in the middle of an expression")
        if punct is not None and tok[2] != punct:
            raise BrazeError(f"expected {punct!r}, got {_show(tok)}")
        self.pos += 1
        return tok

    def dim(self):
        value = self.term()
        while self.peek() is not None and self.peek()[2] in ("+", "-"):
            op = self.take()[2]
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self):
        value = self.factor()
        while self.peek() is not None and self.peek()[2] in ("*", "/"):
            op = self.take()[2]
            rhs = self.factor()
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise BrazeError(f"nested more than {MAX_DEPTH} deep")
        try:
            integer, name, punct = self.take()
            if punct == "-":
                return -self.factor()
            if integer is not None:
                if len(integer) > MAX_DIGITS:
                    raise BrazeError(f"a literal of more than {MAX_DIGITS} digits")
                return sympy.Integer(int(integer))
            if punct == "(":
                value = self.dim()
                self.take(")")
                return value
            if name in self.symbols:
                return self.symbols[name]
            if name in _FUNCS:
                fn, arity = _FUNCS[name]
                self.take("(")
                args = [self.dim()]
                while self.peek() is not None and self.peek()[2] == ",":
                    self.take()
                    args.append(self.dim())
                self.take(")")
                if len(args) != arity and not (arity == 2 and len(args) > 2):
                    raise BrazeError(f"{name} takes {'one argument' if arity == 1 else 'two or more arguments'}")
                return fn(*args)
            if name is not None:
                raise BrazeError(f"unknown symbol {name!r}")
            raise BrazeError(f"unexpected {_show((integer, name, punct))}")
        finally:
            self.depth -= 1


def _tokenize(text: str) -> list[tuple]:
    tokens, pos = [], 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None:
            return tokens
        tokens.append(m.groups())
        pos = m.end()


def _show(tok: tuple) -> str:
    return repr(next(t for t in tok if t is not None))


def read_dim(text: str, symbols: dict) -> sympy.Expr:
    """`text` as a sympy expression over `symbols` (name -> sympy.Symbol); BrazeError if it
    is not a dimension of the grammar above."""
    if len(text) > MAX_TEXT:
        raise BrazeError(f"longer than {MAX_TEXT} characters")
    reader = _Reader(text, symbols)
    if not reader.tokens:
        raise BrazeError("empty")
    value = reader.dim()
    if reader.peek() is not None:
        raise BrazeError(f"unexpected {_show(reader.peek())}")
    return value
