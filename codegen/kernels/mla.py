"""Paged multi-head latent attention in the absorbed form (DeepSeek's MLA decode).

Also `latent_cache_write` (one program per token copies its row to its slot), so a step
never writes the cache through a host-synchronising torch index.

Lowers `latent_attention(q [T, H, R + P], cache [NB, bs, 1, R + P], query_start_loc,
seq_lens, block_tables) {scale, kv_lora_rank=R}` -> [T, H, R] (reference:
ir/op_mla.py). W_UK is already folded into q and W_UV comes after (extern GEMMs, placed
by the absorb-mla pass), so this is multi-query attention with one shared "head": the
key is the whole cached row (latent c, rope key k_r), the value its latent part. Every
cached row is read once per token for all heads, instead of expanded per-head K and V.

One launch, grid (T, cdiv(H, BLOCK_H)): program (t, j) takes query token t and heads
[j * BLOCK_H, (j + 1) * BLOCK_H). It finds its sequence on the device (the number of
query_start_loc[1..S] <= t, counted SEQ_CHUNK at a time), so the grid depends on T
only and a mixed prefill + decode step is one launch; tokens past query_start_loc[S]
are padding and get zeros. Token t of sequence s sits at position L - n + i and sees
keys 0..pos (causal). Keys are gathered BLOCK_N at a time through the block table
(slot = table[k // bs] * bs + k % bs); the scores are two `tl.dot`s,
q_c [BLOCK_H, R] @ c^T and q_r [BLOCK_H, P] @ k_r^T, in an online softmax (exp2, the
scale times log2 e); the accumulator [BLOCK_H, R] gets p @ c. R and P are padded to
powers of two of at least 16 and masked, so `tl.dot` is legal on hardware for tiny test
dims; BLOCK_H = 16 heads keeps the fp32 accumulator at 16 x R (32 KiB at R = 512, 64
registers per thread with 4 warps). fp32 models use input_precision="ieee".

Not here yet: split-KV for long contexts at small batch (one program walks a whole
sequence), and a prefill that expands instead (the absorbed form costs R + P per key
and head instead of nope + rope, which a long prefill may prefer to avoid).
"""

import triton
import triton.language as tl
from triton.language.standard import _elementwise_max, _sum_combine

OPS = ("latent_attention", "latent_cache_write")

LOG2E = 1.4426950408889634
BLOCK_H = 16
BLOCK_N = 16
SEQ_CHUNK = 64


@triton.jit
def mla_attn_kernel(q_ptr, c_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr, n_seqs, qk_scale,
                    stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
                    NUM_HEADS: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, SEQ_CHUNK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < NUM_HEADS
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < RANK
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < ROPE
    out_rows = out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_r[None, :]
    out_mask = h_ok[:, None] & r_ok[None, :]
    if t >= tl.load(qsl_ptr + n_seqs):
        tl.store(out_rows, tl.full([BLOCK_H, BLOCK_R], 0.0, dtype=out_ptr.dtype.element_ty),
                 mask=out_mask)
        return
    s = 0
    for i in range(0, n_seqs, SEQ_CHUNK):
        idx = i + tl.arange(0, SEQ_CHUNK)
        ends = tl.load(qsl_ptr + 1 + idx, mask=idx < n_seqs, other=2147483647)
        s += tl.reduce((ends <= t).to(tl.int32), 0, _sum_combine)
    start = tl.load(qsl_ptr + s)
    n_new = tl.load(qsl_ptr + s + 1) - start
    pos = tl.load(seq_lens_ptr + s) - n_new + (t - start)
    q_rows = q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    q_c = tl.load(q_rows + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    q_r = tl.load(q_rows + RANK + offs_p[None, :], mask=h_ok[:, None] & p_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_R], 0.0, dtype=tl.float32)
    for k0 in range(0, pos + 1, BLOCK_N):
        keys = k0 + tl.arange(0, BLOCK_N)
        k_ok = keys <= pos
        block = tl.load(bt_ptr + s * stride_bt + keys // BLOCK_SIZE, mask=k_ok, other=0)
        row = (block.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE) * (RANK + ROPE)
        c = tl.load(c_ptr + row[:, None] + offs_r[None, :], mask=k_ok[:, None] & r_ok[None, :],
                    other=0.0)                                              # [N, R]
        k_r = tl.load(c_ptr + row[:, None] + RANK + offs_p[None, :],
                      mask=k_ok[:, None] & p_ok[None, :], other=0.0)        # [N, P]
        qk = tl.dot(q_c, tl.trans(c), input_precision=DOT_PRECISION)
        qk = qk + tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PRECISION)
        qk = tl.where(k_ok[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _elementwise_max))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_rows, o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def latent_cache_write_kernel(kv_ptr, cache_ptr, slots_ptr, stride_kv_t, stride_kv_d,
                              ROW: tl.constexpr, BLOCK: tl.constexpr):
    """One token's latent + rope row into the cache at its slot (slot -1: padding)."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        ok = offs < ROW
        x = tl.load(kv_ptr + t.to(tl.int64) * stride_kv_t + offs * stride_kv_d, mask=ok)
        tl.store(cache_ptr + slot.to(tl.int64) * ROW + offs,
                 x.to(cache_ptr.dtype.element_ty), mask=ok)


def _pow2(n: int, minimum: int = 16) -> int:
    p = minimum
    while p < n:
        p *= 2
    return p


def lower(node, L):
    from braze.ir.errors import BrazeError
    from braze.ir.types import S as sym_S

    if node.op == "latent_cache_write":
        kv, cache, slots = node.operands
        row = cache.type.shape[3]
        L.launch(latent_cache_write_kernel, grid=["T"],
                 args=[L.buf(kv), L.buf(cache), L.buf(slots), L.stride(kv, 0), L.stride(kv, 2)],
                 constexprs={"ROW": row, "BLOCK": _pow2(row)}, num_warps=1, num_stages=1)
        return
    q, cache, qsl, seq_lens, block_tables = node.operands
    out = node.results[0]
    heads, row = q.type.shape[1], q.type.shape[2]
    block_size, rank = cache.type.shape[1], int(node.attrs["kv_lora_rank"])
    if not all(isinstance(d, int) for d in (heads, row, block_size)):
        raise BrazeError(f"{node.op}: heads, row width and block size must be concrete, "
                         f"got q {q.type} and cache {cache.type}")
    rope = row - rank
    L.launch(mla_attn_kernel, grid=["T", f"cdiv({heads}, {BLOCK_H})"],
             args=[L.buf(q), L.buf(cache), L.buf(qsl), L.buf(seq_lens), L.buf(block_tables),
                   L.buf(out), L.expr(sym_S), L.float(float(node.attrs["scale"]) * LOG2E),
                   L.stride(q, 0), L.stride(q, 1), L.stride(block_tables, 0),
                   L.stride(out, 0), L.stride(out, 1)],
             constexprs={"NUM_HEADS": heads, "RANK": rank, "ROPE": rope,
                         "BLOCK_SIZE": block_size, "BLOCK_H": BLOCK_H,
                         "BLOCK_R": _pow2(rank), "BLOCK_P": _pow2(rope), "BLOCK_N": BLOCK_N,
                         "SEQ_CHUNK": SEQ_CHUNK,
                         "DOT_PRECISION": "ieee" if q.type.dtype == "f32" else "tf32"},
             num_warps=4, num_stages=2)
