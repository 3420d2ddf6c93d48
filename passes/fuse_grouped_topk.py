"""fuse-grouped-topk: DeepSeek-V3's traced router -> one `grouped_topk` op (ir/op_router.py).

fuse-moe leaves DeepSeek-V3's grouped sigmoid router in the graph as ordinary ops on
[T, E] and fuses only the experts (`fused_moe_routed`). Traced, the router is about ten
launches per MoE layer; this pass turns it into one op, one kernel (codegen/kernels/router.py).

Before (n_group 4, topk_group 2, top_k 2, renormalised, routed_scaling_factor 2.5):
    %160: f32[T, 8] = sigmoid(%216)
    %161: f32[T, 8] = add(%160, @model.layers.1.mlp.gate.e_score_correction_bias)
    %162: f32[T, 4, 2] = reshape(%161) {shape=[-1, 4, 2]}
    %163: f32[T, 4, 2], %164: i64[T, 4, 2] = topk(%162) {k=2}
    %165: f32[T, 4] = sum(%163) {dims=[-1]}
    %166: f32[T, 2], %167: i64[T, 2] = topk(%165) {k=2}
    %168: f32[T, 1] = slice(%166) {dim=1, start=1}
    %169: bool[T, 4] = ge(%165, %168)
    %170: bool[T, 4, 1] = unsqueeze(%169) {dim=2}
    %171: f32[T, 4, 2] = full_like(%162) {value=-inf}
    %172: f32[T, 4, 2] = where(%170, %162, %171)
    %173: f32[T, 8] = reshape(%172) {shape=[-1, 8]}
    %174: f32[T, 2], %175: i64[T, 2] = topk(%173) {k=2}
    %176: f32[T, 2] = gather(%160, %175) {dim=1}
    %177: f32[T, 1] = sum(%176) {dims=[-1], keepdim=true}
    %178: f32[T, 1] = add(%177) {scalar=1e-20}
    %179: f32[T, 2] = div(%176, %178)
    %180: f32[T, 2] = mul(%179) {scalar=2.5}
    %219: f32[T, 64] = fused_moe_routed(%157, %180, %175, ...)
After:
    %180: f32[T, 2], %175: i64[T, 2] = grouped_topk(%216, @model.layers.1.mlp.gate.e_score_correction_bias) {n_group=4, topk_group=2, top_k=2, renormalize=true, scale=2.5}
    %219: f32[T, 64] = fused_moe_routed(%157, %180, %175, ...)

Without groups (n_group 1) the reshape/group steps are absent; the renormalisation
(sum, + 1e-20, div) and the scale (a routed_scaling_factor of 1 may be gone) are optional.

One deliberate difference on ties: the model's reference form keeps every group whose
score ties the topk_group-th best (`ge`), the fused op keeps exactly topk_group groups,
the lower group id first, as transformers' DeepseekV3TopkRouter (torch.topk + scatter)
does on distinct values. With real-valued scores such ties do not happen.

Refused, with the reason (`--explain`): a topk whose ids index a gather of sigmoid
scores (the shape of this router) but that is not exactly this form, e.g. scores or
logits not in float32, a renormalisation with another epsilon, a group selection other
than "ge the topk_group-th best", or an intermediate something else also reads.
"""

from __future__ import annotations

from braze.ir import Graph, Node, Value, get_op
from braze.ir.op_router import RENORM_EPS

from .manager import PassContext, register_pass
from .pattern import Op, Opt, Var, match
from .rewrite import Rewriter, Rule, rewrite

_LAST2 = (-1, 1)          # the last dim of a rank-2 value, spelt either way
_LAST3 = (-1, 2)


def _router(grouped: bool, renorm: bool, scaled: bool) -> Op:
    scores = Op("sigmoid", Var("logits"), name="sigmoid")
    choice = Op("add", scores, Var("bias"), name="biased")
    if grouped:
        per_group = Op("reshape", choice, name="grouped")
        best2 = Op("topk", per_group, k=2, dim=Var("best2_dim", where=lambda d: d in _LAST3),
                   largest=True)
        group_scores = Op("sum", best2, dims=Var("gs_dims", where=lambda d: list(d) in ([-1], [2])),
                          keepdim=False, name="group_scores")
        best_groups = Op("topk", group_scores, k=Var("topk_group"),
                         dim=Var("gt_dim", where=lambda d: d in _LAST2), largest=True)
        # the topk_group-th best (with topk_group 1 canonicalize drops the whole-range slice)
        kth = Opt(Op("slice", best_groups, dim=Var("kth_dim", where=lambda d: d in _LAST2),
                     start=Var("kth_start"), end=Var("kth_end"), step=1), best_groups)
        keep = Op("unsqueeze", Op("ge", group_scores, kth),
                  dim=Var("keep_dim", where=lambda d: d in _LAST3))
        masked = Op("where", keep, per_group, Op("full_like", per_group, value=float("-inf")))
        choice = Op("reshape", masked, name="flat")
    ids = Op("topk", choice, k=Var("top_k"), dim=Var("topk_dim", where=lambda d: d in _LAST2),
             largest=True, result=1, name="expert_topk")
    w = Op("gather", scores, ids, dim=Var("gather_dim", where=lambda d: d in _LAST2),
           name="gather")
    if renorm:
        total = Op("sum", w, dims=Var("sum_dims", where=lambda d: list(d) in ([-1], [1])),
                   keepdim=True)
        w = Op("div", w, Op("add", total, scalar=Var("eps")), name="renorm")
    if scaled:
        w = Op("mul", w, scalar=Var("scale"), name="scaled")
    return w


