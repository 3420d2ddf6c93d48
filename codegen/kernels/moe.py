"""Fused mixture of experts: top-k routing, align by expert, two grouped GEMMs, combine.

Lowers `fused_moe(x [T, H], router [E, H], w_gate_up [E, 2I, H], w_down [E, H, I])
{top_k, renormalize, act}` (reference: ir/op_moe.py) to six launches, all with grids that
are static functions of T (no host reads, so a step can be captured in a CUDA graph).
`fused_moe_routed(x, weights [T, k], ids [T, k], w_gate_up, w_down)` (DeepSeek-V3: the
graph routes) replaces launches 1 and 2 by `moe_zero_counts_kernel` and
`moe_given_route_kernel`, which turns the given ids and weights into the same slots:

1. `moe_router_kernel`, grid (cdiv(T, BT), cdiv(E, BE)): logits = x @ router.T, one
   [BT, BE] tile per program (tl.dot, fp32 accumulate), stored in x's dtype exactly as
   the reference's `F.linear` rounds them. Splitting over experts as well as tokens keeps
   a decode step's router read spread over several SMs. Program (0, 0) also zeroes the
   per-expert counters the next launch accumulates into (a workspace is never assumed
   to hold anything between calls).
2. `moe_route_kernel`, grid cdiv(T, BT): per token softmax in fp32 over the E logits,
   top_k by repeated max with masking (lowest expert id wins a tie), optional
   renormalisation in fp32, optional per-expert scale (Gemma 4; its router reads
   `router_x`, launch 1), weights rounded to x's dtype. Each program counts its tokens
   per expert, takes a base offset per expert with ONE vector `atomic_add` on the global
   counters (distinct addresses, one per expert it saw) and gives each (token, slot) pair
   its rank inside its expert: base + exclusive cumsum over the program's tokens.
   Slots are written in ascending expert order, the order in which the reference's
   `index_add_` loop sums a token's experts, so the combine reproduces its fp32 sum.
3. `moe_scatter_kernel`, grid cdiv(T * top_k, BLOCK): every program recomputes the
   padded prefix sum over E (E counters, cheap) and writes each pair's id
   (token * top_k + slot) to `sorted[start[e] + rank]`, where each expert's run starts on
   a BLOCK_M boundary. The order inside an expert depends on atomic timing, which changes
   nothing numerically: GEMM rows are independent and results go back by pair id.
4. `moe_gate_up_kernel`, grid max_tiles * cdiv(I, BN): one BLOCK_M x BLOCK_N tile of the
   gate GEMM and the matching tile of the up GEMM (two accumulators sharing the gathered
   x rows), epilogue act(gate) * up with the reference's rounding points (gate, up,
   act(gate) and the product each rounded to x's dtype), stored to the workspace
   `inter [rows, I]` at the sorted row.
5. `moe_down_kernel`, grid max_tiles * cdiv(H, BN): inter rows @ w_down[e].T, rounded to
   x's dtype (as the reference's `F.linear` output is) and stored by pair id into
   `y [T * top_k, H]`.
6. `moe_combine_kernel`, grid (T, cdiv(H, BLOCK_H)): out[t] = sum over slots, in
   ascending expert order, of fp32(w) * fp32(y), rounded once to x's dtype: the
   reference's `index_add_` in fp32 then `.to(x.dtype)`. No atomics, so it is
   deterministic.
   The routing weight is applied here rather than in the down GEMM's epilogue: the
   reference multiplies the ALREADY ROUNDED expert output by the weight in fp32, so
   doing it in the epilogue would need an fp32 `y` (twice the bytes) to stay exact;
   this way `y` is stored in x's dtype and the product is bit-identical.

Every one of the T rows is routed and computed, padding rows included, as the reference
does; a non-finite row still selects top_k distinct real experts and only spoils itself.

Expert parallelism (`local_experts=L`, the last operand the rank's expert ids, consecutive
from `start` = expert_ids[0]; passes/shard.py): the routing is the same over all E
experts, but only the rank's L experts are counted, sorted and computed. The counters,
the tile bounds and the workspaces are sized by L; a slot routed elsewhere stores id -1
(the route kernels; the ids stored are local, e - start), the scatter skips it, and the
combine adds 0 for it (its expert output row is never written). The grids are those of an
L-expert MoE, so a rank does 1/N of the expert GEMM tiles.

GEMM programs find their tile's expert from the E counters (cumsum of cdiv(count,
BLOCK_M)); a program whose tile lies past the real tile count exits at once. Worst-case
tile count, used for the grid: min(T*k, T*k // BLOCK_M + E) (each tile holds at least
one row, and at most one partial tile per expert). Worst-case sorted rows, used for the
workspaces: T*k + E*(BLOCK_M - 1).

Two regimes, each its own copy of launches 1-5 (the combine is shared); the plan holds
both and the grids of the one not wanted for this T evaluate to 0 (runners skip a launch
with an empty grid), so 6 kernels run per step whichever T:
- "small" (decode and short steps, avg rows per expert T*k/E <= SMALL_ROWS_PER_EXPERT):
  BLOCK_M 16, so a decode step's tiles are not mostly padding; the GEMMs are weight
  bandwidth bound there, so wide K blocks and 3 stages keep loads in flight.
- "large" (prefill): BLOCK_M 64 and BLOCK_N 128 (wgmma-sized on sm_90).
Both order GEMM programs in groups of GROUP_M tiles sweeping the N blocks together, so
the tiles of one expert that share an N block run at the same time and its weights come
from HBM once and then from L2 (an expert with 20 rows has two tiles at BLOCK_M 16).
The workspaces are shared (sized for the larger BLOCK_M).

tl.dot needs M, N, K >= 16 on hardware: every block is at least 16 and loads are
masked, so tiny test dims (H 40, I 24) work. fp32 models use input_precision="ieee"
(torch's fp32 GEMMs do not use TF32 by default). H, I, E and top_k are constexprs
(static model sizes): loops have static trip counts and the K masks along the
contiguous dim vanish when the block divides the dim, so weight loads vectorise and
pipeline (cp.async, 3-4 stages) wherever the pointers are known 16-byte aligned, as
Triton's JIT specialises them on a GPU.
"""

