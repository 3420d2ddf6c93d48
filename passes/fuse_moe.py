"""fuse-moe: the dense reference MoE (every expert on every token) -> `fused_moe`, O(top_k).

models/moe.py writes a mixture of experts densely: all E experts run on all T
tokens and a sparse routing matrix (zero where a token did not pick the expert)
weights their sum. This pass recognises that subgraph and replaces it with one
`fused_moe` op that routes first and runs each token through its top_k experts
only (see ir/op_moe.py). The gate and up expert weights are concatenated at
compile time into one derived parameter, so the artifact ships the merged
[E, 2I, H] weight and the kernel does one GEMM for both.

Before (Qwen3-MoE, float32):
    %68: f32[T, 4] = linear(%67, @model.layers.0.mlp.gate.weight)
    %69: f32[T, 4] = softmax(%68) {dim=-1, dtype="f32"}
    %70: f32[T, 2], %71: i64[T, 2] = topk(%69) {k=2}
    %72: f32[T, 1] = sum(%70) {dims=[-1], keepdim=true}
    %73: f32[T, 2] = div(%70, %72)
    %74: f32[T, 4] = full_like(%69) {value=0.0}
    %75: f32[T, 4] = scatter(%74, %71, %73) {dim=1}
    %76: f32[T, 4] = cast(%75) {dtype="f32"}
    %77: f32[T, 4, 32] = einsum(%67, @model.layers.0.mlp.experts.gate_proj) {equation="th,eih->tei"}
    %78: f32[T, 4, 32] = einsum(%67, @model.layers.0.mlp.experts.up_proj) {equation="th,eih->tei"}
    %79: f32[T, 4, 32] = silu(%77)
    %80: f32[T, 4, 32] = mul(%79, %78)
    %81: f32[T, 4, 64] = einsum(%80, @model.layers.0.mlp.experts.down_proj) {equation="tei,ehi->teh"}
    %82: f32[T, 64] = einsum(%76, %81) {equation="te,teh->th"}
After:
    param @model.layers.0.mlp.experts.gate_up_proj: f32[4, 64, 64] = cat(@model.layers.0.mlp.experts.gate_proj, @model.layers.0.mlp.experts.up_proj) {dim=1}
    %227: f32[T, 64] = fused_moe(%67, @model.layers.0.mlp.gate.weight, @model.layers.0.mlp.experts.gate_up_proj, @model.layers.0.mlp.experts.down_proj) {top_k=2, renormalize=true}

The renormalisation (sum/div) is optional (Qwen3-MoE `norm_topk_prob=False`),
and so is the cast of the routing matrix (a float32 model's no-op cast may be
gone). The activation may be silu, relu, gelu or tanh-gelu. Dense MLP layers of
an MoE model (Qwen3-MoE `mlp_only_layers`) are linears, not this pattern, and
stay as they are. If `merge-projections` ever merged the router into a bigger
linear on the same input, the router weight is recovered from the merged
weight's `cat` recipe.

Any other router whose routing matrix is a scatter of [T, k] weights at top-k expert ids
(DeepSeek-V3's: sigmoid scores, e_score_correction_bias, group-limited top-k, scaled
weights) becomes `fused_moe_routed(x, weights, ids, w_gate_up, w_down)`: the router stays
in the graph as ordinary ops on [T, E] (fuse-grouped-topk, next, makes DeepSeek-V3's one
`grouped_topk` op), the experts run O(top_k).

Gemma 4's MoE block (beside its dense MLP) routes on another input than its experts
read (the residual normed without a weight and scaled, vs. normed with a weight) and
multiplies the scattered routing weights by a per-expert scale parameter:
    %r: f32[T, E] = scatter(%zeros, %ids, %w) {dim=1}
    %s: f32[T, E] = mul(%r, @model.layers.0.router.per_expert_scale)
    ... einsum(cast(%s), %expert_out) ...
becomes `fused_moe(%x, @router, @gate_up, @down, %router_x, @per_expert_scale)`.

Expert parallelism (passes/shard.py, `--expert-parallel`): the combine reads the routing
matrix narrowed to the rank's experts, `index_select(routing, @ep.experts) {dim=1}`, and the
expert weights hold only those experts; the fused op gets `@ep.experts` as its last operand
and `local_experts` (ir/op_moe.py), and still routes over all E experts.

Refused, with the reason (`--explain`): every 2-operand einsum of a [T, E] and
a [T, E, H] operand that is not exactly this form, e.g. a different einsum
equation, a routing matrix that is not a scatter of top-k weights into zeros,
a router softmax not in float32, or an intermediate (router logits, expert
outputs) that something else also reads.
"""