PATTERNS = {(g, r, s): _router(g, r, s) for g in (False, True) for r in (False, True)
            for s in (False, True)}


@register_pass("fuse-grouped-topk", after=("fuse-moe",), before=("fuse-pointwise",))
def fuse_grouped_topk(g: Graph, ctx: PassContext) -> int:
    """DeepSeek-V3's grouped sigmoid router (sigmoid, bias, group top-k, top-k, gather,
    renormalise, scale) -> grouped_topk."""
    return rewrite(g, ctx, [Rule("topk", _fuse, explain="not a grouped sigmoid router: ")])


def _only_user(g: Graph, v: Value, op: str) -> Node | None:
    users = g.users(v)
    return users[0] if len(users) == 1 and users[0].op == op else None


def _fuse(node: Node, rw: Rewriter) -> int | str | None:
    g = rw.g
    ids = node.results[1]
    gather = next((u for u in g.users(ids) if u.op == "gather" and u.operands[1] is ids
                   and u.operands[0].producer is not None
                   and u.operands[0].producer.op == "sigmoid"), None)
    if gather is None:
        return None                    # not a router's expert choice at all
    # the variant: peek at what reads the gathered scores
    root = gather.results[0]
    renorm = any(u.op == "div" for u in g.users(root))
    if renorm:
        root = next(u for u in g.users(root) if u.op == "div").results[0]
    scale_node = _only_user(g, root, "mul")
    scaled = scale_node is not None and len(scale_node.operands) == 1
    if scaled:
        root = scale_node.results[0]
    src = node.operands[0].producer
    grouped = src is not None and src.op == "reshape"
    m = match(PATTERNS[grouped, renorm, scaled], root, g, escapes=(ids,))
    if not m:
        return m.reason
    if m["expert_topk"] is not node:
        return f"the gathered ids come from another topk than {ids.ref}"
    logits, bias = m["logits"], m["bias"]
    lt = logits.type
    if lt.rank != 2 or lt.dtype != "f32":
        return f"the router logits {logits.ref} are {lt}; grouped_topk scores f32 [T, E] logits"
    e = lt.shape[1]
    if renorm and m["eps"] != RENORM_EPS:
        return (f"the renormalisation adds {m['eps']!r} to the sum; grouped_topk adds "
                f"{RENORM_EPS!r} (DeepSeek-V3's)")
    attrs = {"n_group": 1, "topk_group": 1, "top_k": m["top_k"], "renormalize": renorm,
             "scale": float(m["scale"]) if scaled else 1.0}
    if grouped:
        gt = m["grouped"].results[0].type
        if gt.rank != 3 or gt.shape[0] != lt.shape[0] or not all(isinstance(d, int) for d in gt.shape[1:]) \
                or not isinstance(e, int) or gt.shape[1] * gt.shape[2] != e:
            return f"the choice is grouped as {gt}, not [T, n_group, E / n_group] of {lt}"
        if m["flat"].results[0].type != lt:
            return f"the masked choice is reshaped to {m['flat'].results[0].type}, not {lt}"
        tg = m["topk_group"]
        sliced = "kth_start" in m.bindings
        if not sliced and tg != 1:
            return (f"the kept groups are those >= all {tg} best; grouped_topk keeps the "
                    f"{tg} best (>= the {tg}-th best)")
        if sliced and (m["kth_start"] != tg - 1 or m["kth_end"] not in (None, tg)):
            return (f"the kept groups are those >= slice [{m['kth_start']}:{m['kth_end']}] of "
                    f"the {tg} best; grouped_topk keeps the {tg} best (slice [{tg - 1}:])")
        attrs.update(n_group=gt.shape[1], topk_group=tg)
    try:     # the op's own rules decide, before the graph is touched
        get_op("grouped_topk").infer([lt, bias.type], attrs)
    except Exception as err:
        return str(err)
    first = min(m.nodes, key=g.index)
    rw.rebuild(first, m.nodes, "grouped_topk", [logits, bias], attrs, replacing=[root, ids])
    return 1
