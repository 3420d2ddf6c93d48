"""Declarative subgraph patterns: state "this subgraph -> that op", get bindings or a reason.

    x, w = Var("x"), Var("w", kind="param")
    hf = Opt(Op("cast", x, dtype="f32"), x)          # x.float(), or x when already f32
    var = Op("mean", Op("pow", hf, scalar=2), dims=[-1], keepdim=True)
    norm = Op("mul", hf, Op("rsqrt", Op("add", var, scalar=Var("eps"))))
    pat = Op("mul", w, Opt(Op("cast", norm, dtype=Var("dt")), norm))   # commutative: w * n or n * w

    m = match(pat, value, graph)
    if m:  m["x"], m["eps"], m.nodes      # the bound values/attrs, the matched nodes
    else:  m.reason                       # why not, e.g. "mean: dims is [0], pattern wants [-1]"

Rules: a `Var` binds a value (the same name twice must be the same value); an
attribute given as a literal must equal the node's, given as a `Var` it binds.
Matched inner nodes must have no users outside the match (else replacing them
would keep them alive): the one-use rule. Ops the registry calls `commutative` (add,
mul, maximum, ...) match their two operands in either order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from braze.ir import Graph, Value


class Pat:
    pass


@dataclass
class Var(Pat):
    """Any value (or, in an attribute position, any attribute value), bound by name."""
    name: str
    kind: str | None = None          # "param" | "input" | "result"
    dtype: str | None = None
    where: Callable[[Any], bool] | None = None


class Op(Pat):
    def __init__(self, op: str | tuple, *operands: Pat, result: int = 0, name: str | None = None,
                 **attrs):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.operands = operands
        self.attrs = attrs
        self.result = result         # which result of a multi-result node the value must be
        self.name = name             # bind the matched node under this name


@dataclass
class Opt(Pat):
    """`pat` if it matches, else `otherwise` (e.g. an optional cast around a value)."""
    pat: Pat
    otherwise: Pat


@dataclass
class Match:
    bindings: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)
    reason: str = ""
    ok: bool = True

    def __bool__(self):
        return self.ok

    def __getitem__(self, key):
        return self.bindings[key]

    def get(self, key, default=None):
        return self.bindings.get(key, default)


class _Fail(Exception):
    pass


class _Matcher:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.deepest = ""
        self.depth = 0
        self.matched = 0            # sub-patterns matched so far in the current attempt
        self.best = (-1, -1)

    def fail(self, msg: str):
        # report the failure that got furthest into the pattern (most matched before it,
        # then deepest): when an Opt or a commutative retry falls back, its early failure
        # must not hide the real reason
        if (self.matched, self.depth) >= self.best:
            self.best, self.deepest = (self.matched, self.depth), msg
        raise _Fail(msg)

    def value(self, pat: Pat, v: Value, b: dict, nodes: list) -> None:
        self.depth += 1
        try:
            self._value(pat, v, b, nodes)
        finally:
            self.depth -= 1
        self.matched += 1

    def _value(self, pat: Pat, v: Value, b: dict, nodes: list) -> None:
        if isinstance(pat, Var):
            if pat.kind and v.kind != pat.kind:
                self.fail(f"{v.ref} is a {v.kind}, pattern wants a {pat.kind}")
            if pat.dtype and v.type.dtype != pat.dtype:
                self.fail(f"{v.ref} is {v.type.dtype}, pattern wants {pat.dtype}")
            if pat.where and not pat.where(v):
                self.fail(f"{v.ref} ({v.type}) fails the constraint on {pat.name}")
            if pat.name in b and b[pat.name] is not v:
                self.fail(f"{pat.name} would bind both {b[pat.name].ref} and {v.ref}")
            b[pat.name] = v
            return
        if isinstance(pat, Opt):
            b2, n2, start = dict(b), list(nodes), self.matched
            try:
                self.value(pat.pat, v, b2, n2)
            except _Fail:
                self.matched = start
                self.value(pat.otherwise, v, b, nodes)
                return
            b.clear(), b.update(b2)
            nodes[:] = n2
            return
        assert isinstance(pat, Op)
        node = v.producer
        if node is None:
            self.fail(f"{v.ref} is a {v.kind}, pattern wants {'|'.join(pat.ops)}")
        if node.op not in pat.ops:
            self.fail(f"{v.ref} comes from {node.op}, pattern wants {'|'.join(pat.ops)}")
        if node.results.index(v) != pat.result:
            self.fail(f"{v.ref} is result {node.results.index(v)} of {node.op}, pattern wants {pat.result}")
        for k, want in pat.attrs.items():
            have = node.attrs.get(k)
            if isinstance(want, Var):
                if want.where and not want.where(have):
                    self.fail(f"{node.op}: {k}={have!r} fails the constraint on {want.name}")
                if want.name in b and b[want.name] != have:
                    self.fail(f"{node.op}: {k}={have!r} differs from {want.name}={b[want.name]!r}")
                b[want.name] = have
            elif have != want or type(have) is not type(want) and not (
                    isinstance(want, (int, float)) and isinstance(have, (int, float))
                    and not isinstance(have, bool)):
                self.fail(f"{node.op}: {k} is {have!r}, pattern wants {want!r}")
        if len(node.operands) != len(pat.operands):
            self.fail(f"{node.op} has {len(node.operands)} operands, pattern wants {len(pat.operands)}")
        orders = [list(node.operands)]
        if node.opdef.commutative and len(node.operands) == 2:
            orders.append(list(reversed(node.operands)))
        last = None
        start = self.matched
        for operands in orders:
            b2, n2 = dict(b), list(nodes)
            self.matched = start
            try:
                for p, o in zip(pat.operands, operands):
                    self.value(p, o, b2, n2)
            except _Fail as e:
                last = e
                continue
            b.clear(), b.update(b2)
            nodes[:] = n2
            if node not in nodes:
                nodes.append(node)
            if pat.name:
                b[pat.name] = node
            return
        raise last


def match(pat: Pat, value: Value, graph: Graph, escapes: tuple[Value, ...] = ()) -> Match:
    """Match `pat` rooted at `value`; the root node may have any users, inner ones only matched
    ones, except the values in `escapes` (a pattern with a second result: fuse-grouped-topk's
    expert ids), which the replacement takes over as well."""
    m = _Matcher(graph)
    b, nodes = {}, []
    try:
        m.value(pat, value, b, nodes)
    except _Fail:
        return Match(ok=False, reason=m.deepest)
    root = value.producer
    inside = set(map(id, nodes))
    outputs = set(graph.outputs.values())
    for n in nodes:
        if n is root:
            continue
        for r in n.results:
            if r in escapes:
                continue
            outside = [u for u in graph.users(r) if id(u) not in inside]
            if outside or r in outputs:
                where = f"{outside[0].op}" if outside else "a graph output"
                return Match(ok=False, reason=f"{r.ref} ({n.op}) is also used by {where}, "
                                              f"outside the pattern")
    return Match(bindings=b, nodes=nodes)
