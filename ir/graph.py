"""The Graph: an ordered list of nodes in SSA form.

Values are graph inputs (`%input_ids`), parameters (`@model.norm.weight`,
named weights with a type) or node results (`%12`). Every value is defined
once; nodes appear in execution order, so the list is also the schedule.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterable

from .errors import BrazeError
from .ops import OpDef, get_op
from .types import TensorType


_VALID_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(eq=False)
class Value:
    name: str
    type: TensorType
    kind: str = "result"            # "input" | "param" | "result"
    producer: "Node | None" = None
    # params only: how the compiler computes this weight from other params (a detached
    # node over params, e.g. the concatenated QKV weight); None = read from the checkpoint
    recipe: "Node | None" = None

    @property
    def ref(self) -> str:
        return ("@" if self.kind == "param" else "%") + self.name

    def __repr__(self) -> str:
        return f"{self.ref}: {self.type}"


@dataclass(eq=False)
class Node:
    op: str
    operands: list[Value]
    attrs: dict
    results: list[Value] = field(default_factory=list)

    @property
    def opdef(self) -> OpDef:
        return get_op(self.op)

    def __repr__(self) -> str:
        from .printer import format_node
        return format_node(self)


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: dict[str, Value] = {}
        self.meta: dict = {}             # graph-level facts passes record (segments, memory plan)
        self._names: set[str] = set()
        self._counter = 0
        self._insert_at: int | None = None

    # -- building -------------------------------------------------------
    def _claim(self, name: str) -> str:
        if not _VALID_NAME.match(name):
            raise BrazeError(f"value name {name!r} is not valid: use letters, digits, _ . -")
        if name in self._names:
            raise BrazeError(f"value name %{name} defined twice in graph @{self.name}")
        self._names.add(name)
        return name

    def fresh_name(self) -> str:
        while str(self._counter) in self._names:
            self._counter += 1
        return str(self._counter)

    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type, "input")
        self.inputs.append(v)
        return v

    def add_param(self, name: str, type: TensorType) -> Value:
        if not _VALID_NAME.match(name):
            raise BrazeError(f"parameter name {name!r} is not valid: use letters, digits, _ . -")
        if name in self.params:
            raise BrazeError(f"parameter @{name} declared twice in graph @{self.name}")
        v = Value(name, type, "param")
        self.params[name] = v
        return v

    def add_derived_param(self, name: str, op: str, sources: list[Value], attrs: dict | None = None,
                          type: TensorType | None = None) -> Value:
        """A weight the compiler computes from other params: `@name = op(@a, @b) {attrs}`."""
        opdef = get_op(op)
        attrs = opdef.resolve_attrs(attrs or {})
        for s in sources:
            if s.kind != "param":
                raise BrazeError(f"derived parameter @{name} may only use params, not {s.ref}")
        if type is None:
            types = opdef.infer([s.type for s in sources], attrs)
            if len(types) != 1:
                raise BrazeError(f"derived parameter @{name}: op '{op}' must have one result")
            type = types[0]
        v = self.add_param(name, type)
        v.recipe = Node(op, list(sources), attrs, [v])
        return v

    def unique_param_name(self, base: str) -> str:
        name, i = base, 1
        while name in self.params:
            name, i = f"{base}.{i}", i + 1
        return name

    def add_node(self, op: str, operands: Iterable[Value], attrs: dict | None = None,
                 names: list[str] | None = None, types: list[TensorType] | None = None) -> Node:
        """Append a node; result types are inferred unless given (the parser gives them)."""
        opdef = get_op(op)
        operands = list(operands)
        opdef.check_arity(len(operands))
        attrs = opdef.resolve_attrs(attrs or {})
        if types is None:
            types = opdef.infer([v.type for v in operands], attrs)
        node = Node(op, operands, attrs)
        names = names or []
        for i, t in enumerate(types):
            name = names[i] if i < len(names) and names[i] else self.fresh_name()
            self._claim(name)
            node.results.append(Value(name, t, "result", node))
        if self._insert_at is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self._insert_at, node)
            self._insert_at += 1
        return node

    # -- rewriting ------------------------------------------------------
    @contextlib.contextmanager
    def inserting_before(self, node: Node):
        """New nodes go just before `node` (in order) instead of at the end."""
        saved = self._insert_at
        self._insert_at = self.nodes.index(node)
        try:
            yield
        finally:
            self._insert_at = saved

    def replace_all_uses(self, old: Value, new: Value) -> int:
        n = 0
        for node in self.nodes:
            for i, v in enumerate(node.operands):
                if v is old:
                    node.operands[i] = new
                    n += 1
        for k, v in self.outputs.items():
            if v is old:
                self.outputs[k] = new
                n += 1
        return n

    def erase_node(self, node: Node) -> None:
        self.nodes.remove(node)
        for r in node.results:
            self._names.discard(r.name)

    def has_effects(self, node: Node) -> bool:
        return bool(node.opdef.writes)

    def remove_dead(self) -> int:
        """Drop nodes whose results nobody reads (and which write nothing), then unused params."""
        live = set(self.outputs.values())
        keep = []
        removed = 0
        for node in reversed(self.nodes):
            if self.has_effects(node) or any(r in live for r in node.results):
                keep.append(node)
                live.update(node.operands)
            else:
                removed += 1
                for r in node.results:
                    self._names.discard(r.name)
        self.nodes = keep[::-1]
        self.remove_unused_params()
        return removed

    def remove_unused_params(self) -> None:
        used = {v for n in self.nodes for v in n.operands if v.kind == "param"}
        used |= {v for v in self.outputs.values() if v.kind == "param"}
        frontier = list(used)
        while frontier:      # params that derived params are computed from stay declared
            v = frontier.pop()
            if v.recipe is not None:
                for s in v.recipe.operands:
                    if s not in used:
                        used.add(s)
                        frontier.append(s)
        self.params = {k: v for k, v in self.params.items() if v in used}

    def op(self, op: str, *operands: Value, **attrs) -> Value:
        """Build a single-result node and return its value: `g.op("mul", x, scalar=2.0)`."""
        node = self.add_node(op, operands, attrs)
        if len(node.results) != 1:
            raise BrazeError(f"op '{op}' has {len(node.results)} results; use add_node")
        return node.results[0]

    def set_output(self, name: str, value: Value) -> None:
        self.outputs[name] = value

    # -- queries --------------------------------------------------------
    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.params.values()
        for n in self.nodes:
            yield from n.results

    def users(self) -> dict[Value, list[Node]]:
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.operands:
                out.setdefault(v, []).append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def input(self, name: str) -> Value:
        for v in self.inputs:
            if v.name == name:
                return v
        raise BrazeError(f"graph @{self.name} has no input %{name}")

    def __str__(self) -> str:
        from .printer import print_graph
        return print_graph(self)