from __future__ import annotations

from braze.ir import Graph, Node, Value, get_op

from .manager import PassContext, register_pass
from .pattern import Op, Var, match
from .rewrite import Rewriter, Rule, rewrite

_LAST = (-1, 1)          # the last dim of a rank-2 value, spelt either way


def _local(routing: Op, local: bool) -> Op:
    """Expert parallelism (passes/shard.py): the routing narrowed to this rank's experts."""
    if not local:
        return routing
    return Op("index_select", routing, Var("expert_ids", kind="param"),
              dim=Var("local_dim", where=lambda d: d in _LAST), name="local")


def _dense_moe(cast: bool, renorm: bool, scaled: bool = False, local: bool = False) -> Op:
    """The dense form, with or without the routing cast, the renormalisation and Gemma 4's
    per-expert scale. (Separate patterns rather than `Opt`s, so that a refusal names the
    deepest mismatch.)"""
    x = Var("x")
    softmax = Op("softmax", Var("logits"), dim=Var("softmax_dim", where=lambda d: d in _LAST),
                 name="softmax")
    topk_w = Op("topk", softmax, k=Var("k"), dim=Var("topk_dim", where=lambda d: d in _LAST),
                largest=True, name="topk_w")
    topk_i = Op("topk", Var("probs_again"), result=1, name="topk_i")
    weights = topk_w
    if renorm:
        total = Op("sum", topk_w, dims=Var("sum_dims", where=lambda d: list(d) in ([-1], [1])),
                   keepdim=True)
        weights = Op("div", topk_w, total, name="renorm")
    routing = Op("scatter", Op("full_like", Var("zeros_of"), value=0.0), topk_i, weights,
                 dim=Var("scatter_dim", where=lambda d: d in _LAST), name="scatter")
    if scaled:
        routing = Op("mul", routing, Var("expert_scale", kind="param"))
    if cast:
        routing = Op("cast", routing, dtype=Var("routing_dtype"))
    routing = _local(routing, local)
    gate = Op("einsum", x, Var("w_gate", kind="param"), equation="th,eih->tei")
    up = Op("einsum", x, Var("w_up", kind="param"), equation="th,eih->tei")
    act = Op(("silu", "relu", "gelu"), gate, name="act")
    down = Op("einsum", Op("mul", act, up), Var("w_down", kind="param"), equation="tei,ehi->teh")
    return Op("einsum", routing, down, equation="te,teh->th")


PATTERNS = {(c, r, sc, lo): _dense_moe(c, r, sc, lo) for c in (False, True)
            for r in (False, True) for sc in (False, True) for lo in (False, True)}


