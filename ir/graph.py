"""The Graph: an ordered list of nodes in SSA form.

Values are graph inputs (`%input_ids`), parameters (`@model.norm.weight`,
named weights with a type) or node results (`%12`). Every value is defined
once; nodes appear in execution order, so the list is also the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .errors import BrazeError
from .ops import OpDef, get_op
from .types import TensorType


@dataclass(eq=False)
class Value:
    name: str
    type: TensorType
    kind: str = "result"            # "input" | "param" | "result"
    producer: "Node | None" = None

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
        self._names: set[str] = set()
        self._counter = 0

    # -- building -------------------------------------------------------
    def _claim(self, name: str) -> str:
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
        if name in self.params:
            raise BrazeError(f"parameter @{name} declared twice in graph @{self.name}")
        v = Value(name, type, "param")
        self.params[name] = v
        return v

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
        self.nodes.append(node)
        return node

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
