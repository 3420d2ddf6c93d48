"""merge-projections: linears that read the same value -> one linear and a split.

Attention's q/k/v projections all read the normed hidden state, and so do a
dense MLP's gate and up projections. One GEMM over the concatenated weight
reads the activations once and launches once; the weights are concatenated at
compile time (a derived param, so the artifact ships the merged weight).

Before:
    %19: f32[T, 64] = mul(@model.layers.0.input_layernorm.weight, %18)
    %20: f32[T, 64] = linear(%19, @model.layers.0.self_attn.q_proj.weight)
    %21: f32[T, 4, 16] = reshape(%20) {shape=[-1, 4, 16]}
    %22: f32[T, 32] = linear(%19, @model.layers.0.self_attn.k_proj.weight)
    %23: f32[T, 2, 16] = reshape(%22) {shape=[-1, 2, 16]}
    %24: f32[T, 32] = linear(%19, @model.layers.0.self_attn.v_proj.weight)
After:
    param @model.layers.0.self_attn.qkv_proj.weight: f32[128, 64] = cat(@model.layers.0.self_attn.q_proj.weight, @model.layers.0.self_attn.k_proj.weight, @model.layers.0.self_attn.v_proj.weight) {dim=0}
    ...
    %19: f32[T, 64] = mul(@model.layers.0.input_layernorm.weight, %18)
    %113: f32[T, 128] = linear(%19, @model.layers.0.self_attn.qkv_proj.weight)
    %114: f32[T, 64], %115: f32[T, 32], %116: f32[T, 32] = split(%113) {sizes=[64, 32, 32], dim=-1}
    %21: f32[T, 4, 16] = reshape(%114) {shape=[-1, 4, 16]}
    %23: f32[T, 2, 16] = reshape(%115) {shape=[-1, 2, 16]}

Mergeable: the weights are params (2-D, one dtype) and the biases are all params
or all absent; the concatenation keeps the linears' schedule order. The merged
linear sits where the first of them was: they all read the same value, so it is
defined there, and the split results exist before any old result was used.
Linears on one value that cannot join the others (computed weight or bias,
another dtype, a bias where the others have none) are refused with the reason;
compatible subsets still merge. A linear alone on its input is not a near miss
and is left alone silently (o_proj, down_proj, the MoE router, the LM head).
"""

from __future__ import annotations

from braze.ir import Graph, Node, Value

from .manager import PassContext, register_pass
from .rewrite import Rewriter, Rule, rewrite

# readable names for the usual families of projections: (parts in order) -> merged part
KNOWN_GROUPS = {
    ("q_proj", "k_proj", "v_proj"): "qkv_proj",
    ("gate_proj", "up_proj"): "gate_up_proj",
}


def merged_name(g: Graph, names: list[str]) -> str:
    """`X.q_proj.weight`, `X.k_proj.weight`, `X.v_proj.weight` -> `X.qkv_proj.weight`;
    otherwise `<common prefix>.merged_<a>_<b>.<common suffix>`."""
    parts = [n.split(".") for n in names]
    shortest = min(len(p) for p in parts)
    pre = 0
    while pre < shortest - 1 and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while suf < shortest - pre - 1 and len({p[-1 - suf] for p in parts}) == 1:
        suf += 1
    middles = ["_".join(p[pre:len(p) - suf]) for p in parts]
    prefix, suffix = parts[0][:pre], parts[0][len(parts[0]) - suf:]
    merged = KNOWN_GROUPS.get(tuple(middles), "merged_" + "_".join(middles))
    return g.unique_param_name(".".join(prefix + [merged] + suffix))


def _why_not(node: Node) -> str | None:
    w = node.operands[1]
    if w.kind != "param":
        return f"weight {w.ref} is computed in the graph, not a param (cannot concatenate at compile time)"
    if w.type.rank != 2:
        return f"weight {w.ref} is {w.type}, not 2-D"
    if len(node.operands) > 2 and node.operands[2].kind != "param":
        return f"bias {node.operands[2].ref} is computed in the graph, not a param"
    return None


def _merge(rw: Rewriter, x: Value, group: list[Node]) -> None:
    g = rw.g
    weights = [n.operands[1] for n in group]
    w = g.add_derived_param(merged_name(g, [v.name for v in weights]), "cat", weights, {"dim": 0})
    extra = []
    if len(group[0].operands) > 2:
        biases = [n.operands[2] for n in group]
        extra = [g.add_derived_param(merged_name(g, [v.name for v in biases]), "cat", biases, {"dim": 0})]
    with g.inserting_before(group[0]):
        y = g.op("linear", x, w, *extra)
        split = g.add_node("split", [y], {"sizes": [v.type.shape[0] for v in weights], "dim": -1})
    rw.replace([n.results[0] for n in group], split.results, dead=group)


@register_pass("merge-projections", stage="merge")
def merge_projections(g: Graph, ctx: PassContext) -> int:
    """linear(x, @a), linear(x, @b), ... -> split(linear(x, cat(@a, @b, ...)))."""
    done: set[Value] = set()

    def merge_on_input(node: Node, rw: Rewriter) -> int:
        """At the first linear on its input x: every linear on x, merged where they can be."""
        x = node.operands[0]
        if x in done:
            return 0
        done.add(x)
        linears = [u for u in dict.fromkeys(g.users(x)) if u.op == "linear" and u.operands[0] is x]
        if len(linears) < 2:
            return 0
        count = 0
        # compatible linears share (dtype, has bias); each such class merges on its own
        classes: dict[tuple, list[Node]] = {}
        for n in linears:
            reason = _why_not(n)
            if reason:
                rw.refuse(n, f"not merged with the other linears on {x.ref}: {reason}")
                continue
            key = (n.operands[1].type.dtype, len(n.operands) > 2)
            classes.setdefault(key, []).append(n)
        for (dtype, bias), group in classes.items():
            if len(group) >= 2:
                _merge(rw, x, group)
                count += 1
                continue
            others = [k for k in classes if k != (dtype, bias)]
            if any(k[0] != dtype for k in others):
                reason = f"its weight is {dtype}, the other linears on {x.ref} are " \
                         f"{'/'.join(sorted({k[0] for k in others if k[0] != dtype}))}"
            elif others:
                reason = (f"it has a bias and the other linears on {x.ref} do not" if bias else
                          f"it has no bias and the other linears on {x.ref} do")
            else:
                reason = f"the only linear on {x.ref} with param weights; nothing to merge it with"
            rw.refuse(group[0], f"not merged: {reason}")
        return count

    return rewrite(g, ctx, [Rule("linear", merge_on_input)])
