"""The verifier: what every well-formed graph satisfies.

- every operand is defined before use (SSA; inputs and params count as defined)
- every value is defined once, every output names a defined value
- each node's op exists, its arity and attributes are valid, and its result
  types equal what the op infers from its operand types
- an op writes only persistent state (graph inputs); each input is written by at
  most one node, and no other node reads it before that write (a step's cache
  writes come before the attention that reads them: the node order is the schedule)
"""

from __future__ import annotations

from .errors import BrazeError
from .graph import Graph
from .types import dims_equal


def verify(g: Graph) -> None:
    problems = list(check(g))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BrazeError(f"graph @{g.name} is malformed: {problems[0]}{more}")


def check(g: Graph):
    """Yield one message per problem found."""
    defined = set()
    names = set()
    for v in list(g.inputs) + list(g.params.values()):
        key = v.ref
        if key in names:
            yield f"{key} is defined twice"
        names.add(key)
        if v.recipe is not None:
            yield from _check_recipe(v, defined)
        defined.add(id(v))
    for i, node in enumerate(g.nodes):
        where = f"node {i} ({node.op})"
        try:
            opdef = node.opdef
            opdef.check_arity(len(node.operands))
            attrs = opdef.resolve_attrs(node.attrs)
        except BrazeError as e:
            yield f"{where}: {e}"
            continue
        for v in node.operands:
            if id(v) not in defined:
                yield f"{where}: operand {v.ref} is used before it is defined"
        for idx in opdef.writes:
            if idx < len(node.operands) and node.operands[idx].kind != "input":
                yield (f"{where}: writes {node.operands[idx].ref}, which is not a graph "
                       f"input (only persistent state may be written)")
        try:
            expected = opdef.infer([v.type for v in node.operands], attrs)
        except BrazeError as e:
            yield f"{where}: {e}"
            expected = None
        except Exception as e:  # a torch error from an invalid attribute value
            yield f"{where}: invalid attributes {attrs}: {type(e).__name__}: {e}"
            expected = None
        if expected is not None:
            if len(expected) != len(node.results):
                yield f"{where}: has {len(node.results)} results, op gives {len(expected)}"
            for r, t in zip(node.results, expected):
                if r.type.dtype != t.dtype or r.type.rank != t.rank or not all(
                        dims_equal(a, b) for a, b in zip(r.type.shape, t.shape)):
                    yield f"{where}: result {r.ref} is declared {r.type} but the op gives {t}"
        for r in node.results:
            if r.ref in names:
                yield f"{where}: {r.ref} is defined twice"
            if r.producer is not node:
                yield f"{where}: result {r.ref} does not point back at its node"
            names.add(r.ref)
            defined.add(id(r))
    yield from _check_writes(g)
    for k, v in g.outputs.items():
        if id(v) not in defined:
            yield f"output {k} refers to {v.ref}, which is not defined in the graph"


def _check_recipe(v, defined):
    r = v.recipe
    try:
        opdef = r.opdef
        attrs = opdef.resolve_attrs(r.attrs)
        expected = opdef.infer([s.type for s in r.operands], attrs)
    except BrazeError as e:
        yield f"derived parameter {v.ref}: {e}"
        return
    for s in r.operands:
        if s.kind != "param" or id(s) not in defined:
            yield f"derived parameter {v.ref} uses {s.ref}, which is not a parameter declared before it"
    if len(expected) != 1 or expected[0] != v.type:
        yield f"derived parameter {v.ref} is declared {v.type} but its recipe gives {expected[0] if expected else 'nothing'}"


def _check_writes(g: Graph):
    writer: dict[int, int] = {}
    for i, node in enumerate(g.nodes):
        try:
            writes = node.opdef.writes
        except BrazeError:
            continue
        for idx in writes:
            if idx >= len(node.operands):
                continue
            v = node.operands[idx]
            if id(v) in writer:
                yield (f"node {i} ({node.op}): {v.ref} is already written by node "
                       f"{writer[id(v)]} ({g.nodes[writer[id(v)]].op})")
            writer.setdefault(id(v), i)
    for i, node in enumerate(g.nodes):
        for v in node.operands:
            w = writer.get(id(v))
            if w is not None and i < w:
                yield (f"node {i} ({node.op}) reads {v.ref} before node {w} "
                       f"({g.nodes[w].op}) writes it")
