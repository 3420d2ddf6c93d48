"""Paged attention over the KV cache: one fixed launch set for a mixed prefill + decode step.

Lowers `attention` (output [T, heads * head_dim]) and `paged_attention` (output
[T, heads, head_dim]); the math is `ir/op_attention.py::_paged_attention`:
softmax(q k^T * scale + mask) v over each sequence's cached keys, in float32,
cast to q's dtype once at the end. Sequence s owns the new tokens
[qsl[s], qsl[s+1]) (n of them); its token i sits at position L - n + i
(L = seq_lens[s]) and sees keys k <= pos (if causal) and k > pos - window (if the
layer has a sliding window). Tokens past qsl[S] are padding and get zeros.
With softcap C > 0 (Gemma 2; Gemma 3 when attn_logit_softcapping is set) each score s
becomes C * tanh(s / C) before the mask, in fp32, inside the same online softmax.

Rows and GQA packing
    Every attention program owns one kv head and a tile of BLOCK_M "rows"; row r is
    (query token r // G, query head kv_head * G + r % G) with G = heads / kv_heads,
    so the G query heads that share a kv head are processed together and each K/V
    tile is loaded once per group (not once per query head). Both products are
    `tl.dot`s (q[M, D] @ k^T[D, N], p[M, N] @ v[N, D]) with fp32 accumulation;
    BLOCK_M >= 16 so bf16/f16 mma is legal. For decode rows (a single token: G
    real rows padded to 16) the padding wastes tensor-core work, not bandwidth:
    on H100 a decode step is bound by streaming K/V from HBM and an m16n8k16 mma
    on 16 padded rows is far below that cost, while the alternative (broadcast
    multiply + tl.sum over D for [G, N, D] products on the CUDA cores) needs
    G*N*D fp32 registers per tile, cross-lane reductions for every key and a
    second reduction layout for p @ v: slower and register-hungry at D = 128.
    K/V are gathered per key through the block table (slot = table[pos // bs] *
    bs + pos % bs), so the key tile BLOCK_N is independent of the cache block
    size. The caches are the contract's contiguous [NB, bs, kv_heads, head_dim]
    tensors, so their strides are constexprs of the static shape: the compiler
    knows every key row starts at a multiple of head_dim and turns the K/V tile
    loads into 16-byte cp.async copies pipelined over num_stages (block offsets in
    int64: a one-layer cache may pass 2^31 elements). q and the output are
    addressed through their strides (q is often a column view of the QKV GEMM
    output). head_dim is padded to a power of two (BLOCK_D) and masked.

Launches (grids depend only on T, S, MB and static sizes; no host reads of metadata)
    1. attn_fwd_kernel, SHORT=True ("decode path"), grid (S, kv_heads, SPLITS):
       sequences with 1 <= n <= SHORT_Q = max(1, 16 // G) new tokens (decodes, and
       short chunks that still fit one 16-row tile). Program (s, kvh, j) takes
       split j of the sequence's key range: SPLITS = min(NUM_SPLITS, cdiv(TARGET,
       S * kv_heads), cdiv(MB * block_size, BLOCK_N)) splits per sequence, so a
       small decode batch still fills the GPU (~TARGET programs) while a large
       one gets one program per (sequence, kv head) and no reduction at all.
       On the device each sequence uses at most one split per BLOCK_N-key tile
       (`_split_plan`); a sequence that ends up with one split writes the output
       directly, otherwise each split writes its un-normalised fp32 accumulator
       and its row max m / row sum l to workspaces and counts itself in
       `arrived[s, kvh]` (an atomic); the split that arrives last combines all of
       them (log-sum-exp weights, in split order, so the result does not depend on
       which one is last), writes the output in q's dtype and sets the count back
       to 0. No reduce launch follows, and `arrived` stays zeroed between launches.
       Program (s, kvh, 0) of a sequence with no new tokens zeroes token s if it
       is a padding token: in a decode-only step padded to T == S that covers
       every padding token, so such a step needs no prefill-path launch (it is
       `decode_idle`, braze/launch.py).
    2. attn_fwd_kernel, SHORT=False ("prefill path"), grid (cdiv(T, BLOCK_Q) + S,
       kv_heads): sequences with n > SHORT_Q, in tiles of BLOCK_Q = BLOCK_M // G
       consecutive query tokens (BLOCK_M = 64 rows). Tile p finds its sequence on
       the device by a binary search over start(s) = qsl[s] // BLOCK_Q + s (a
       static upper bound on the tile count: sum cdiv(n_s, BLOCK_Q) <= T / BLOCK_Q
       + S), and runs the causal key range of its tokens (plus the window bound)
       in one pass; no split-KV (a tile already brings BLOCK_Q tokens of
       parallelism). The same program also zeroes the padding tokens of the fixed
       token range [p * BLOCK_Q, (p + 1) * BLOCK_Q).
    Workspaces: o [R, SHORT_Q, heads, head_dim] f32, m and l [R, SHORT_Q, heads] f32,
    with R = 2 * cdiv(TARGET, kv_heads) rows of (sequence, split): splits > 1 only
    when S * kv_heads < TARGET, and then S * SPLITS < 2 * TARGET / kv_heads, so the
    workspaces are a small constant (Llama-3-8B: 8.4 MB), independent of T and S,
    and one set serves every layer (codegen/plan.py shares them); arrived
    [R / 2, kv_heads] i32 is allocated zeroed.

Online softmax keeps m, l and acc in fp32 in the exp2 domain (scale * log2 e is
folded into one multiply); m starts at a finite -1e30 so rows whose keys are all
masked in a tile (window edges, padded rows) never produce inf - inf. For f32
models the dots run with input_precision="ieee" (tf32 would miss 1e-5); for
f16/bf16, p is rounded to the model dtype for the p @ v mma, as in FlashAttention.

Block sizes (16-bit models): BLOCK_N = 64 keys for head_dim <= 128, 32 for 256
(and for f32, whose "ieee" dots run on the FMA units); decode path 16 rows x 4
warps (~72-96 registers, ~38 KB shared at head_dim 128), prefill path 64 rows x 8
warps at head_dim >= 128 (~128 registers with wgmma on sm_90, ~165 on sm_80;
4 warps would need 255 on sm_80), 2 stages.

Tradeoffs and limits: the prefill path re-reads a sequence's K/V once per query
tile (BLOCK_Q = 16 tokens at G = 4, 8 at G = 8), which is served from L2 for
concurrent tiles; a short chunk just above SHORT_Q tokens after a very long
prefix gets one program per kv head and no split-KV. Masks are applied on every
key tile (a few elementwise ops on the [BLOCK_M, BLOCK_N] score tile) rather than
peeling the diagonal tiles. v's head_dim must equal q's.
"""

