"""DeepSeek-V3's grouped sigmoid router in one launch: `grouped_topk` (ir/op_router.py).

`grouped_topk_kernel`, grid (T,): one program per token reads its E logits (a row of
the router's linear, any row stride) and the E biases, and does the whole router in
registers:

1. scores = sigmoid(logits) in fp32; choice = scores + bias (a NaN choice counts as -inf);
2. with groups: the same values viewed as [n_group, E / n_group]; each group's score is
   its best plus its second best choice (the best's position is masked out, so a group
   whose two best tie counts both); the topk_group best groups are kept by repeated max
   with masking, the lowest group id winning a tie, so exactly topk_group are kept;
3. top_k experts among the kept groups' by repeated max, the lowest expert id winning a
   tie; slot j holds the j-th best (descending choice order, as the reference);
4. weights = the unbiased scores of the chosen experts; optional renormalisation
   w / (sum(w) + 1e-20); times `scale` (routed_scaling_factor), all fp32.

The selection runs over availability masks, never over sentinel values, so every row,
even a garbage one, selects top_k distinct real experts and only spoils its own weights.
The traced router it replaces is ~10 launches (sigmoid + bias, three topk, the group
sum, the mask, where, gather, the renormalisation) with [T, E] intermediates in memory.
"""

import triton
import triton.language as tl
# builtins only: see codegen/kernels/moe.py for why tl.reduce with the standard
# library's combine functions instead of tl.max / tl.min / tl.sum
from triton.language.standard import _elementwise_max, _elementwise_min, _sum_combine

OPS = ("grouped_topk",)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _best(values, avail, idx, NONE: tl.constexpr):
    """(max over the available entries, the lowest index holding it); `avail` must have an
    available entry, else the index is NONE."""
    vals = tl.where(avail != 0, values, float("-inf"))
    mx = tl.reduce(vals, 0, _elementwise_max)
    at = tl.reduce(tl.where((avail != 0) & (vals == mx), idx, NONE), 0, _elementwise_min)
    return mx, at


@triton.jit
def grouped_topk_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, stride_l, stride_w, stride_i,
                        scale, NUM_E: tl.constexpr, E_PAD: tl.constexpr,
                        N_GROUP: tl.constexpr, G_PAD: tl.constexpr, PER: tl.constexpr,
                        PER_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
                        K_PAD: tl.constexpr, RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = logits_ptr + t * stride_l
    cols = tl.arange(0, E_PAD)
    cmask = cols < NUM_E
    s = _sigmoid(tl.load(row + cols, mask=cmask, other=0.0).to(tl.float32))
    c = s + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    c = tl.where(c == c, c, float("-inf"))
    avail = tl.where(cmask, 1, 0)
    if N_GROUP > 1:
        g = tl.arange(0, G_PAD)
        j = tl.arange(0, PER_PAD)
        gmask = g < N_GROUP
        m2 = gmask[:, None] & (j < PER)[None, :]
        off = g[:, None] * PER + j[None, :]
        s2 = _sigmoid(tl.load(row + off, mask=m2, other=0.0).to(tl.float32))
        c2 = s2 + tl.load(bias_ptr + off, mask=m2, other=0.0).to(tl.float32)
        c2 = tl.where(m2 & (c2 == c2), c2, float("-inf"))
        # each group's best, and its second best with the best's position masked out
        best = tl.reduce(c2, 1, _elementwise_max)
        at = tl.reduce(tl.where(m2 & (c2 == best[:, None]), j[None, :], PER_PAD), 1,
                       _elementwise_min)
        second = tl.reduce(tl.where(m2 & (j[None, :] != at[:, None]), c2, float("-inf")), 1,
                           _elementwise_max)
        gs = best + second
        gs = tl.where(gs == gs, gs, float("-inf"))
        gavail = tl.where(gmask, 1, 0)
        kept = tl.full([G_PAD], 0, tl.int32)
        for _ in range(TOPK_GROUP):
            mx, gi = _best(gs, gavail, g, G_PAD)
            kept = tl.where(g == gi, 1, kept)
            gavail = tl.where(g == gi, 0, gavail)
        # an expert is available when its group is kept
        mine = (cols // PER)[:, None] == g[None, :]
        in_kept = tl.reduce(tl.where(mine, kept[None, :], 0), 1, _sum_combine)
        avail = tl.where(in_kept > 0, avail, 0)
    kk = tl.arange(0, K_PAD)
    w = tl.full([K_PAD], 0.0, tl.float32)
    ids = tl.full([K_PAD], 0, tl.int64)
    for k in range(TOP_K):
        mx, e = _best(c, avail, cols, E_PAD)
        hit = cols == e
        wk = tl.reduce(tl.where(hit, s, 0.0), 0, _sum_combine)
        w = tl.where(kk == k, wk, w)
        ids = tl.where(kk == k, e.to(tl.int64), ids)
        avail = tl.where(hit, 0, avail)
    if RENORM:
        w = w / (tl.reduce(w, 0, _sum_combine) + 1e-20)
    w = w * scale
    kmask = kk < TOP_K
    tl.store(w_ptr + t * stride_w + kk, w.to(w_ptr.dtype.element_ty), mask=kmask)
    tl.store(ids_ptr + t * stride_i + kk, ids.to(ids_ptr.dtype.element_ty), mask=kmask)


def lower(node, L):
    logits, bias = node.operands
    w, ids = node.results
    a = node.attrs
    e = logits.type.shape[1]
    per = e // a["n_group"]
    e_pad = L.pow2(e, 16)
    L.launch(grouped_topk_kernel, grid=[L.rows(logits)],
             args=[L.buf(logits), L.buf(bias), L.buf(w), L.buf(ids), L.stride(logits, 0),
                   L.stride(w, 0), L.stride(ids, 0), L.float(a["scale"])],
             constexprs={"NUM_E": e, "E_PAD": e_pad, "N_GROUP": a["n_group"],
                         "G_PAD": L.pow2(a["n_group"], 2), "PER": per,
                         "PER_PAD": L.pow2(per, 2), "TOPK_GROUP": a["topk_group"],
                         "TOP_K": a["top_k"], "K_PAD": L.pow2(a["top_k"], 2),
                         "RENORM": bool(a["renormalize"])},
             num_warps=4 if e_pad >= 512 else (2 if e_pad >= 128 else 1), num_stages=1)
