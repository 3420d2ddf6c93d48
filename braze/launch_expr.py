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
import re

from braze.ir.errors import BrazeError

SIZES = ("T", "S", "MB", "NB")
MAX_TEXT = 1024         # codegen writes expressions of a few dozen characters
MAX_DEPTH = 32
MAX_DIGITS = 20

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|\S))")
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
        fn = _Reader(text).read()
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

    evaluate({"T": 1, "S": 1, "MB": 1, "NB": 1})   # reject bad expressions at load, not at run
    return evaluate


def _show_sizes(sizes) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


class _Reader:
    """Recursive descent straight into closures: evaluating a plan's expression is a few
    Python calls, with no tree walked per batch size."""

    def __init__(self, text: str):
        if len(text) > MAX_TEXT:
            raise BrazeError(f"longer than {MAX_TEXT} characters")
        self.tokens, pos = [], 0
        while (m := _TOKEN.match(text, pos)) is not None:
            self.tokens.append(m.groups())
            pos = m.end()
        if text[pos:].strip():
            raise BrazeError(f"unexpected {text[pos:pos + 10]!r}")
        self.pos, self.depth = 0, 0

    def read(self):
        if not self.tokens:
            raise BrazeError("empty")
        fn = self.expr()
        if self.pos != len(self.tokens):
            raise BrazeError(f"unexpected {self._show(self.tokens[self.pos])}")
        return fn

    def _punct(self) -> str | None:
        return self.tokens[self.pos][2] if self.pos < len(self.tokens) else None

    def _take(self, punct: str | None = None) -> tuple:
        if self.pos >= len(self.tokens):
            raise BrazeError("the text ends in the middle of an expression")
        tok = self.tokens[self.pos]
        if punct is not None and tok[2] != punct:
            raise BrazeError(f"expected {punct!r}, got {self._show(tok)}")
        self.pos += 1
        return tok

    @staticmethod
    def _show(tok: tuple) -> str:
        return repr(next(t for t in tok if t is not None))

    def _chain(self, operand, ops: tuple):
        fn = operand()
        while self._punct() in ops:
            op = _BINARY[self._take()[2]]
            fn = _binary(op, fn, operand())
        return fn

    def expr(self):
        return self._chain(self.term, ("+", "-"))

    def term(self):
        return self._chain(self.unary, ("*", "//", "%"))

    def unary(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise BrazeError(f"nested more than {MAX_DEPTH} deep")
        try:
            return self._atom()
        finally:
            self.depth -= 1

    def _atom(self):
        integer, name, punct = self._take()
        if punct == "-":
            inner = self.unary()
            return lambda sizes: -inner(sizes)
        if integer is not None:
            if len(integer) > MAX_DIGITS:
                raise BrazeError(f"a literal of more than {MAX_DIGITS} digits")
            value = int(integer)
            return lambda sizes: value
        if punct == "(":
            fn = self.expr()
            self._take(")")
            return fn
        if name in SIZES:
            return lambda sizes: sizes[name]
        if name in _FUNCS:
            self._take("(")
            args = [self.expr()]
            while self._punct() == ",":
                self._take()
                args.append(self.expr())
            self._take(")")
            low, high = _ARITY[name]
            if len(args) < low or (high is not None and len(args) > high):
                raise BrazeError(f"{name} takes {'two arguments' if high else 'two or more arguments'}")
            call = _FUNCS[name]
            return lambda sizes: call([a(sizes) for a in args])
        if name is not None:
            raise BrazeError(f"unknown name {name!r} (sizes are {', '.join(SIZES)}; "
                             f"functions cdiv, max, min)")
        raise BrazeError(f"unexpected {punct!r}")


def _binary(op, lhs, rhs):
    return lambda sizes: op(lhs(sizes), rhs(sizes))
