"""prune-logits: the LM head runs only on the rows that are sampled.

A step computes hidden states for every token [T, H], but only the rows of
`logits_indices: i64[R]` are sampled (each sequence's last new token; k + 1 rows of a
sequence verifying k speculative tokens; see docs/batch-contract.md). Gathering those
rows before the LM head turns a [T, H] x [H, V] GEMM into an [R, H] one; in a long
prefill that is most of the head's work and memory.

The gather also moves above the row-wise ops that feed the head (the final
RMSNorm, and the last residual add when nothing else reads it), so they too
run on R rows instead of T. An op is row-wise when output row i depends only
on input row i: pointwise ops whose operands are row-aligned ([T, ...]) or
broadcast along rows (params, [1, ...], lower rank), reductions over dims
other than 0, and fuse-norm's `rms_norm` and `add_rms_norm` (over a last dim
that is not the token dim). Only ops whose results nothing else reads move
(else they would be computed twice), and only when their readers take them
row by row; each row-aligned value feeding them from outside gets its own gather.
After fuse-norm the tail is `add_rms_norm(%res, %mlp_out, @model.norm.weight)`,
which moves the same way, except that it gathers its rows itself: an `rms_norm` or
`add_rms_norm` whose row-aligned inputs come from outside the moved ops gets
%logits_indices as its `rows` operand, so no index_select launch precedes it:
    %113: f32[R, 64], %114: f32[R, 64] = add_rms_norm(%89, %102, @model.norm.weight, %logits_indices) {eps=1e-06}

Before:
    %103: f32[T, 64] = add(%89, %102)
    %104: f32[T, 64] = cast(%103) {dtype="f32"}
    %105: f32[T, 64] = pow(%104) {scalar=2}
    %106: f32[T, 1] = mean(%105) {dims=[-1], keepdim=true}
    %107: f32[T, 1] = add(%106) {scalar=1e-06}
    %108: f32[T, 1] = rsqrt(%107)
    %109: f32[T, 64] = mul(%104, %108)
    %110: f32[T, 64] = cast(%109) {dtype="f32"}
    %111: f32[T, 64] = mul(@model.norm.weight, %110)
    %112: f32[T, 256] = linear(%111, @lm_head.weight)
    return logits=%112
After:
    %113: f32[R, 64] = index_select(%89, %logits_indices) {dim=0}
    %114: f32[R, 64] = index_select(%102, %logits_indices) {dim=0}
    %115: f32[R, 64] = add(%113, %114)
    %116: f32[R, 64] = cast(%115) {dtype="f32"}
    %117: f32[R, 64] = pow(%116) {scalar=2}
    %118: f32[R, 1] = mean(%117) {dims=[-1], keepdim=true}
    %119: f32[R, 1] = add(%118) {scalar=1e-06}
    %120: f32[R, 1] = rsqrt(%119)
    %121: f32[R, 64] = mul(%116, %120)
    %122: f32[R, 64] = cast(%121) {dtype="f32"}
    %123: f32[R, 64] = mul(@model.norm.weight, %122)
    %124: f32[R, 256] = linear(%123, @lm_head.weight)
    meta {logits="pruned"}
    return logits=%124

Row-wise ops between the head and the `logits` output (Gemma's final soft-cap,
`mul(tanh(div(linear(..), 30)), 30)`) run after the pruned head, on its R rows.

The graph records `meta {logits="pruned"}`: its `logits` output holds one row
per logits index (R), not per token. Refused (graph unchanged): no `logits` output, no
`logits_indices` input, `logits` not a linear over [T, H] rows, or the logits
read by something else in the graph.
"""

from __future__ import annotations

from braze.ir import Graph, Node, Value
from braze.ir.ops import get_op
from braze.ir.types import T

from .manager import PassContext, register_pass

def _rows(v: Value) -> bool:
    return v.type.rank >= 1 and v.type.shape[0] == T


def _aligned(node: Node, v: Value) -> bool:
    """Whether operand `v` of a row-wise node is indexed by token row (else it broadcasts)."""
    if get_op(node.op).reduction:
        return True
    return _rows(v) and v.type.rank == node.results[0].type.rank


def _rowwise(node: Node) -> bool:
    """Output row i depends only on row i of the row-aligned operands."""
    opdef = get_op(node.op)
    if not node.operands or not all(_rows(r) for r in node.results) or \
            len(node.results) != 1 and not opdef.last_dim_rowwise:
        return False
    out = node.results[0].type
    if opdef.reduction:
        dims = node.attrs["dims"] if "dims" in node.attrs else [node.attrs.get("dim")]
        # an empty dims list reduces everything in torch, rows included
        if not dims or None in dims or len(node.operands) != 1 or not _rows(node.operands[0]):
            return False
        return all(d % node.operands[0].type.rank != 0 for d in dims)
    if not (opdef.pointwise or opdef.last_dim_rowwise):
        return False
    if opdef.last_dim_rowwise and (out.rank < 2 or not _aligned(node, node.operands[0])):
        return False    # they normalise the last dim, which must not be the token dim
    for v in node.operands:
        # same rank: row-aligned [T, ...] or broadcast [1, ...]; lower rank broadcasts over rows
        if v.type.rank > out.rank or v.type.rank == out.rank and v.type.shape[0] not in (T, 1):
            return False
    return any(_aligned(node, v) for v in node.operands)