import triton
import triton.language as tl
# tl.sum / tl.max / tl.zeros / tl.cdiv are @jit functions of triton.language itself; the test
# harness interprets kernels in a process where triton was imported without TRITON_INTERPRET, so
# only builtins are patched. tl.reduce with the standard library's own combine functions is the
# same code when compiled and the interpreter's vectorised numpy path (triton 3.6 and 3.9).
from triton.language.standard import _elementwise_max, _sum_combine

OPS = ("attention", "paged_attention")

LOG2E = 1.4426950408889634


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _split_plan(seq_len, n, S, MB, KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, TARGET: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key range and split layout of a decode-path sequence (all its n query tokens).

    -> (kv_lo, kv_hi, tiles_per_split, used_splits, splits_per_seq)."""
    splits = tl.minimum(NUM_SPLITS, _cdiv(TARGET, tl.maximum(S * KV_HEADS, 1)))
    splits = tl.minimum(splits, _cdiv(MB * BLOCK_SIZE, BLOCK_N))
    splits = tl.maximum(splits, 1)
    kv_lo = seq_len * 0
    if WINDOW > 0:
        kv_lo = tl.maximum(seq_len - n - WINDOW + 1, 0)
    kv_hi = seq_len            # causal or not: the last query sits at seq_len - 1
    ntiles = tl.maximum(_cdiv(kv_hi - kv_lo, BLOCK_N), 1)
    nsp = tl.minimum(splits, ntiles)
    tps = _cdiv(ntiles, nsp)
    used = _cdiv(ntiles, tps)
    return kv_lo, kv_hi, tps, used, splits


@triton.jit
def _tanh(x):
    # exp-based: +-1 where exp over/underflows; tl has no tanh on every Triton version
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def attn_fwd_kernel(q_ptr, k_ptr, v_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr,
                    ws_o_ptr, ws_m_ptr, ws_l_ptr, arrived_ptr,
                    T, S, MB, qk_scale,
                    sq0, sq1, sbt0, so0, so1,
                    G: tl.constexpr, NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, SHORT: tl.constexpr, SHORT_Q: tl.constexpr,
                    NUM_SPLITS: tl.constexpr, TARGET: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    SOFTCAP: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    r_tok = rows // G                        # query token of the row within the tile
    r_head = kvh * G + rows % G              # query head of the row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    if SHORT:
        s = pid
        split = tl.program_id(2)
        q_start = tl.load(qsl_ptr + s)
        n = tl.load(qsl_ptr + s + 1) - q_start
        if n == 0:
            # a padding sequence: token s gets zeros if it is a padding token, so that a
            # decode-only step (T == S, token s of sequence s) needs no prefill-path launch
            if split == 0:
                total = tl.load(qsl_ptr + S)
                tok = rows * 0 + s
                pad = (rows < G) & (tok >= total) & (tok < T)
                tl.store(out_ptr + s * so0 + r_head[:, None] * so1 + offs_d[None, :],
                         tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=out_ptr.dtype.element_ty),
                         mask=pad[:, None] & d_ok[None, :])
            return
        if n > BLOCK_Q:
            return                           # a prefill-path sequence
        seq_len = tl.load(seq_lens_ptr + s)
        kv_lo, kv_hi, tps, used, splits = _split_plan(
            seq_len, n, S, MB, KV_HEADS, BLOCK_SIZE, BLOCK_N, NUM_SPLITS, TARGET, CAUSAL, WINDOW)
        if split >= used:
            return                           # this sequence needs fewer splits
        start = kv_lo + split * tps * BLOCK_N
        end = tl.minimum(start + tps * BLOCK_N, kv_hi)
        tok_lo = 0
    else:
        # padding tokens of this program's fixed token range get zeros
        total = tl.load(qsl_ptr + S)
        t_pad = pid * BLOCK_Q + r_tok
        pad = (r_tok < BLOCK_Q) & (t_pad >= total) & (t_pad < T)
        tl.store(out_ptr + t_pad[:, None] * so0 + r_head[:, None] * so1 + offs_d[None, :],
                 tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=out_ptr.dtype.element_ty),
                 mask=pad[:, None] & d_ok[None, :])
        if S == 0:
            return
        # the sequence of tile `pid`: the last s with start(s) = qsl[s] // BLOCK_Q + s <= pid
        lo = 0
        hi = S
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
                lo = mid + 1
            else:
                hi = mid
        s = tl.maximum(lo - 1, 0)
        q_start = tl.load(qsl_ptr + s)
        n = tl.load(qsl_ptr + s + 1) - q_start
        tok_lo = (pid - (q_start // BLOCK_Q + s)) * BLOCK_Q
        if (n <= SHORT_Q) | (tok_lo >= n):
            return                           # a decode-path sequence, or past its last tile
        seq_len = tl.load(seq_lens_ptr + s)
        used = 1
        splits = 1
        split = 0
        # keys of this tile's tokens: up to the last one's position (causal), from the
        # first one's window start
        end = seq_len
        if CAUSAL:
            end = seq_len - n + tl.minimum(tok_lo + BLOCK_Q, n)
        start = end * 0
        if WINDOW > 0:
            start = tl.maximum(seq_len - n + tok_lo - WINDOW + 1, 0)

    i_loc = tok_lo + r_tok
    row_ok = (r_tok < BLOCK_Q) & (i_loc < n)
    q_pos = seq_len - n + i_loc
    t_row = q_start + i_loc
    q = tl.load(q_ptr + t_row[:, None] * sq0 + r_head[:, None] * sq1 + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    bt_row = bt_ptr + s * sbt0
    for k_start in range(start, end, BLOCK_N):
        k_pos = k_start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < end
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        within = k_pos % BLOCK_SIZE
        kv_off = blk * (BLOCK_SIZE * KV_HEADS * HEAD_DIM) + (within * KV_HEADS + kvh) * HEAD_DIM
        kt = tl.load(k_ptr + kv_off[None, :] + offs_d[:, None],
                     mask=k_ok[None, :] & d_ok[:, None], other=0.0)          # [D, N]
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if SOFTCAP > 0:
            # qk_scale is scale / SOFTCAP here: C * tanh(s / C), then into the exp2 domain
            qk = _tanh(qk) * (SOFTCAP * 1.4426950408889634)
        allowed = k_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - WINDOW)
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _elementwise_max))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)           # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    io_mask = row_ok[:, None] & d_ok[None, :]
    if used > 1:
        w_row = (s * splits + split) * BLOCK_Q + i_loc
        w_idx = w_row * NUM_HEADS + r_head
        tl.store(ws_o_ptr + w_idx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=io_mask)
        tl.store(ws_m_ptr + w_idx, m_i, mask=row_ok)
        tl.store(ws_l_ptr + w_idx, l_i, mask=row_ok)
        # The split that finishes last combines them all, so no reduce launch follows.
        # Every thread's stores precede the barrier; the atomic (one thread, acq_rel at gpu
        # scope) publishes them and, in the last split, acquires the others'; its result
        # reaches the other threads through shared memory and a barrier. The partials are
        # read past L1 (.cg). The count goes back to 0 for the next launch.
        tl.debug_barrier()
        count = arrived_ptr + s * KV_HEADS + kvh
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == used - 1:
            m_t = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_t = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
            o_t = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
            for j in range(0, used):
                j_idx = ((s * splits + j) * BLOCK_Q + i_loc) * NUM_HEADS + r_head
                m_j = tl.load(ws_m_ptr + j_idx, mask=row_ok, other=-1.0e30, cache_modifier=".cg")
                l_j = tl.load(ws_l_ptr + j_idx, mask=row_ok, other=0.0, cache_modifier=".cg")
                o_j = tl.load(ws_o_ptr + j_idx[:, None] * HEAD_DIM + offs_d[None, :],
                              mask=io_mask, other=0.0, cache_modifier=".cg")
                m_n = tl.maximum(m_t, m_j)
                a = tl.math.exp2(m_t - m_n)
                b = tl.math.exp2(m_j - m_n)
                l_t = l_t * a + l_j * b
                o_t = o_t * a[:, None] + o_j * b[:, None]
                m_t = m_n
            o = o_t / tl.where(l_t > 0, l_t, 1.0)[:, None]
            tl.store(out_ptr + t_row[:, None] * so0 + r_head[:, None] * so1 + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=io_mask)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + t_row[:, None] * so0 + r_head[:, None] * so1 + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)


# -- codegen --------------------------------------------------------------------------

TARGET_PROGRAMS = 512      # decode split-KV aims for about this many programs (H100: 132 SMs)
MAX_SPLITS = 64
PREFILL_ROWS = 64          # BLOCK_M of the prefill path (query tokens x group heads)
DECODE_ROWS = 16           # BLOCK_M of the decode path (the mma minimum)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan(num_heads: int, num_kv_heads: int, head_dim: int, dtype: str) -> dict:
    """Static block sizes for one attention shape (also used by tests and benchmarks)."""
    g = num_heads // num_kv_heads
    block_d = max(16, _pow2(head_dim))
    block_n = min(64 if block_d <= 128 and dtype != "f32" else 32, max(16, block_d // 2))
    short_q = max(1, DECODE_ROWS // g)
    prefill_q = max(1, PREFILL_ROWS // g)
    num_splits = max(1, min(MAX_SPLITS, -(-TARGET_PROGRAMS // num_kv_heads)))
    return {
        "G": g, "BLOCK_D": block_d, "BLOCK_N": block_n,
        "SHORT_Q": short_q, "SHORT_M": max(16, _pow2(short_q * g)),
        "PREFILL_Q": prefill_q, "PREFILL_M": max(16, _pow2(prefill_q * g)),
        "NUM_SPLITS": num_splits, "SPLITS_P2": _pow2(num_splits),
        "WS_ROWS": 2 * -(-TARGET_PROGRAMS // num_kv_heads),
        "DOT_PRECISION": "ieee" if dtype == "f32" else "tf32",
        # 64 x 128 fp32 accumulators + the score tile: 4 warps need 255 registers on sm_80
        # at head_dim 128; 8 warps bring it to ~160 (sm_80) / ~128 (sm_90, wgmma), no spills
        "PREFILL_WARPS": 8 if block_d >= 128 else 4,
    }


def lower(node, L):
    from braze.ir.errors import BrazeError
    from braze.ir.types import MB as sym_MB
    from braze.ir.types import S as sym_S
    from braze.ir.types import T as sym_T

    q, k_cache, v_cache, qsl, seq_lens, block_tables = node.operands
    out = node.results[0]
    heads, head_dim = q.type.shape[1], q.type.shape[2]
    block_size, kv_heads = k_cache.type.shape[1], k_cache.type.shape[2]
    if not all(isinstance(d, int) for d in (heads, head_dim, block_size, kv_heads)):
        raise BrazeError(f"{node.op}: heads, head_dim and cache block size must be concrete, "
                         f"got q {q.type} and cache {k_cache.type}")
    if v_cache.type.shape[3] != head_dim or tuple(v_cache.type.shape[1:3]) != (block_size, kv_heads):
        raise BrazeError(f"{node.op}: v cache {v_cache.type} must match k cache {k_cache.type}")
    window = int(node.attrs.get("sliding_window") or 0)
    causal = bool(node.attrs.get("causal", True))
    softcap = float(node.attrs.get("softcap") or 0.0)
    p = plan(heads, kv_heads, head_dim, q.type.dtype)
    g = p["G"]

    if out.type.rank == 2:          # attention: [T, heads * head_dim]
        so0, so1 = L.stride(out, 0), L.int(head_dim)
    else:                           # paged_attention: [T, heads, head_dim]
        so0, so1 = L.stride(out, 0), L.stride(out, 1)
    R, qs = p["WS_ROWS"], p["SHORT_Q"]
    ws_o = L.ws("o", [R, qs, heads, head_dim], "f32")
    ws_m = L.ws("m", [R, qs, heads], "f32")
    ws_l = L.ws("l", [R, qs, heads], "f32")
    arrived = L.ws("arrived", [R // 2, kv_heads], "i32", zero=True)
    S, T, MB = L.expr(sym_S), L.expr(sym_T), L.expr(sym_MB)
    common = [L.buf(q), L.buf(k_cache), L.buf(v_cache), L.buf(qsl), L.buf(seq_lens),
              L.buf(block_tables), L.buf(out), ws_o, ws_m, ws_l, arrived, T, S, MB,
              L.float(float(node.attrs["scale"]) / softcap if softcap
                      else float(node.attrs["scale"]) * LOG2E),
              L.stride(q, 0), L.stride(q, 1), L.stride(block_tables, 0), so0, so1]
    const = {"G": g, "NUM_HEADS": heads, "KV_HEADS": kv_heads, "HEAD_DIM": head_dim,
             "BLOCK_SIZE": block_size, "BLOCK_N": p["BLOCK_N"], "BLOCK_D": p["BLOCK_D"],
             "SHORT_Q": qs, "NUM_SPLITS": p["NUM_SPLITS"], "TARGET": TARGET_PROGRAMS,
             "CAUSAL": causal, "WINDOW": window, "DOT_PRECISION": p["DOT_PRECISION"],
             "SOFTCAP": softcap}
    splits_grid = (f"max(1, min({p['NUM_SPLITS']}, cdiv({TARGET_PROGRAMS}, max(S * {kv_heads}, 1)), "
                   f"cdiv(MB * {block_size}, {p['BLOCK_N']})))")
    L.launch(attn_fwd_kernel, grid=["S", str(kv_heads), splits_grid], args=common,
             constexprs=dict(const, BLOCK_M=p["SHORT_M"], BLOCK_Q=qs, SHORT=True),
             num_warps=4, num_stages=2)
    L.launch(attn_fwd_kernel, grid=[f"cdiv(T, {p['PREFILL_Q']}) + S", str(kv_heads)], args=common,
             constexprs=dict(const, BLOCK_M=p["PREFILL_M"], BLOCK_Q=p["PREFILL_Q"], SHORT=False),
             num_warps=p["PREFILL_WARPS"], num_stages=2, decode_idle=True)
