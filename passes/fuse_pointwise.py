"""fuse-pointwise: connected pointwise ops (and row reductions) -> one `fused_pointwise` op.

Each group becomes one generated kernel, so its intermediate values never go
through memory. Before (a residual add and the RMSNorm after it, as traced):

    %43: f32[T, 64] = add(%0, %42)
    %44: f32[T, 64] = cast(%43) {dtype="f32"}
    %45: f32[T, 64] = pow(%44) {scalar=2}
    %46: f32[T, 1] = mean(%45) {dims=[-1], keepdim=true}
    %47: f32[T, 1] = add(%46) {scalar=1e-06}
    %48: f32[T, 1] = rsqrt(%47)
    %49: f32[T, 64] = mul(%44, %48)
    %50: f32[T, 64] = cast(%49) {dtype="f32"}
    %51: f32[T, 64] = mul(@model.layers.0.post_attention_layernorm.weight, %50)
    %52: f32[T, 128] = linear(%51, @model.layers.0.mlp.gate_proj.weight)

After (one op; the body is one string, shown here unescaped):

    %43, %51 = fused_pointwise(%0, %42, @model.layers.0.post_attention_layernorm.weight) {body="
      graph @group(%in0: f32[T, 64], %in1: f32[T, 64], %in2: f32[64]) {
        %0: f32[T, 64] = add(%in0, %in1)
        %1: f32[T, 64] = cast(%0) {dtype="f32"}
        %2: f32[T, 64] = pow(%1) {scalar=2}
        %3: f32[T, 1] = mean(%2) {dims=[-1], keepdim=true}
        %4: f32[T, 1] = add(%3) {scalar=1e-06}
        %5: f32[T, 1] = rsqrt(%4)
        %6: f32[T, 64] = mul(%1, %5)
        %7: f32[T, 64] = cast(%6) {dtype="f32"}
        %8: f32[T, 64] = mul(%in2, %7)
        return out0=%0, out1=%8
      }"}
    %52: f32[T, 128] = linear(%51, @model.layers.0.mlp.gate_proj.weight)

(the results keep their names: `%43`, the residual, is read again later.)

How groups form: nodes are visited in schedule order; a member (see
`ir/op_pointwise_group.py`: pointwise ops, and `sum`/`mean`/`amax` over the last
dim) joins the groups of its operands' producers, merging them. The body's inputs
are the group's outside operands in order of first use (params included), its
outputs the members read outside the group, in schedule order; names are
positional, so the same group always prints the same text.

Reductions may sit anywhere in a group, not only at its end: a group with a
reduction is a row kernel (whole rows of one shape S, the reduced value broadcast
back over the row). So a raw RMSNorm, Qwen3's per-head QK-norm and the MoE
router's top-k renormalisation (sum -> div) are each one kernel, instead of a
reduction kernel writing [T, 1] and a second kernel reading it back.

A producer's group is not joined (and `--explain` says why) when:
- one of its values is read by a node outside the group that runs before the
  joining node: the fused op sits where its last member was, so that reader would
  run before its input exists (this is also what keeps groups convex: a path out
  of the group and back in always passes such a reader);
- a node that writes state (cache_write) or breaks the graph (attention) lies in
  between: computation is not moved across those;
- the shapes have no common iteration space (see op_pointwise_group.py), or a
  keepdim=false reduction would be broadcast along the wrong dims.
A reduction over other dims, or over a row of symbolic length, that reads a group
value is refused too. Groups of one op are left alone (no memory traffic saved).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from braze.ir import BrazeError, Graph, Node, Value, print_graph
from braze.ir.op_pointwise_group import (Space, join_spaces, node_space, reduced_value_use,
                                         reduces_rows)

from .manager import PassContext, register_pass


@dataclass(eq=False)
class _Group:
    nodes: list[Node]
    space: Space
    epoch: int                     # how many writing / graph-breaking nodes run before it
    # (value, reader) for reads of members' results by nodes outside the group, so far
    ext: list[tuple[Value, Node]] = field(default_factory=list)


def _describe(v: Value) -> str:
    return f"{v.ref} ({v.producer.op})" if v.producer is not None else v.ref


@register_pass("fuse-pointwise", stage="group")
def fuse_pointwise(g: Graph, ctx: PassContext) -> int:
    pos = {n: i for i, n in enumerate(g.nodes)}
    group_of: dict[Node, _Group] = {}
    barriers: list[Node] = []
    for n in g.nodes:
        if n.opdef.writes or n.opdef.graph_break:
            barriers.append(n)
            continue
        try:
            space = node_space(n)
        except BrazeError as e:
            if reduces_rows(n.op) and any(v.producer in group_of for v in n.operands):
                ctx.refuse(n, f"not fused with its input's group: {e}")
            continue
        _place(g, n, space, len(barriers), barriers, pos, group_of, ctx)

    groups = {id(gr): gr for gr in group_of.values() if len(gr.nodes) >= 2}.values()
    count, texts = 0, {}
    for gr in sorted(groups, key=lambda gr: pos[gr.nodes[-1]]):
        count += _rewrite(g, gr.nodes, texts)
    return count


def _place(g: Graph, n: Node, space: Space, epoch: int, barriers: list[Node], pos: dict,
           group_of: dict, ctx: PassContext) -> None:
    """Put `n` into the groups of its operands' producers that it can join, or a new group."""
    producers: list[_Group] = []
    for v in n.operands:
        gr = group_of.get(v.producer)
        if gr is not None and gr not in producers:
            producers.append(gr)
    reasons, joinable = [], []
    for gr in producers:
        why = _closed(gr, n, epoch, barriers, pos)
        if why:
            reasons.append(why)
        else:
            joinable.append(gr)
    take: list[_Group] = []
    for gr in sorted(joinable, key=lambda gr: -len(gr.nodes)):
        try:
            joined = join_spaces(space, gr.space)
            why = reduced_value_use(n, {v.producer for v in n.operands
                                        if group_of.get(v.producer) is gr})
            if why:
                raise BrazeError(why)
        except BrazeError as e:
            reasons.append(f"not joined with the group of {_describe(gr.nodes[-1].results[0])}: {e}")
            continue
        space = joined
        take.append(gr)
    if reasons:
        ctx.refuse(n, "; ".join(reasons))
    own_ext = [(n.results[0], u) for u in g.users(n.results[0])]
    if not take:
        group_of[n] = _Group([n], space, epoch, own_ext)
        return
    base = take[0]                 # the largest absorbs the rest: long chains stay linear-time
    for gr in take[1:]:
        base.nodes += gr.nodes
        for m in gr.nodes:
            group_of[m] = base
    if len(take) > 1:
        base.nodes.sort(key=pos.__getitem__)
    base.nodes.append(n)
    base.ext = [(v, u) for gr in take for (v, u) in gr.ext if u is not n] + own_ext
    base.space = space
    group_of[n] = base