def _row_tail(g: Graph, last: Node) -> tuple[list[Node], Node]:
    """(the chain of single-input row-wise ops between the LM head and the logits output,
    first op first, e.g. Gemma's soft-cap div, tanh, mul; the head). ([], last) when there
    is no such chain ending at a linear read only by it."""
    tail: list[Node] = []
    outputs = set(g.outputs.values())
    node = last
    while node is not None and node.op != "linear" and _rowwise(node) and len(node.results) == 1:
        rows = [v for v in node.operands if _aligned(node, v)]
        if len(rows) != 1 or rows[0].producer is None:
            return [], last
        if tail and (g.num_users(node.results[0]) != 1 or node.results[0] in outputs):
            return [], last
        tail.append(node)
        node = rows[0].producer
    if node is None or node.op != "linear" or g.num_users(node.results[0]) != 1 \
            or node.results[0] in g.outputs.values():
        return [], last
    return tail[::-1], node


def _hoistable(g: Graph, head: Node) -> list[Node]:
    """The row-wise nodes feeding the head's input that nothing else reads, in schedule order."""
    outputs = set(g.outputs.values())
    region: set[int] = {id(head)}
    for node in reversed(g.nodes[:g.index(head)]):
        if not _rowwise(node) or any(r in outputs or r in head.operands[1:] for r in node.results):
            continue    # (the head's weight and bias keep all their rows)
        # every reader moves too and takes these results row by row (not as a broadcast
        # over all T rows, which would still need every row)
        reads = [(u, r) for r in node.results for u in g.users(r)]
        if reads and all(id(u) in region and (u is head or all(
                _aligned(u, v) for v in u.operands if v is r)) for u, r in reads):
            region.add(id(node))
    return [n for n in g.nodes if id(n) in region and n is not head]


# norms that take a `rows` index (ir/op_fused_norm_rope.py): at the top of the moved ops,
# over inputs from outside, they gather the rows themselves
_GATHERING_NORMS = ("rms_norm", "add_rms_norm")


# after fuse-norm: the final norm it moves above the gather is an add_rms_norm by then
@register_pass("prune-logits", after=("fuse-norm",))
def prune_logits(g: Graph, ctx: PassContext) -> int:
    """logits = linear(h, W) over all tokens -> linear(index_select(h, %logits_indices), W)."""
    if g.meta.get("logits") == "pruned":
        return 0
    logits = g.outputs.get("logits")
    if logits is None:
        ctx.refuse(f"@{g.name}", "the graph has no output named logits")
        return 0
    head = logits.producer
    where = head if head is not None else f"{logits.ref}"
    index = next((v for v in g.inputs if v.name == "logits_indices"), None)
    if index is None:
        ctx.refuse(where, "the graph has no %logits_indices input (see docs/batch-contract.md)")
        return 0
    if index.type.rank != 1 or index.type.dtype not in ("i64", "i32"):
        ctx.refuse(where, f"%logits_indices is {index.type}, not a 1-D integer index")
        return 0
    if head is None:
        ctx.refuse(where, f"logits are {logits.ref}, a graph {logits.kind}, not a linear's result")
        return 0
    tail, head = _row_tail(g, head)
    where = head
    if head.op != "linear":
        ctx.refuse(where, f"logits come from {head.op}, not a linear")
        return 0
    h = head.operands[0]
    if h.type.rank != 2 or h.type.shape[0] != T:
        ctx.refuse(head, f"the LM head reads {h.ref}: {h.type}, not token rows [T, hidden]")
        return 0
    readers = g.users(logits)
    others = [k for k, v in g.outputs.items() if v is logits and k != "logits"]
    if readers or others:
        what = readers[0].op if readers else f"output {others[0]}"
        ctx.refuse(head, f"the logits are also read by {what}, which needs every token's row")
        return 0

    region = _hoistable(g, head)
    new: dict[Value, Value] = {}        # old [T, ...] value -> its [R, ...] rows

    def rows(v: Value) -> Value:
        if v not in new:                # from outside the moved ops: gather it
            new[v] = g.op("index_select", v, index, dim=0)
        return new[v]

    with g.inserting_before(head):
        for node in region:
            aligned = [v for v in node.operands if _aligned(node, v)]
            if node.op in _GATHERING_NORMS and node.results[0].type.rank == 2 and \
                    not any(v in new for v in aligned):
                # the norm reads the sampled rows itself: no index_select launches
                clone = g.add_node(node.op, list(node.operands) + [index], dict(node.attrs))
            else:
                operands = [rows(v) if _aligned(node, v) else v for v in node.operands]
                clone = g.add_node(node.op, operands, dict(node.attrs))
            new.update(zip(node.results, clone.results))
        pruned = g.op("linear", rows(h), *head.operands[1:])
        new[head.results[0]] = pruned
        for node in tail:              # soft-capping etc. after the head, on R rows too
            operands = [new.get(v, v) for v in node.operands]
            pruned = g.add_node(node.op, operands, dict(node.attrs)).results[0]
            new[node.results[0]] = pruned
    g.replace_all_uses(logits, pruned)
    for node in reversed(tail):
        g.erase_node(node)
    g.erase_node(head)
    for node in reversed(region):
        g.erase_node(node)
    g.meta["logits"] = "pruned"
    return 1