def _routed_moe(cast: bool, local: bool = False) -> Op:
    """The dense form over a routing matrix that is a scatter of any [T, k] weights at
    top-k expert ids (the router itself stays in the graph: DeepSeek-V3's)."""
    x = Var("x")
    routing = Op("scatter", Op("full_like", Var("zeros_of"), value=0.0), Var("ids"),
                 Var("weights"), dim=Var("scatter_dim", where=lambda d: d in _LAST),
                 name="scatter")
    if cast:
        routing = Op("cast", routing, dtype=Var("routing_dtype"))
    routing = _local(routing, local)
    gate = Op("einsum", x, Var("w_gate", kind="param"), equation="th,eih->tei")
    up = Op("einsum", x, Var("w_up", kind="param"), equation="th,eih->tei")
    act = Op(("silu", "relu", "gelu"), gate, name="act")
    down = Op("einsum", Op("mul", act, up), Var("w_down", kind="param"), equation="tei,ehi->teh")
    return Op("einsum", routing, down, equation="te,teh->th")


ROUTED = {(c, lo): _routed_moe(c, lo) for c in (False, True) for lo in (False, True)}


def _routing_of(root: Node) -> tuple[Value, bool]:
    """The combine's routing operand under an expert-parallel index_select, and whether
    there was one."""
    routing = root.operands[0]
    node = routing.producer
    if node is not None and node.op == "index_select" and node.operands[1].kind == "param":
        return node.operands[0], True
    return routing, False


def _expert_operands(m, table_cols: int, wg: Value) -> tuple[list, dict] | str:
    """With expert parallelism: the trailing expert_ids operand and local_experts, after
    checking the rank's expert weights against them."""
    ids = m.get("expert_ids")
    if ids is None:
        return [], {}
    local = ids.type.shape[0]
    if ids.type.rank != 1 or ids.type.dtype not in ("i64", "i32") or wg.type.shape[0] != local:
        return (f"the routing is narrowed by {ids.ref} {ids.type}, not to the "
                f"{wg.type.shape[0]} experts of {wg.ref}")
    if not isinstance(table_cols, int) or table_cols % local:
        return f"{local} local experts do not divide the routing's {table_cols} columns"
    return [ids], {"local_experts": local}


def _pattern_for(root: Node) -> Op:
    """Pick the variant by peeking at the routing operand's producers."""
    def made_by(v: Value, op: str) -> bool:
        return v.producer is not None and v.producer.op == op
    routing, local = _routing_of(root)
    cast = made_by(routing, "cast")
    scatter = routing.producer.operands[0] if cast else routing
    scaled = made_by(scatter, "mul")
    if scaled:
        scatter = next((o for o in scatter.producer.operands if made_by(o, "scatter")), scatter)
    renorm = made_by(scatter, "scatter") and len(scatter.producer.operands) == 3 \
        and made_by(scatter.producer.operands[2], "div")
    return PATTERNS[(cast, renorm, scaled, local)]


def _fuse_routed(root: Node, rw: Rewriter) -> int | str | None:
    """The routed form (a scatter of top-k ids and weights the graph computed) ->
    fused_moe_routed; None where the routing matrix is not such a scatter at all."""
    g = rw.g
    routing, local = _routing_of(root)
    cast = routing.producer is not None and routing.producer.op == "cast"
    m = match(ROUTED[cast, local], root.results[0], g)
    if not m:
        return None
    ids, weights, xv = m["ids"], m["weights"], m["x"]
    topk = ids.producer
    if topk is None or topk.op != "topk" or topk.results[1] is not ids:
        return (f"the expert ids {ids.ref} do not come from a topk (the fused dispatch needs "
                f"distinct experts per token)")
    table = m["scatter"].results[0].type
    if table.dtype not in ("f32", xv.type.dtype):
        return (f"the routing matrix is built in {table.dtype}, which would round the "
                f"weights differently from a cast to {xv.type.dtype}")
    wg, wu, wd = m["w_gate"], m["w_up"], m["w_down"]
    if wg.type != wu.type:
        return f"gate {wg.ref} {wg.type} and up {wu.ref} {wu.type} expert weights differ in shape"
    ep = _expert_operands(m, table.shape[1], wg)
    if isinstance(ep, str):
        return ep
    ep_ids, ep_attrs = ep
    if ids.type.rank != 2 or (not ep_ids and table.shape[1] != wg.type.shape[0]):
        return f"the routing matrix {table} does not have one column per expert of {wg.ref}"
    act_node = m["act"]
    act_name = act_node.op
    if act_node.op == "gelu":
        act_name = {"none": "gelu", "tanh": "gelu_tanh"}.get(act_node.attrs["approximate"])
        if act_name is None:
            return f"gelu approximate={act_node.attrs['approximate']!r} has no fused form"
    e, i, h = wg.type.shape
    gate_up_type = wg.type.with_shape((e, 2 * i, h)) if isinstance(i, int) else wg.type
    try:
        get_op("fused_moe_routed").infer([xv.type, weights.type, ids.type, gate_up_type,
                                          wd.type] + [v.type for v in ep_ids],
                                         {"act": act_name, **ep_attrs})
    except Exception as err:
        return str(err)
    w_gate_up = _gate_up_param(g, wg, wu)
    with g.inserting_before(root):
        out = g.op("fused_moe_routed", xv, weights, ids, w_gate_up, wd, *ep_ids, act=act_name,
                   **ep_attrs)
    rw.replace(root.results[0], out, dead=m.nodes)
    return 1


