"""Mixture of experts as one op: route each token to its top-k experts and run only those.

`fused_moe_routed(x, weights [T, k], ids [T, k], w_gate_up, w_down) {act}` is the same
dispatch for a routing the graph computed itself (DeepSeek-V3's grouped sigmoid router:
fuse-moe fuses only the experts, and fuse-grouped-topk makes the router one `grouped_topk`,
ir/op_router.py).

    %y: bf16[T, H] = fused_moe(%x, @router, @w_gate_up, @w_down) {top_k=2, renormalize=true, act="silu"}
    %y: bf16[T, H] = fused_moe(%x, @router, @w_gate_up, @w_down, %rx, @scale) {...}    (Gemma 4)

    x          [T, H]      the tokens
    router     [E, H]      router (gate) weight: logits = x @ router.T
    w_gate_up  [E, 2I, H]  per expert, the gate rows then the up rows
    w_down     [E, H, I]   per expert, the down projection
    router_x   [T, H]      optional: what the router reads instead of x (Gemma 4 routes on
                           a differently normed residual than its experts see)
    expert_scale [E]       optional (needs router_x): each chosen expert's weight is
                           multiplied by its scale after the renormalisation (Gemma 4)
    expert_ids [L]         with `local_experts=L` (expert parallelism, passes/shard.py):
                           always the LAST operand; this rank holds only L of the E experts,
                           w_gate_up[j] and w_down[j] being expert expert_ids[j], and the ids
                           are consecutive (expert_ids[j] = expert_ids[0] + j). Routing still
                           runs over all E experts (router [E, H]); a token's experts that are
                           not local contribute 0, so the sum of the ranks' results (the
                           `all_reduce` after it) is the whole MoE.

    %y: f32[T, H] = fused_moe(%x, @router, @w_gate_up, @w_down, @ep.experts) {top_k=2, renormalize=true, local_experts=2}

Semantics, exactly those of the dense reference form in models/moe.py:

    probs      = softmax(router_x @ router.T, dtype=f32)     # router_x: x when not given
    w, idx     = topk(probs, top_k)                   # f32 weights, expert ids
    w          = w / w.sum(-1) if renormalize         # in f32
    w          = w * expert_scale[idx]                # f32, when given
    y[t]       = sum_j  w[t, j].to(x.dtype) * expert(idx[t, j], x[t])
    expert(e, v) = act(v @ gate[e].T) * (v @ up[e].T) @ down[e].T     # in x.dtype

The reference implementation does the work the kernel will, O(top_k) per
token: it sorts the (token, expert) pairs by expert, runs each expert's two
GEMMs on only the rows routed to it, scales by the routing weight and adds the
rows back (accumulating in f32, rounding to x.dtype once, as the dense
combine einsum does). `EXPERT_GEMM_ROWS` counts the rows it pushed through
expert GEMMs, so tests can prove it computes T * top_k rows and not T * E.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BrazeError
from .ops import REQUIRED, OpDef, register
from .types import TensorType, is_float

ACTS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
}

# rows pushed through expert GEMMs by the reference impl since the last reset (once per
# expert per row: its gate_up and down GEMMs see the same rows); tests set it to 0
EXPERT_GEMM_ROWS = 0


def _split_experts(types, attrs, op):
    """(the operands without expert_ids, expert_ids' type or None), checked against
    `local_experts`: with it set the last operand is the rank's [L] integer expert ids."""
    local = attrs.get("local_experts", 0)
    if not isinstance(local, int) or local < 0:
        raise BrazeError(f"{op}: local_experts must be a non-negative int, got {local!r}")
    if not local:
        return types, None
    ids = types[-1]
    if ids.rank != 1 or ids.dtype not in ("i64", "i32") or ids.shape[0] != local:
        raise BrazeError(f"{op}: with local_experts={local} the last operand must be the "
                         f"rank's expert ids, integer [{local}]; got {ids}")
    return types[:-1], ids


def _fused_moe_infer(types, attrs):
    types, ids = _split_experts(types, attrs, "fused_moe")
    local = attrs.get("local_experts", 0)
    x, router, gate_up, down, *extra = types
    if extra:
        rx = extra[0]
        if rx.shape != x.shape or rx.dtype != x.dtype:
            raise BrazeError(f"fused_moe: router_x {rx} must match x {x}")
        if len(extra) > 1 and (extra[1].rank != 1 or extra[1].shape[0] != router.shape[0]
                               or extra[1].dtype != x.dtype):
            raise BrazeError(f"fused_moe: expert_scale {extra[1]} must be [{router.shape[0]}] "
                             f"in {x.dtype}")
        types = types[:4]
    if x.rank != 2 or router.rank != 2 or gate_up.rank != 3 or down.rank != 3:
        raise BrazeError(f"fused_moe: want x [T, H], router [E, H], w_gate_up [E, 2I, H], "
                         f"w_down [E, H, I]; got {x}, {router}, {gate_up}, {down}")
    e, h = router.shape
    two_i = gate_up.shape[1]
    if not isinstance(two_i, int) or two_i % 2:
        raise BrazeError(f"fused_moe: w_gate_up {gate_up} must have an even number of rows per expert")
    held = local or e                      # experts whose weights this op holds
    if local and isinstance(e, int) and (e % local):
        raise BrazeError(f"fused_moe: local_experts={local} does not divide the router's "
                         f"{e} experts")
    if x.shape[1] != h or gate_up.shape != (held, two_i, h) or down.shape != (held, h, two_i // 2):
        raise BrazeError(f"fused_moe: shapes disagree: x {x}, router {router}, "
                         f"w_gate_up {gate_up}, w_down {down}")
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1 or not is_float(x.dtype):
        raise BrazeError(f"fused_moe: operands must share one float dtype, got {sorted(dtypes)}")
    k = attrs["top_k"]
    if isinstance(e, int) and not (isinstance(k, int) and 1 <= k <= e):
        raise BrazeError(f"fused_moe: top_k={k!r} must be in 1..{e} (the number of experts)")
    if attrs["act"] not in ACTS:
        raise BrazeError(f"fused_moe: act {attrs['act']!r} is not one of {sorted(ACTS)}")
    return [TensorType(x.shape, x.dtype)]


def route(x, router, top_k: int, renormalize: bool, expert_scale=None):
    """Per token its top_k expert ids and their weights in x's dtype, as the dense form rounds them."""
    probs = torch.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if expert_scale is not None:
        weights = weights * expert_scale[ids]
    return weights.to(x.dtype), ids


def _fused_moe(x, router, w_gate_up, w_down, *extra, top_k, renormalize, act,
               local_experts=0):
    expert_ids = extra[-1] if local_experts else None
    extra = extra[:-1] if local_experts else extra
    router_x = extra[0] if extra else None
    expert_scale = extra[1] if len(extra) > 1 else None
    weights, ids = route(x if router_x is None else router_x, router, top_k, renormalize,
                         expert_scale)
    return _dispatch(x, weights.to(x.dtype), ids, w_gate_up, w_down, act, expert_ids)


def _dispatch(x, weights, ids, w_gate_up, w_down, act, expert_ids=None):
    """Each token through its routed experts only, weighted (weights already in x's dtype).
    With `expert_ids` (expert parallelism) the weights hold experts expert_ids[0] + j only;
    the pairs routed to other experts are left out (they contribute 0)."""
    global EXPERT_GEMM_ROWS
    top_k = ids.shape[1]
    held = w_gate_up.shape[0]
    # align: the (token, slot) pairs sorted by expert, so each expert reads one contiguous run
    flat = ids.reshape(-1)
    if expert_ids is not None:       # local ids; every other expert goes to bucket `held`
        flat = flat - expert_ids.reshape(-1)[:1].to(flat.dtype)
        flat = torch.where((flat >= 0) & (flat < held), flat, held)
    order = torch.argsort(flat, stable=True)
    tokens = order // top_k
    pair_weights = weights.reshape(-1)[order]
    counts = torch.bincount(flat, minlength=held + 1).tolist()[:held]
    inter = w_gate_up.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = tokens[start:start + n]
        gate_up = F.linear(x[rows], w_gate_up[e])
        h = ACTS[act](gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w_down[e])
        out.index_add_(0, rows, y.float() * pair_weights[start:start + n, None].float())
        EXPERT_GEMM_ROWS += n
        start += n
    return out.to(x.dtype)


register(OpDef(
    "fused_moe", ("x", "router", "w_gate_up", "w_down", "router_x?", "expert_scale?",
                  "expert_ids?"),
    _fused_moe_infer, _fused_moe,
    attrs={"top_k": REQUIRED, "renormalize": REQUIRED, "act": "silu", "local_experts": 0},
    doc="top-k routed mixture of experts: softmax(f32) router, top_k, optional renormalisation, "
        "per-expert act(x Wg^T) * (x Wu^T) Wd^T weighted by the routing weight in x's dtype"))


def _routed_infer(types, attrs):
    types, expert_ids = _split_experts(types, attrs, "fused_moe_routed")
    if len(types) != 5:
        raise BrazeError(f"fused_moe_routed: takes x, weights, ids, w_gate_up, w_down (and, "
                         f"with local_experts, expert_ids); got {len(types)} operands")
    x, weights, ids, gate_up, down = types
    if weights.rank != 2 or ids.shape != weights.shape or ids.dtype not in ("i64", "i32") \
            or weights.shape[0] != x.shape[0] or not is_float(weights.dtype):
        raise BrazeError(f"fused_moe_routed: want weights [T, k] (float) and ids [T, k] "
                         f"(integer) for x {x}; got {weights}, {ids}")
    e = gate_up.shape[0]
    k = weights.shape[1]
    if expert_ids is None and isinstance(e, int) and not (isinstance(k, int) and 1 <= k <= e):
        raise BrazeError(f"fused_moe_routed: {k} experts per token, but {e} experts")
    if expert_ids is not None and not (isinstance(k, int) and k >= 1):
        raise BrazeError(f"fused_moe_routed: {k} experts per token")
    router = TensorType((e, x.shape[1]), x.dtype)
    return _fused_moe_infer([x, router, gate_up, down],
                            dict(attrs, top_k=min(k, e) if expert_ids is not None else k,
                                 local_experts=0))


def _fused_moe_routed(x, weights, ids, w_gate_up, w_down, expert_ids=None, *, act,
                      local_experts=0):
    return _dispatch(x, weights.to(x.dtype), ids.long(), w_gate_up, w_down, act,
                     expert_ids if local_experts else None)


register(OpDef(
    "fused_moe_routed", ("x", "weights", "ids", "w_gate_up", "w_down", "expert_ids?"),
    _routed_infer, _fused_moe_routed, attrs={"act": "silu", "local_experts": 0},
    doc="mixture of experts whose routing the graph computed (any router: DeepSeek-V3's "
        "grouped sigmoid one): token t runs experts ids[t, j] weighted by weights[t, j] "
        "rounded to x's dtype, as fused_moe does after its own routing"))
