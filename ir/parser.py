"""Parse the textual IR (see printer.py) back into a Graph.

Errors name the line and what was expected there. The readers are small grammars that
never evaluate text: dimensions (dim_grammar.py), attribute values (JSON-like literals,
nested at most MAX_NESTING deep, integers of at most MAX_INT_DIGITS digits). A graph.bir
is data an artifact ships, so a hostile one must fail fast with a BrazeError, not hang
or overflow the stack.
"""

from __future__ import annotations

import json
import re

from .errors import BrazeError
from .graph import Graph, Value
from .types import TensorType, dtype_name, parse_dim

_NAME = r"[A-Za-z0-9_.\-]+"
_HEADER = re.compile(rf"^graph @({_NAME})\((.*)\) \{{$")
_PARAM = re.compile(rf"^param @({_NAME}): ([^=]+?)(?: = (.+))?$")
_CALL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\(([^()]*)\)(?: \{(.*)\})?$")
MAX_NESTING = 64          # attribute lists/dicts; the deepest braze writes is 3
MAX_INT_DIGITS = 400      # Python refuses int() of more than 4300 digits with a ValueError


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets and strings; empty text gives []."""
    parts, depth, cur, i, in_str = [], 0, [], 0, False
    while i < len(text):
        c = text[i]
        if in_str:
            cur.append(c)
            if c == "\\" and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
            cur.append(c)
        elif c in "([{":
            depth += 1
            cur.append(c)
        elif c in ")]}":
            depth -= 1
            cur.append(c)
        elif depth == 0 and text.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        else:
            cur.append(c)
        i += 1
    if in_str or depth:
        raise BrazeError(f"unbalanced brackets or quotes in {text!r}")
    tail = "".join(cur)
    if parts or tail.strip():
        parts.append(tail)
    return [p.strip() for p in parts]


def parse_type(text: str) -> TensorType:
    m = re.fullmatch(r"([a-z0-9]+)\[(.*)\]", text.strip())
    if not m:
        raise BrazeError(f"expected a type like f32[T, 64], got {text!r}")
    return TensorType(tuple(parse_dim(d) for d in split_top(m.group(2))), dtype_name(m.group(1)))


class _AttrReader:
    _TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(-?inf|nan)\b|'
                        r'(-?\d+\.\d*(?:[eE][-+]?\d+)?|-?\d+[eE][-+]?\d+)|(-?\d+)|'
                        r'(true|false|none)\b|([\[\],=:{}])|([A-Za-z_][A-Za-z0-9_]*))')

    def __init__(self, text: str):
        self.text, self.pos, self.depth = text, 0, 0

    def _next(self):
        m = self._TOKEN.match(self.text, self.pos)
        if not m or m.end() == self.pos:
            raise BrazeError(f"cannot read attributes at {self.text[self.pos:]!r}")
        self.pos = m.end()
        return m

    def _peek(self) -> str:
        save = self.pos
        try:
            return self._next().group(0).strip()
        finally:
            self.pos = save

    def value(self):
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise BrazeError(f"attribute values nested more than {MAX_NESTING} deep")
        try:
            return self._value()
        finally:
            self.depth -= 1

    def _value(self):
        m = self._next()
        s, special, flt, integer, kw, punct, _ident = m.groups()
        if s is not None:
            try:
                return json.loads(s)
            except ValueError as e:     # a bad escape such as "\x"
                raise BrazeError(f"bad string {s[:40]!r} in attributes: {e}") from None
        if special is not None:
            return float(special)
        if flt is not None:
            return float(flt)
        if integer is not None:
            if len(integer) > MAX_INT_DIGITS + 1:
                raise BrazeError(f"integer of more than {MAX_INT_DIGITS} digits in attributes")
            return int(integer)
        if kw is not None:
            return {"true": True, "false": False, "none": None}[kw]
        if punct == "{":
            items = {}
            if self._peek() == "}":
                self._next()
                return items
            while True:
                key = self.value()
                if not isinstance(key, str) or self._next().group(0).strip() != ":":
                    raise BrazeError("expected '\"key\": value' in a dict attribute")
                items[key] = self.value()
                sep = self._next().group(0).strip()
                if sep == "}":
                    return items
                if sep != ",":
                    raise BrazeError(f"expected ',' or '}}' in dict, got {sep!r}")
        if punct == "[":
            items = []
            if self._peek() == "]":
                self._next()
                return items
            while True:
                items.append(self.value())
                sep = self._next().group(0).strip()
                if sep == "]":
                    return items
                if sep != ",":
                    raise BrazeError(f"expected ',' or ']' in list, got {sep!r}")
        raise BrazeError(f"unexpected {m.group(0).strip()!r} in attributes")

    def attrs(self) -> dict:
        out = {}
        while self.pos < len(self.text.rstrip()):
            key = self._next().group(7)
            if key is None or self._next().group(0).strip() != "=":
                raise BrazeError(f"expected name=value in attributes {self.text!r}")
            out[key] = self.value()
            if self.pos < len(self.text.rstrip()) and self._next().group(0).strip() != ",":
                raise BrazeError(f"expected ',' between attributes in {self.text!r}")
        return out


def parse_attrs(text: str) -> dict:
    return _AttrReader(text).attrs()


def parse_graph(text: str, source: str = "IR") -> Graph:
    """`source` names the text in errors: "graph.bir line 12: ..." (default "IR line 12")."""
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise BrazeError("empty IR text: expected 'graph @name(...) {'")
    if lines[0][1].startswith("graph ") and not lines[0][1].endswith("{"):
        lines = _join_header(lines, source)
    g: Graph | None = None
    env: dict[str, Value] = {}
    done = False
    for lineno, line in lines:
        try:
            if g is None:
                m = _HEADER.match(line)
                if not m:
                    raise BrazeError("expected 'graph @name(%input: type, ...) {'")
                g = Graph(m.group(1))
                for arg in split_top(m.group(2)):
                    name, _, ty = arg.partition(":")
                    if not name.startswith("%"):
                        raise BrazeError(f"graph input {arg!r} must look like %name: type")
                    env["%" + name[1:]] = g.add_input(name[1:], parse_type(ty))
            elif done:
                raise BrazeError("text after the closing '}'")
            elif line == "}":
                done = True
            elif line.startswith("param "):
                m = _PARAM.match(line)
                if not m:
                    raise BrazeError("expected 'param @name: type'")
                if m.group(3):
                    op, operands, attrs = _parse_call(env, m.group(3))
                    v = g.add_derived_param(m.group(1), op, operands, attrs,
                                            type=parse_type(m.group(2)))
                else:
                    v = g.add_param(m.group(1), parse_type(m.group(2)))
                env["@" + m.group(1)] = v
            elif line == "meta" or line.startswith("meta {"):
                if not line.endswith("}"):
                    raise BrazeError("expected 'meta {key=value, ...}'")
                g.meta.update(parse_attrs(line[len("meta {"):-1]))
            elif line == "return" or line.startswith("return "):
                for item in split_top(line[len("return"):]):
                    key, _, ref = item.partition("=")
                    g.set_output(key.strip(), _lookup(env, ref.strip()))
            else:
                _parse_node(g, env, line)
        except BrazeError as e:
            raise BrazeError(f"{source} line {lineno}: {e}  [{line[:120]}]") from None
    if g is None or not done:
        raise BrazeError(f"{source}: the text ends before the graph's closing '}}'")
    return g


def _join_header(lines: list, source: str) -> list:
    """A header wrapped over several lines (as hand-written tests and docs wrap long
    input lists), read as the one line the printer writes."""
    for i, (_, line) in enumerate(lines):
        if line.endswith("{"):
            joined = " ".join(ln for _, ln in lines[:i + 1]).replace("( ", "(")
            return [(lines[0][0], joined)] + lines[i + 1:]
    raise BrazeError(f"{source} line {lines[0][0]}: the graph header 'graph @name(...) {{' "
                     f"has no closing '{{'  [{lines[0][1][:120]}]")


def _lookup(env: dict, ref: str) -> Value:
    if ref not in env:
        raise BrazeError(f"{ref} is used before it is defined")
    return env[ref]


def _parse_call(env: dict, text: str):
    m = _CALL.match(text)
    if not m:
        raise BrazeError("expected 'op(%operands) {attrs}'")
    op, args, attr_text = m.groups()
    return op, [_lookup(env, a) for a in split_top(args)], parse_attrs(attr_text or "")


def _parse_node(g: Graph, env: dict, line: str) -> None:
    lhs_rhs = split_top(line, " = ")
    if len(lhs_rhs) == 1:
        lhs, rhs = "", lhs_rhs[0]
    elif len(lhs_rhs) == 2:
        lhs, rhs = lhs_rhs
    else:
        raise BrazeError("expected '%name: type = op(%operands) {attrs}'")
    op, operands, attrs = _parse_call(env, rhs)
    names, types = [], []
    for res in split_top(lhs):
        name, _, ty = res.partition(":")
        if not name.startswith("%"):
            raise BrazeError(f"result {res!r} must look like %name: type")
        names.append(name[1:])
        types.append(parse_type(ty))
    node = g.add_node(op, operands, attrs, names=names, types=types)
    for r in node.results:
        env[r.ref] = r