def _is_candidate(node: Node) -> bool:
    """Any einsum that combines per-expert outputs [T, E, H] with [T, E] weights, in either order."""
    return (node.op == "einsum" and len(node.operands) == 2 and node.results[0].type.rank == 2
            and sorted(v.type.rank for v in node.operands) == [2, 3])


# after merge-projections: a router merged into a bigger linear is recovered (below)
@register_pass("fuse-moe", after=("merge-projections",))
def fuse_moe(g: Graph, ctx: PassContext) -> int:
    """Dense reference MoE (router, top-k, scatter, all-expert einsums) -> fused_moe."""
    return rewrite(g, ctx, [Rule("einsum", _fuse, explain="not a dense MoE: ")])


def _fuse(root: Node, rw: Rewriter) -> str | int | None:
    if not _is_candidate(root):
        return None
    g = rw.g
    m = match(_pattern_for(root), root.results[0], g)
    if not m:
        routed = _fuse_routed(root, rw)
        return routed if isinstance(routed, int) else (routed or m.reason)
    if m["topk_w"] is not m["topk_i"]:     # not fused_moe's routing, but a routed MoE
        routed = _fuse_routed(root, rw)
        return routed if isinstance(routed, int) else (
            routed or "the routing weights and the expert ids come from two different topk nodes")
    xv, probs = m["x"], m["softmax"].results[0]
    if probs.type.dtype != "f32":
        return f"the router softmax is in {probs.type.dtype}; fused_moe routes in f32"
    table = m["scatter"].results[0].type
    if table.shape != probs.type.shape:
        return f"the routing matrix is {table}, the router probabilities {probs.type}"
    if table.dtype not in ("f32", xv.type.dtype):
        return (f"the routing matrix is built in {table.dtype}, which would round the "
                f"weights differently from a cast to {xv.type.dtype}")
    router = _router_weight(g, m["logits"], m["softmax"], xv)
    if isinstance(router, str):
        return router
    router_w, router_nodes, router_x = router
    scale = m.get("expert_scale")
    if scale is not None and (scale.type.shape != (probs.type.shape[1],)
                              or scale.type.dtype != xv.type.dtype):
        return (f"the per-expert scale {scale.ref} is {scale.type}, not [{probs.type.shape[1]}] "
                f"in {xv.type.dtype}")
    extra = [router_x] if router_x is not xv or scale is not None else []
    extra += [scale] if scale is not None else []
    wg, wu, wd = m["w_gate"], m["w_up"], m["w_down"]
    ep = _expert_operands(m, table.shape[1], wg)
    if isinstance(ep, str):
        return ep
    extra += ep[0]
    if wg.type != wu.type:
        return f"gate {wg.ref} {wg.type} and up {wu.ref} {wu.type} expert weights differ in shape"
    act_node = m["act"]
    act_name = act_node.op
    if act_node.op == "gelu":
        act_name = {"none": "gelu", "tanh": "gelu_tanh"}.get(act_node.attrs["approximate"])
        if act_name is None:
            return f"gelu approximate={act_node.attrs['approximate']!r} has no fused form"
    attrs = {"top_k": m["k"], "renormalize": m.get("renorm") is not None, "act": act_name,
             **ep[1]}
    e, i, h = wg.type.shape
    gate_up_type = wg.type.with_shape((e, 2 * i, h)) if isinstance(i, int) else wg.type
    try:   # the op's own shape rules decide, before the graph is touched
        get_op("fused_moe").infer([xv.type, router_w.type, gate_up_type, wd.type]
                                  + [v.type for v in extra], attrs)
    except Exception as err:
        return str(err)

    w_gate_up = _gate_up_param(g, wg, wu)
    with g.inserting_before(root):
        out = g.op("fused_moe", xv, router_w, w_gate_up, wd, *extra, **attrs)
    rw.replace(root.results[0], out, dead=m.nodes + router_nodes)
    return 1


