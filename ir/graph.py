"""The Graph: an ordered list of nodes in SSA form.

Values are graph inputs (`%input_ids`), parameters (`@model.norm.weight`,
named weights with a type) or node results (`%12`). Every value is defined
once; nodes appear in execution order, so the list is also the schedule.

The graph indexes itself so that a rewrite costs what it touches, not the size
of the graph: each value's readers (`users(v)`), and each node's position
(`index(node)`, by an ordered key per node and a binary search). Both stay
current because every change goes through the graph: `g.nodes` is read-only
to everyone else, a node's `operands` is a tuple that is replaced whole
(`node.operands = ...`), and nodes come and go with `add_node`/`erase_node`.
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import re
from dataclasses import dataclass
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


class Node:
    """One op application. `operands` is a tuple: assign a new sequence to change it, so
    the graph that holds the node keeps its use index current."""

    __slots__ = ("op", "_operands", "attrs", "results", "_graph", "_key")

    def __init__(self, op: str, operands: Iterable[Value], attrs: dict,
                 results: list[Value] | None = None):
        self.op = op
        self._operands = tuple(operands)
        self.attrs = attrs
        self.results = results if results is not None else []
        self._graph: Graph | None = None     # the graph whose schedule holds this node
        self._key = 0                        # its position key there (see Graph.index)

    @property
    def operands(self) -> tuple[Value, ...]:
        return self._operands

    @operands.setter
    def operands(self, values: Iterable[Value]) -> None:
        g = self._graph
        if g is not None:
            g._unuse(self)
        self._operands = tuple(values)
        if g is not None:
            g._use(self)

    @property
    def opdef(self) -> OpDef:
        return get_op(self.op)

    def __repr__(self) -> str:
        from .printer import format_node
        return format_node(self)


class Schedule(list):
    """The node list as everyone but its graph sees it: readable like any list, changed
    only through the graph (an edit behind its back would leave its indexes stale)."""

    def _read_only(self, *args, **kwargs):
        raise TypeError("the schedule changes only through the graph: add_node, erase_node, "
                        "inserting_before, or assigning g.nodes a new list")

    append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only


_KEY_STEP = 1 << 32              # room for 32 halvings before positions are renumbered
_key_of = operator.attrgetter("_key")


class Graph:
    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self._nodes = Schedule()
        self._uses: dict[Value, dict[Node, int]] = {}    # value -> {reader: times it reads it}
        self.outputs: dict[str, Value] = {}
        self.meta: dict = {}             # graph-level facts passes record (segments, memory plan)
        self._names: set[str] = set()
        self._counter = 0
        self._anchor: Node | None = None     # add_node inserts before it (inserting_before)

    # -- the schedule and its indexes ---------------------------------------------
    @property
    def nodes(self) -> Schedule:
        return self._nodes

    @nodes.setter
    def nodes(self, nodes: Iterable[Node]) -> None:
        """Replace the schedule wholesale (tests building odd graphs; O(N) reindexing)."""
        nodes = list(nodes)
        for n in self._nodes:
            n._graph = None
        self._nodes = Schedule(nodes)
        self._uses = {}
        for n in nodes:
            n._graph = self
            self._use(n)
        self._renumber()

    def _renumber(self) -> None:
        for i, n in enumerate(self._nodes):
            n._key = i * _KEY_STEP

    def _use(self, node: Node) -> None:
        uses = self._uses
        for v in node._operands:
            d = uses.get(v)
            if d is None:
                uses[v] = {node: 1}
            else:
                d[node] = d.get(node, 0) + 1

    def _unuse(self, node: Node) -> None:
        uses = self._uses
        for v in node._operands:
            d = uses.get(v)
            if d is not None and d.pop(node, None) is not None and not d:
                del uses[v]

    def index(self, node: Node) -> int:
        """`node`'s position in the schedule, by binary search over the position keys."""
        nodes = self._nodes
        i = bisect.bisect_left(nodes, node._key, key=_key_of)
        if i < len(nodes) and nodes[i] is node:
            return i
        raise BrazeError(f"node {node.op} ({', '.join(r.ref for r in node.results)}) is not in "
                         f"graph @{self.name}")

    def contains(self, node: Node) -> bool:
        return node._graph is self

    def _insert(self, i: int, node: Node) -> None:
        nodes = self._nodes
        if i == len(nodes):
            node._key = nodes[-1]._key + _KEY_STEP if nodes else 0
        else:
            hi = nodes[i]._key
            lo = nodes[i - 1]._key if i > 0 else hi - 2 * _KEY_STEP
            if hi - lo < 2:          # no key left between the neighbours: spread them out
                self._renumber()
                hi = nodes[i]._key
                lo = nodes[i - 1]._key if i > 0 else hi - 2 * _KEY_STEP
            node._key = (lo + hi) // 2
        list.insert(nodes, i, node)
        node._graph = self
        self._use(node)

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
            try:
                types = opdef.infer([v.type for v in operands], attrs)
            except BrazeError as e:     # a pass built it: name the op and what it was given
                given = ", ".join(f"{v.ref}: {v.type}" for v in operands)
                raise BrazeError(f"{op}({given}): {e}") from None
        node = Node(op, operands, attrs)
        names = names or []
        for i, t in enumerate(types):
            name = names[i] if i < len(names) and names[i] else self.fresh_name()
            self._claim(name)
            node.results.append(Value(name, t, "result", node))
        self._insert(len(self._nodes) if self._anchor is None else self.index(self._anchor), node)
        return node

    # -- rewriting ------------------------------------------------------
    @contextlib.contextmanager
    def inserting_before(self, node: Node | None):
        """New nodes go just before `node` (in order); None: at the end."""
        if node is not None:
            self.index(node)             # fail here, not at the first insertion
        saved = self._anchor
        self._anchor = node
        try:
            yield
        finally:
            self._anchor = saved

    def replace_all_uses(self, old: Value, new: Value) -> int:
        """Point every reader of `old` (and every output that is `old`) at `new`; returns
        the number of operand and output slots changed. Costs the uses of `old`."""
        n = 0
        if old is new:
            n = sum(self._uses.get(old, {}).values())
        else:
            readers = self._uses.pop(old, None) or {}
            into = self._uses.setdefault(new, {}) if readers else None
            for node, times in readers.items():
                node._operands = tuple(new if v is old else v for v in node._operands)
                into[node] = into.get(node, 0) + times
                n += times
        for k, v in self.outputs.items():
            if v is old:
                self.outputs[k] = new
                n += 1
        return n

    def erase_node(self, node: Node) -> None:
        """Remove `node` from the schedule (its results' readers must be gone or rewired)."""
        i = self.index(node)
        list.__delitem__(self._nodes, i)
        self._unuse(node)
        node._graph = None
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
                self._unuse(node)
                node._graph = None
                for r in node.results:
                    self._names.discard(r.name)
        if removed:
            self._nodes = Schedule(keep[::-1])     # the survivors' keys stay in order
        self.remove_unused_params()
        return removed

    def remove_unused_params(self) -> None:
        used = {v for v in self._uses if v.kind == "param"}
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

    def users(self, v: Value) -> list[Node]:
        """The nodes that read `v`, in schedule order, each once per operand slot that
        reads it. Always current: the graph updates it as it changes."""
        d = self._uses.get(v)
        if not d:
            return []
        if len(d) == 1:
            (node, times), = d.items()
            return [node] * times
        return [n for n in sorted(d, key=_key_of) for _ in range(d[n])]

    def num_users(self, v: Value) -> int:
        """How many operand slots read `v` (without sorting them)."""
        d = self._uses.get(v)
        return sum(d.values()) if d else 0

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