def _closed(gr: _Group, n: Node, epoch: int, barriers: list[Node], pos: dict) -> str | None:
    """Why `n` cannot join `gr` whatever the shapes, or None."""
    last = gr.nodes[-1].results[0]
    for v, u in gr.ext:
        if u is not n and pos[u] < pos[n]:
            return (f"not joined with the group of {_describe(last)}: {v.ref} is read by "
                    f"{u.op} ({', '.join(r.ref for r in u.results) or 'no result'}) before "
                    f"{n.results[0].ref}, and the fused op would sit after that reader")
    if gr.epoch != epoch:
        b = barriers[epoch - 1]
        kind = "writes state" if b.opdef.writes else "is a graph break"
        return (f"not joined with the group of {_describe(last)}: {b.op} runs in between and "
                f"{kind}; computation is not moved across it")
    return None


def _rewrite(g: Graph, members: list[Node], texts: dict) -> int:
    """Replace `members` (in schedule order) by one fused_pointwise node where the last one was."""
    inside = set(members)
    graph_outputs = set(g.outputs.values())
    outputs = [m.results[0] for m in members
               if m.results[0] in graph_outputs
               or any(u not in inside for u in g.users(m.results[0]))]
    if not outputs:
        return 0                   # nothing reads the group: dead code is canonicalize's job
    inputs: list[Value] = []
    for m in members:
        for v in m.operands:
            if v.producer not in inside and v not in inputs:
                inputs.append(v)

    text = _body_text(members, inputs, outputs, texts)
    at = g.index(members[-1]) + 1
    anchor = g.nodes[at] if at < len(g.nodes) else None
    for m in members:
        g.erase_node(m)
    with g.inserting_before(anchor):
        fused = g.add_node("fused_pointwise", inputs, {"body": text},
                           names=[v.name for v in outputs], types=[v.type for v in outputs])
    for old, new in zip(outputs, fused.results):
        g.replace_all_uses(old, new)
    return 1


def _body_text(members: list[Node], inputs: list[Value], outputs: list[Value], texts: dict) -> str:
    """The body's IR text; layers repeat the same groups, so equal structures print once."""
    local = {v: f"%in{k}" for k, v in enumerate(inputs)}
    local.update((m.results[0], i) for i, m in enumerate(members))
    key = (tuple(v.type for v in inputs), tuple(local[v] for v in outputs),
           tuple((m.op, repr(m.attrs), tuple(local[v] for v in m.operands), m.results[0].type)
                 for m in members))
    if key not in texts:
        body = Graph("group")
        env = {v: body.add_input(f"in{k}", v.type) for k, v in enumerate(inputs)}
        for m in members:
            node = body.add_node(m.op, [env[v] for v in m.operands], m.attrs,
                                 types=[m.results[0].type])
            env[m.results[0]] = node.results[0]
        for k, v in enumerate(outputs):
            body.set_output(f"out{k}", env[v])
        texts[key] = print_graph(body)
    return texts[key]