def _router_weight(g: Graph, logits: Value, softmax: Node, xv: Value):
    """(router weight, nodes that only computed the logits, the router's input) or why the
    logits are not r @ W.T. The router's input r is x, or (Gemma 4) another [T, H] value
    computed before the MoE's first expert GEMM."""
    if g.users(logits) != [softmax] or logits in g.outputs.values():
        return f"the router logits {logits.ref} are also used outside the MoE"
    node, rows = logits.producer, None
    if node is not None and node.op in ("split", "slice") and node.attrs["dim"] in _LAST:
        # a router merged into a bigger linear on x: logits are rows [start, end) of it
        if node.op == "split":
            at = node.results.index(logits)
            start = sum(node.attrs["sizes"][:at])
            rows = (start, start + node.attrs["sizes"][at])
        elif node.attrs["step"] == 1 and (node.attrs["start"] or 0) >= 0:
            start = node.attrs["start"] or 0
            rows = (start, start + logits.type.shape[1])
        node = node.operands[0].producer if rows else None
    if node is None or node.op != "linear" or len(node.operands) != 2:
        return f"the router logits {logits.ref} are not linear(x, @weight) without a bias"
    rx = node.operands[0]
    if rx is not xv and (rx.type.shape != xv.type.shape or rx.type.dtype != xv.type.dtype):
        return f"the router reads {rx.ref} {rx.type}, the experts read {xv.ref} {xv.type}"
    if rx is not xv and rows is not None:
        return f"the router reads {rx.ref}, not the experts' {xv.ref}, through a merged linear"
    w = node.operands[1]
    if w.kind != "param":
        return f"the router weight {w.ref} is not a parameter"
    if rows is None:
        return w, [node], rx
    recipe = w.recipe
    if recipe is not None and recipe.op == "cat" and recipe.attrs["dim"] in (0, -2):
        offset = 0
        for part in recipe.operands:
            if (offset, offset + part.type.shape[0]) == rows:
                return part, [logits.producer] if logits.producer.op == "slice" else [], xv
            offset += part.type.shape[0]
    return f"the router logits are rows {rows} of {w.ref}, which is not a concatenation holding them"


def _gate_up_param(g: Graph, wg: Value, wu: Value) -> Value:
    """The [E, 2I, H] concatenation of gate and up expert weights, declared once."""
    for p in g.params.values():
        r = p.recipe
        if r is not None and r.op == "cat" and r.operands == (wg, wu) and r.attrs["dim"] == 1:
            return p
    base = wg.name[:-len("gate_proj")] + "gate_up_proj" if wg.name.endswith(".gate_proj") \
        else wg.name + ".gate_up"
    return g.add_derived_param(g.unique_param_name(base), "cat", [wg, wu], {"dim": 1})