import triton
import triton.language as tl
# tl.sum / tl.max / tl.min / tl.cumsum / tl.zeros / tl.cdiv are @jit functions of
# triton.language; the test harness interprets kernels in a process where triton was
# imported without TRITON_INTERPRET, where only builtins work. tl.reduce and
# tl.associative_scan with the standard library's own combine functions compile to the
# same code (triton 3.6 and 3.9).
from triton.language.standard import _elementwise_max, _elementwise_min, _sum_combine

OPS = ("fused_moe", "fused_moe_routed")

# avg rows per expert (T * top_k / E) up to which the small-tile regime runs
SMALL_ROWS_PER_EXPERT = 32

REGIMES = {
    "small": {"BLOCK_M": 16, "GROUP_M": 8, "ROUTER_T": 16, "ROUTER_E": 32, "ROUTER_K": 128,
              "ROUTE_T": 16,
              "gate_up": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
              "down": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}},
    "large": {"BLOCK_M": 64, "GROUP_M": 8, "ROUTER_T": 64, "ROUTER_E": 64, "ROUTER_K": 64,
              "ROUTE_T": 16,
              "gate_up": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
              "down": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}},
}
SCATTER_BLOCK = 128


@triton.jit
def _mma(a, b, acc):
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gemm_tile(a_ptrs, b_ptrs, a_rows_ok, b_cols_ok, acc, K: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """acc + A @ B over K for one output tile: a_ptrs [M, BLOCK_K] and b_ptrs [BLOCK_K, N]
    address the first K block (K contiguous); rows of A and columns of B outside the
    tile are masked, and so is the K tail when BLOCK_K does not divide K."""
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            a = tl.load(a_ptrs, mask=a_rows_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=b_cols_ok[None, :], other=0.0)
        else:
            km = ks < K - k0
            a = tl.load(a_ptrs, mask=a_rows_ok[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=b_cols_ok[None, :] & km[:, None], other=0.0)
        acc = _mma(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _act(g, ACT: tl.constexpr):
    """The activation in fp32, in the form torch's CPU/GPU kernels compute it."""
    if ACT == "silu":
        r = g / (1.0 + tl.exp(-g))
    elif ACT == "relu":
        r = tl.maximum(g, 0.0)
    elif ACT == "gelu":
        r = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:  # gelu_tanh; tanh(z) = 1 - 2 / (1 + exp(2z)), saturating correctly at +-inf
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        r = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    return r


@triton.jit
def _tile_expert(counts_ptr, tile, NUM_E: tl.constexpr, E_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """-> (real tile count, expert of `tile`, its first row inside the expert, expert rows)."""
    es = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + es, mask=es < NUM_E, other=0)
    ntiles = (cnt + BLOCK_M - 1) // BLOCK_M
    end = tl.associative_scan(ntiles, 0, _sum_combine)
    total = tl.reduce(ntiles, 0, _sum_combine)
    e = tl.reduce((end <= tile).to(tl.int32), 0, _sum_combine)
    sel = es == e
    first = tl.reduce(tl.where(sel, end - ntiles, 0), 0, _sum_combine)
    rows = tl.reduce(tl.where(sel, cnt, 0), 0, _sum_combine)
    return total, e, (tile - first) * BLOCK_M, rows


@triton.jit
def _tile_ids(pid, max_tiles, NUM_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M consecutive tiles sweep the N blocks together."""
    width = GROUP_M * NUM_N
    first = (pid // width) * GROUP_M
    gsize = tl.minimum(max_tiles - first, GROUP_M)
    tile = first + (pid % width) % gsize
    nb = (pid % width) // gsize
    return tile, nb


@triton.jit
def moe_router_kernel(x_ptr, r_ptr, logits_ptr, counts_ptr, n_tokens, stride_x, stride_r,
                      HIDDEN: tl.constexpr, NUM_E: tl.constexpr, E_PAD: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      NUM_COUNTS: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    if (pid_t == 0) & (pid_e == 0):      # one counter per expert this rank holds
        es = tl.arange(0, E_PAD)
        tl.store(counts_ptr + es, tl.full([E_PAD], 0, tl.int32), mask=es < NUM_COUNTS)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < n_tokens
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    cmask = cols < NUM_E
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + toks.to(tl.int64)[:, None] * stride_x + ks[None, :]
    b_ptrs = r_ptr + cols.to(tl.int64)[None, :] * stride_r + ks[:, None]
    acc = _gemm_tile(a_ptrs, b_ptrs, tmask, cmask, tl.full([BLOCK_T, BLOCK_E], 0, tl.float32),
                     HIDDEN, BLOCK_K)
    out = logits_ptr + toks.to(tl.int64)[:, None] * NUM_E + cols[None, :]
    tl.store(out, acc.to(logits_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def moe_route_kernel(logits_ptr, counts_ptr, ids_ptr, w_ptr, rank_ptr, scale_ptr, eids_ptr,
                     n_tokens, NUM_E: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
                     RENORM: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr,
                     EP: tl.constexpr, LOCAL_E: tl.constexpr):
    pid = tl.program_id(0)
    if EP:
        start = tl.load(eids_ptr).to(tl.int32)
    else:
        start = 0
    toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < n_tokens
    cols = tl.arange(0, E_PAD)
    cmask = cols < NUM_E
    lg = tl.load(logits_ptr + toks.to(tl.int64)[:, None] * NUM_E + cols[None, :],
                 mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    lg = tl.where(cmask[None, :], lg, float("-inf"))
    mx = tl.reduce(lg, 1, _elementwise_max)
    p = tl.exp(lg - mx[:, None])
    p = p / tl.reduce(p, 1, _sum_combine)[:, None]
    # NaN (a garbage row) must still select top_k distinct real experts: never index out
    p = tl.where(p == p, p, 0.0)
    p = tl.where(cmask[None, :], p, -1.0)
    # top_k by repeated max; the lowest expert id wins a tie
    avail = p
    chosen = tl.full([BLOCK_T, E_PAD], 0, tl.int32)
    wsum = tl.full([BLOCK_T], 0, tl.float32)
    for _ in range(TOP_K):
        m = tl.reduce(avail, 1, _elementwise_max)
        idx = tl.reduce(tl.where(avail == m[:, None], cols[None, :], E_PAD), 1, _elementwise_min)
        hit = cols[None, :] == idx[:, None]
        chosen = tl.where(hit, 1, chosen)
        avail = tl.where(hit, -2.0, avail)
        wsum += m
    _assign_slots(chosen, p, wsum, toks, tmask, cols, cmask, counts_ptr, ids_ptr, w_ptr,
                  rank_ptr, scale_ptr, start, LOCAL_E, TOP_K, RENORM, SCALE)


@triton.jit
def _assign_slots(chosen, p, wsum, toks, tmask, cols, cmask, counts_ptr, ids_ptr, w_ptr,
                  rank_ptr, scale_ptr, start, LOCAL_E: tl.constexpr, TOP_K: tl.constexpr,
                  RENORM: tl.constexpr, SCALE: tl.constexpr):
    """From each token's chosen experts (one-hot [BLOCK_T, columns]; `cols` the global
    expert id of each column) and weights p: ranks inside each of this rank's experts
    [start, start + LOCAL_E) and the (local id, weight, rank) slots in ascending expert
    order; slots of experts held elsewhere get id -1 and weight 0."""
    mine = cmask & (cols >= start) & (cols < start + LOCAL_E)
    chosen = tl.where(tmask[:, None] & mine[None, :], chosen, 0)
    # ranks inside each expert: one atomic per expert this program saw
    local = tl.reduce(chosen, 0, _sum_combine)
    base = tl.atomic_add(counts_ptr + (cols - start), local, mask=mine & (local > 0))
    base = tl.where(local > 0, base, 0)
    pos = base[None, :] + tl.associative_scan(chosen, 0, _sum_combine) - chosen
    # slots in ascending expert order (the reference's summation order)
    done = chosen == 0
    none = 1 << 30            # past every column: no (more) local expert for the token
    for j in range(TOP_K):
        e = tl.reduce(tl.where(done, none, cols[None, :]), 1, _elementwise_min)
        found = e < none
        hit = cols[None, :] == e[:, None]
        wj = tl.reduce(tl.where(hit, p, 0.0), 1, _sum_combine)
        rj = tl.reduce(tl.where(hit, pos, 0), 1, _sum_combine)
        done = done | hit
        if RENORM:
            wj = wj / wsum
        if SCALE:     # Gemma 4's per-expert scale, on the f32 weight
            wj = wj * tl.load(scale_ptr + e, mask=found & tmask, other=0.0).to(tl.float32)
        slot = toks.to(tl.int64) * TOP_K + j
        tl.store(ids_ptr + slot, tl.where(found, e - start, -1), mask=tmask)
        tl.store(w_ptr + slot, wj.to(w_ptr.dtype.element_ty), mask=tmask)
        tl.store(rank_ptr + slot, rj, mask=tmask)


@triton.jit
def moe_zero_counts_kernel(counts_ptr, NUM_E: tl.constexpr, E_PAD: tl.constexpr):
    es = tl.arange(0, E_PAD)
    tl.store(counts_ptr + es, tl.full([E_PAD], 0, tl.int32), mask=es < NUM_E)


@triton.jit
def moe_given_route_kernel(w_in_ptr, ids_in_ptr, counts_ptr, ids_ptr, w_ptr, rank_ptr, eids_ptr,
                           n_tokens, stride_w, stride_i, NUM_E: tl.constexpr,
                           E_PAD: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                           EP: tl.constexpr):
    """fused_moe_routed: the graph's own top-k ids and weights instead of the softmax routing.
    The columns are the NUM_E experts this op holds: with EP, experts start.. (the ids are
    global, so a token's experts held elsewhere match no column)."""
    pid = tl.program_id(0)
    toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < n_tokens
    if EP:
        start = tl.load(eids_ptr).to(tl.int32)
    else:
        start = 0
    cols = start + tl.arange(0, E_PAD)
    cmask = tl.arange(0, E_PAD) < NUM_E
    chosen = tl.full([BLOCK_T, E_PAD], 0, tl.int32)
    p = tl.full([BLOCK_T, E_PAD], 0.0, tl.float32)
    for j in range(TOP_K):
        e = tl.load(ids_in_ptr + toks.to(tl.int64) * stride_i + j, mask=tmask, other=0).to(tl.int32)
        wj = tl.load(w_in_ptr + toks.to(tl.int64) * stride_w + j, mask=tmask, other=0.0)
        hit = cols[None, :] == e[:, None]
        chosen = tl.where(hit, 1, chosen)
        p = tl.where(hit, wj.to(tl.float32)[:, None], p)
    _assign_slots(chosen, p, tl.full([BLOCK_T], 1.0, tl.float32), toks, tmask, cols, cmask,
                  counts_ptr, ids_ptr, w_ptr, rank_ptr, w_in_ptr, start, NUM_E, TOP_K, False,
                  False)


@triton.jit
def moe_scatter_kernel(ids_ptr, rank_ptr, counts_ptr, sorted_ptr, n_pairs,
                       NUM_E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK: tl.constexpr):
    es = tl.arange(0, E_PAD)
    cnt = tl.load(counts_ptr + es, mask=es < NUM_E, other=0)
    ntiles = (cnt + BLOCK_M - 1) // BLOCK_M
    start = (tl.associative_scan(ntiles, 0, _sum_combine) - ntiles) * BLOCK_M
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_pairs
    e = tl.load(ids_ptr + offs, mask=m, other=-1)
    m = m & (e >= 0)                   # -1: an expert another rank holds
    r = tl.load(rank_ptr + offs, mask=m, other=0)
    s = tl.reduce(tl.where(es[None, :] == e[:, None], start[None, :], 0), 1, _sum_combine)
    tl.store(sorted_ptr + s + r, offs, mask=m)


@triton.jit
def moe_gate_up_kernel(x_ptr, w_ptr, sorted_ptr, counts_ptr, h_ptr, max_tiles,
                       stride_x, stride_we, stride_wn,
                       HIDDEN: tl.constexpr, INTER: tl.constexpr, NUM_E: tl.constexpr,
                       E_PAD: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    tile, nb = _tile_ids(tl.program_id(0), max_tiles, (INTER + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    total, e, row0, rows = _tile_expert(counts_ptr, tile, NUM_E, E_PAD, BLOCK_M)
    if tile >= total:
        return
    ms = tl.arange(0, BLOCK_M)
    rmask = row0 + ms < rows
    srow = tile * BLOCK_M + ms
    pair = tl.load(sorted_ptr + srow, mask=rmask, other=0)
    tok = (pair // TOP_K).to(tl.int64)
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < INTER
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_x + ks[None, :]
    g_ptrs = w_ptr + e.to(tl.int64) * stride_we + ns.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    u_ptrs = g_ptrs + INTER * stride_wn
    acc_g = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    acc_u = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        if HIDDEN % BLOCK_K == 0:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            bg = tl.load(g_ptrs, mask=nmask[None, :], other=0.0)
            bu = tl.load(u_ptrs, mask=nmask[None, :], other=0.0)
        else:
            km = ks < HIDDEN - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            bg = tl.load(g_ptrs, mask=nmask[None, :] & km[:, None], other=0.0)
            bu = tl.load(u_ptrs, mask=nmask[None, :] & km[:, None], other=0.0)
        acc_g = _mma(a, bg, acc_g)
        acc_u = _mma(a, bu, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    dt = h_ptr.dtype.element_ty
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    h = _act(g, ACT).to(dt).to(tl.float32) * u
    out = h_ptr + srow.to(tl.int64)[:, None] * INTER + ns[None, :]
    tl.store(out, h.to(dt), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def moe_down_kernel(h_ptr, w_ptr, sorted_ptr, counts_ptr, y_ptr, max_tiles,
                    stride_we, stride_wn,
                    HIDDEN: tl.constexpr, INTER: tl.constexpr, NUM_E: tl.constexpr,
                    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    tile, nb = _tile_ids(tl.program_id(0), max_tiles, (HIDDEN + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    total, e, row0, rows = _tile_expert(counts_ptr, tile, NUM_E, E_PAD, BLOCK_M)
    if tile >= total:
        return
    ms = tl.arange(0, BLOCK_M)
    rmask = row0 + ms < rows
    srow = (tile * BLOCK_M + ms).to(tl.int64)
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < HIDDEN
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + srow[:, None] * INTER + ks[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + ns.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    acc = _gemm_tile(a_ptrs, b_ptrs, rmask, nmask, tl.full([BLOCK_M, BLOCK_N], 0, tl.float32),
                     INTER, BLOCK_K)
    pair = tl.load(sorted_ptr + srow, mask=rmask, other=0).to(tl.int64)
    out = y_ptr + pair[:, None] * HIDDEN + ns[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.jit
def moe_combine_kernel(y_ptr, w_ptr, ids_ptr, out_ptr, stride_out,
                       HIDDEN: tl.constexpr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
                       EP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = cols < HIDDEN
    acc = tl.full([BLOCK_H], 0, tl.float32)
    for j in range(TOP_K):   # slots are in ascending expert order: the reference's sum order
        wj = tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        mj = m
        if EP:               # a slot of an expert held elsewhere: its row was never written
            mj = m & (tl.load(ids_ptr + t * TOP_K + j + cols * 0) >= 0)
        yj = tl.load(y_ptr + (t * TOP_K + j) * HIDDEN + cols, mask=mj, other=0.0)
        acc += yj.to(tl.float32) * wj
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def _pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def lower(node, L):
    from braze.ir.errors import BrazeError
    from braze.codegen.lowering import expr_text

    routed = node.op == "fused_moe_routed"
    router_x = scale = None
    operands = node.operands
    ep = bool(node.attrs.get("local_experts", 0))
    expert_ids = operands[-1] if ep else None         # expert parallelism: the rank's ids
    operands = operands[:-1] if ep else operands
    if routed:
        x, given_w, given_ids, w_gate_up, w_down = operands
        top_k = given_ids.type.shape[1]
    else:
        x, router, w_gate_up, w_down, *extra = operands
        router_x = extra[0] if extra else x            # Gemma 4: the router reads another input
        scale = extra[1] if len(extra) > 1 else None   # and scales each expert's weight
        top_k = node.attrs["top_k"]
    out = node.results[0]
    # num_e: the experts this op holds (counters, tiles); all_e: the routing's columns
    num_e, hidden = w_gate_up.type.shape[0], w_gate_up.type.shape[2]
    all_e = num_e if routed else router.type.shape[0]
    inter = w_down.type.shape[2]
    if not all(isinstance(d, int) for d in (num_e, hidden, inter, top_k)):
        raise BrazeError(f"{node.op}: experts, hidden, intermediate and top_k must be "
                         f"concrete, got w_gate_up {w_gate_up.type}, w_down {w_down.type}, "
                         f"top_k={top_k!r}")
    dtype = x.type.dtype
    act = node.attrs.get("act", "silu")
    e_pad, all_pad = _pow2(num_e), _pow2(all_e)
    tokens = L.rows(x)
    tk = expr_text(tokens * top_k)
    t = expr_text(tokens)
    max_bm = max(r["BLOCK_M"] for r in REGIMES.values())
    padded_rows = tokens * top_k + num_e * (max_bm - 1)

    logits = None if routed else L.ws("logits", [tokens, all_e], dtype)
    counts = L.ws("counts", [num_e], "i32")
    ids = L.ws("topk_ids", [tokens * top_k], "i32")
    weights = L.ws("topk_w", [tokens * top_k], dtype)
    rank = L.ws("rank", [tokens * top_k], "i32")
    sorted_ids = L.ws("sorted_ids", [padded_rows], "i32")
    h = L.ws("inter", [padded_rows, inter], dtype)
    y = L.ws("expert_out", [tokens * top_k, hidden], dtype)

    # small regime while T * top_k <= SMALL_ROWS_PER_EXPERT * E, i.e. T <= limit
    limit = SMALL_ROWS_PER_EXPERT * all_e // top_k
    on = {"small": f"(1 - min(1, {t} // {limit + 1}))", "large": f"min(1, {t} // {limit + 1})"}
    if routed:      # the route kernels count into zeroed counters (the router kernel's job)
        L.launch(moe_zero_counts_kernel, grid=["1"], args=[counts],
                 constexprs={"NUM_E": num_e, "E_PAD": e_pad}, num_warps=1, num_stages=1)
    for name, cfg in REGIMES.items():
        gate = on[name]
        bm = cfg["BLOCK_M"]
        max_tiles = f"min({tk}, {tk} // {bm} + {num_e})"
        route_t = cfg["ROUTE_T"]
        if routed:
            L.launch(moe_given_route_kernel, grid=[f"{gate} * cdiv({t}, {route_t})"],
                     args=[L.buf(given_w), L.buf(given_ids), counts, ids, weights, rank,
                           L.buf(expert_ids if ep else given_ids),
                           L.expr(tokens), L.stride(given_w, 0), L.stride(given_ids, 0)],
                     constexprs={"NUM_E": num_e, "E_PAD": e_pad, "TOP_K": top_k,
                                 "BLOCK_T": route_t, "EP": ep},
                     num_warps=4 if route_t * e_pad >= 2048 else 2, num_stages=1)
        be = min(cfg["ROUTER_E"], all_pad)
        if not routed:
            L.launch(moe_router_kernel,
                     grid=[f"{gate} * cdiv({t}, {cfg['ROUTER_T']})", str(-(-all_e // be))],
                     args=[L.buf(router_x), L.buf(router), logits, counts, L.expr(tokens),
                           L.stride(router_x, 0), L.stride(router, 0)],
                     constexprs={"HIDDEN": hidden, "NUM_E": all_e, "E_PAD": all_pad,
                                 "BLOCK_T": cfg["ROUTER_T"], "BLOCK_E": be,
                                 "BLOCK_K": min(cfg["ROUTER_K"], _pow2(hidden)),
                                 "NUM_COUNTS": num_e},
                     num_warps=4, num_stages=3)
            L.launch(moe_route_kernel, grid=[f"{gate} * cdiv({t}, {route_t})"],
                     args=[logits, counts, ids, weights, rank,
                           L.buf(scale if scale is not None else router),
                           L.buf(expert_ids if ep else router), L.expr(tokens)],
                     constexprs={"NUM_E": all_e, "E_PAD": all_pad, "TOP_K": top_k,
                                 "RENORM": bool(node.attrs["renormalize"]),
                                 "SCALE": scale is not None, "BLOCK_T": route_t,
                                 "EP": ep, "LOCAL_E": num_e},
                     num_warps=4 if route_t * all_pad >= 2048 else 2, num_stages=1)
        L.launch(moe_scatter_kernel, grid=[f"{gate} * cdiv({tk}, {SCATTER_BLOCK})"],
                 args=[ids, rank, counts, sorted_ids, L.expr(tokens * top_k)],
                 constexprs={"NUM_E": num_e, "E_PAD": e_pad, "BLOCK_M": bm,
                             "BLOCK": SCATTER_BLOCK},
                 num_warps=4, num_stages=1)
        gu = cfg["gate_up"]
        bn, bk = min(gu["BLOCK_N"], _pow2(inter)), min(gu["BLOCK_K"], _pow2(hidden))
        L.launch(moe_gate_up_kernel, grid=[f"{gate} * {max_tiles} * {-(-inter // bn)}"],
                 args=[L.buf(x), L.buf(w_gate_up), sorted_ids, counts, h,
                       {"expr": max_tiles, "ty": "i32"},
                       L.stride(x, 0), L.stride(w_gate_up, 0), L.stride(w_gate_up, 1)],
                 constexprs={"HIDDEN": hidden, "INTER": inter, "NUM_E": num_e, "E_PAD": e_pad,
                             "TOP_K": top_k, "ACT": act, "BLOCK_M": bm, "BLOCK_N": bn,
                             "BLOCK_K": bk, "GROUP_M": cfg["GROUP_M"]},
                 num_warps=gu["num_warps"], num_stages=gu["num_stages"])
        dn = cfg["down"]
        bn, bk = min(dn["BLOCK_N"], _pow2(hidden)), min(dn["BLOCK_K"], _pow2(inter))
        L.launch(moe_down_kernel, grid=[f"{gate} * {max_tiles} * {-(-hidden // bn)}"],
                 args=[h, L.buf(w_down), sorted_ids, counts, y, {"expr": max_tiles, "ty": "i32"},
                       L.stride(w_down, 0), L.stride(w_down, 1)],
                 constexprs={"HIDDEN": hidden, "INTER": inter, "NUM_E": num_e, "E_PAD": e_pad,
                             "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                             "GROUP_M": cfg["GROUP_M"]},
                 num_warps=dn["num_warps"], num_stages=dn["num_stages"])
    # the combine does not depend on the regime
    bh = min(_pow2(hidden), 512)
    L.launch(moe_combine_kernel, grid=[t, str(-(-hidden // bh))],
             args=[y, weights, ids, L.buf(out), L.stride(out, 0)],
             constexprs={"HIDDEN": hidden, "TOP_K": top_k, "BLOCK_H": bh, "EP": ep},
             num_warps=4 if bh >= 512 else 2, num_stages=1)
