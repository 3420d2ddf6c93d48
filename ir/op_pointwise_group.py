"""fused_pointwise: a group of pointwise ops (and row reductions) that one generated kernel runs.

    %43, %51 = fused_pointwise(%0, %42, @model.layers.0.post_attention_layernorm.weight) {body="..."}

with `body` (one string attribute; printed here unescaped):

    graph @group(%in0: f32[T, 64], %in1: f32[T, 64], %in2: f32[64]) {
      %0: f32[T, 64] = add(%in0, %in1)
      %1: f32[T, 64] = pow(%0) {scalar=2}
      %2: f32[T, 1] = mean(%1) {dims=[-1], keepdim=true}
      %3: f32[T, 1] = add(%2) {scalar=1e-06}
      %4: f32[T, 1] = rsqrt(%3)
      %5: f32[T, 64] = mul(%0, %4)
      %6: f32[T, 64] = mul(%in2, %5)
      return out0=%0, out1=%6
    }

`body` is the IR text (`print_graph`) of a small graph. Its inputs `%in0, %in1, ...`
are the fused op's operands in order (weights included: the operand is the param);
its outputs `out0, out1, ...` are the fused op's results in order. The reference
implementation runs the body with the interpreter, so the fused op computes exactly
what its members computed.

What a body may hold is what one kernel can run: every node is pointwise (the
registry's `pointwise=True`) or a row reduction (`sum`/`mean`/`amax` over the last
dim only), and all of them share one iteration space S:

- every pointwise node's result broadcasts to S;
- every reduction reads a value of exactly shape S and reduces S's last dim, which
  is a concrete size; a reduction with keepdim=false is only a body output (its
  result [...] does not broadcast back along the rows it came from).

Without reductions the kernel is elementwise over S. With them it is a row kernel:
a program holds whole rows of S, a reduction gives one value per row ([..., 1]) and
later nodes broadcast it back over the row, so RMSNorm's pow -> mean -> add ->
rsqrt -> mul is one kernel (see `passes/fuse_pointwise.py`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .errors import BrazeError
from .ops import REQUIRED, OpDef, get_op, register
from .types import TensorType


def reduces_rows(op: str) -> bool:
    """Whether a generated kernel can compute op as a reduction (the registry's `combine`)."""
    return get_op(op).combine is not None


@dataclass(frozen=True)
class Space:
    """The iteration space of a group: the shape S, and whether it reduces rows of S."""
    shape: tuple
    row: bool = False


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def is_row_reduction(node) -> bool:
    if not reduces_rows(node.op):
        return False
    rank = node.operands[0].type.rank
    dims = node.attrs["dims"]
    return rank >= 1 and len(dims) == 1 and -rank <= dims[0] < rank and dims[0] % rank == rank - 1


def node_space(node) -> Space:
    """The space `node` needs as a kernel member; BrazeError saying why it cannot be one."""
    opdef = node.opdef
    if opdef.writes or opdef.graph_break or len(node.results) != 1:
        raise BrazeError(f"{node.op} writes state, breaks the graph or has several results")
    if opdef.pointwise:
        return Space(node.results[0].type.shape)
    if is_row_reduction(node):
        shape = node.operands[0].type.shape
        if not isinstance(shape[-1], int):
            raise BrazeError(f"{node.op} reduces a row of symbolic length {shape[-1]}; "
                             f"a row kernel needs a fixed row size")
        return Space(shape, row=True)
    if reduces_rows(node.op):
        raise BrazeError(f"{node.op} reduces dims {node.attrs['dims']} of "
                         f"{node.operands[0].type}; only a reduction over the last dim fuses")
    raise BrazeError(f"{node.op} is neither pointwise nor a row reduction")


def join_spaces(a: Space, b: Space) -> Space:
    """The space of two groups run as one kernel; BrazeError if there is none."""
    from .op_pointwise import broadcast_shapes
    if a.shape == b.shape:
        return Space(a.shape, a.row or b.row)
    try:
        shape = broadcast_shapes(a.shape, b.shape)
    except BrazeError:
        raise BrazeError(f"shapes {_fmt(a.shape)} and {_fmt(b.shape)} have no common "
                         f"iteration space") from None
    for s in (a, b):
        if s.row and s.shape != shape:
            raise BrazeError(f"a reduction over rows of {_fmt(s.shape)} cannot share a kernel "
                             f"with values of shape {_fmt(shape)}")
    return Space(shape, a.row or b.row)


def reduced_value_use(node, members) -> str | None:
    """Why `node` reading a keepdim=false reduction of `members` breaks the kernel, or None."""
    for v in node.operands:
        p = v.producer
        if p is not None and p in members and reduces_rows(p.op) and not p.attrs["keepdim"]:
            return (f"{v.ref} = {p.op}(...) drops the reduced dim (keepdim=false), so {node.op} "
                    f"would broadcast it across the wrong dims; it can only be a group output")
    return None


@dataclass(frozen=True)
class Body:
    graph: object        # the parsed body Graph; shared by the cache, never mutate it
    in_types: tuple
    out_types: tuple
    space: Space


@functools.lru_cache(maxsize=1024)
def parse_body(text: str) -> Body:
    """Parse and check a body once per distinct text (the verifier infers types often)."""
    from .parser import parse_graph
    from .verifier import verify
    g = parse_graph(text)
    if g.params:
        raise BrazeError(f"fused_pointwise body uses params {sorted(g.params)}; weights must be "
                         f"operands of the fused op")
    if not g.nodes or not g.outputs:
        raise BrazeError("fused_pointwise body has no nodes or no outputs")
    verify(g)
    members = set(g.nodes)
    space = None
    for n in g.nodes:
        s = node_space(n)
        space = s if space is None else join_spaces(space, s)
        why = reduced_value_use(n, members)
        if why:
            raise BrazeError(f"fused_pointwise body: {why}")
    for k, v in g.outputs.items():
        if v.kind != "result":
            raise BrazeError(f"fused_pointwise body output {k} is {v.ref}, not a computed value")
    return Body(g, tuple(v.type for v in g.inputs), tuple(v.type for v in g.outputs.values()),
                space)


def _infer(types: list[TensorType], attrs: dict) -> list[TensorType]:
    body = parse_body(attrs["body"])
    if len(types) != len(body.in_types):
        raise BrazeError(f"fused_pointwise: {len(types)} operands, its body takes "
                         f"{len(body.in_types)}")
    for i, (t, want) in enumerate(zip(types, body.in_types)):
        if t != want:
            raise BrazeError(f"fused_pointwise: operand {i} is {t}, body input %in{i} is {want}")
    return list(body.out_types)


def _impl(*inputs, body):
    from .interpreter import run_graph
    b = parse_body(body)
    out = run_graph(b.graph, {v.name: x for v, x in zip(b.graph.inputs, inputs)}, {})
    return tuple(out.values())


register(OpDef("fused_pointwise", ("inputs*",), _infer, _impl, attrs={"body": REQUIRED},
               doc="run `body` (IR text of pointwise ops and row reductions over one iteration "
                   "space) on the operands; one result per body output"))
