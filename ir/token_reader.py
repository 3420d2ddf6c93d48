"""The cursor of braze's one-line grammars (dimensions in ir/dim_grammar.py, launch-plan
expressions in braze/launch_expr.py): integers, names and punctuation, read left to right
with the limits that keep hostile text cheap (text length, nesting depth, literal digits).
Every failure is a BrazeError saying what was unexpected where."""

from __future__ import annotations

import contextlib
import re

from .errors import BrazeError


class TokenReader:
    """Tokens of `text` as (integer, name, punct) triples, one of them set; `punct` is the
    regex of one punctuation token."""

    def __init__(self, text: str, max_text: int, max_depth: int, max_digits: int,
                 punct: str = r"\S"):
        if len(text) > max_text:
            raise BrazeError(f"longer than {max_text} characters")
        token = re.compile(rf"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|({punct}))")
        self.tokens, pos = [], 0
        while (m := token.match(text, pos)) is not None:
            self.tokens.append(m.groups())
            pos = m.end()
        if text[pos:].strip():
            raise BrazeError(f"unexpected {text[pos:pos + 10]!r}")
        if not self.tokens:
            raise BrazeError("empty")
        self.pos, self.depth = 0, 0
        self.max_depth, self.max_digits = max_depth, max_digits

    def punct(self) -> str | None:
        """The next token if it is punctuation, else None (also at the end)."""
        return self.tokens[self.pos][2] if self.pos < len(self.tokens) else None

    def take(self, punct: str | None = None) -> tuple:
        if self.pos >= len(self.tokens):
            raise BrazeError("the text ends in the middle of an expression")
        tok = self.tokens[self.pos]
        if punct is not None and tok[2] != punct:
            raise BrazeError(f"expected {punct!r}, got {self.show(tok)}")
        self.pos += 1
        return tok

    def integer(self, digits: str) -> int:
        if len(digits) > self.max_digits:
            raise BrazeError(f"a literal of more than {self.max_digits} digits")
        return int(digits)

    def arguments(self, operand) -> list:
        """`( operand ("," operand)* )`, the opening parenthesis still to read."""
        self.take("(")
        args = [operand()]
        while self.punct() == ",":
            self.take()
            args.append(operand())
        self.take(")")
        return args

    def chain(self, operand, ops: tuple, combine):
        """operand (op operand)*, folded left with combine(op, lhs, rhs)."""
        value = operand()
        while self.punct() in ops:
            op = self.take()[2]
            value = combine(op, value, operand())
        return value

    @contextlib.contextmanager
    def nested(self):
        self.depth += 1
        if self.depth > self.max_depth:
            raise BrazeError(f"nested more than {self.max_depth} deep")
        try:
            yield
        finally:
            self.depth -= 1

    def end(self) -> None:
        if self.pos != len(self.tokens):
            raise BrazeError(f"unexpected {self.show(self.tokens[self.pos])}")

    @staticmethod
    def show(tok: tuple) -> str:
        return repr(next(t for t in tok if t is not None))
