"""RoPE kernels: `rope`, `rope1` and `rope_cache_write` (ir/op_fused_norm_rope.py), one template.

    x' = x * cos + rotate(x) * sin     (x first replaced by rms_norm(x, w) {eps} with QK-norm)

With `rotary_dim` R < head_dim (partial rotary) the rotation covers x[..., :R] and a
masked copy moves x[..., R:] (PASS elements per head) to the output or cache row.

Design
------
Grid [T]: one program per token (T = padded token count, the only dynamic size, so a
single compiled variant serves every batch and the grid never reads data). Each program

  1. loads its token's cos/sin row once ([T, 1, D], row stride passed), split into the
     two halves of each rotation pair, as [1, D/2] tiles that broadcast over heads;
  2. rotates all q heads, in 2-D tiles [BLOCK_HQ heads, D/2] (masked for non power of
     two head counts and head dims; one tile covers all heads up to 4096 elements, larger
     head counts loop over head blocks), and writes q';
  3. rotates all k heads the same way and writes k' either to its output (`rope`) or,
     for `rope_cache_write`, straight into the paged cache at the token's slot
     (cache[slot // bs, slot % bs] == flat row `slot` of the [NB * bs, heads, D] view);
     then copies v into the v cache at the same slot. A padding token (slot -1) still
     writes its q' (the reference computes q' for every row) but neither loads k/v nor
     writes anything into the caches.

Rotation pairs: each output element depends on itself and one partner, so a head row is
held as two halves x1, x2 of the pairs (i1, i2) and
    out[i1] = x1 * cos[i1] - x2 * sin[i1],   out[i2] = x2 * cos[i2] + x1 * sin[i2].
"neox" pairs (j, j + D/2): the halves are two contiguous loads (vectorised along the
contiguous head dim). "gptj" pairs (2j, 2j + 1): the whole row is loaded contiguously
and de-interleaved in registers (reshape [H, D/2, 2] + tl.split; tl.join on the way out),
so both styles move each byte once with wide loads/stores.

QK-norm (optional trailing weights): the per-head sum of squares is reduced over the
two halves in fp32, then the reference's rounding points are reproduced exactly:
    n = round_x(x * rsqrt(mean(x^2) + eps));  xn = round_p1(w * n)
    out = round_out(round_p2(xn * cos) +/- round_p3(rotate(xn) * sin))
where round_d rounds an fp32 value to dtype d (the dtype torch computes that
intermediate in, from its type promotion; a no-op for fp32). All arithmetic is fp32;
for a model dtype of fp16/bf16 these casts make the kernel agree with the reference
bit for bit up to fp32 summation order in the norm. The rounding dtypes are static
constexpr codes (0 = fp32/no rounding, 1 = fp16, 2 = bf16) chosen at lowering.

Addressing: q/k/v are usually column views of one merged QKV GEMM output, so every
tensor is addressed through its own row and head strides (only the last dim is assumed
contiguous); caches through their slot and head strides. Token/slot offsets are int64
(cache offsets exceed 2^31 elements for large caches). Head counts, D/2 and the head
dims are constexprs (static model sizes), so the head loops have static trip counts and
masks vanish where blocks fit exactly.

Traffic per token is the roofline minimum: read q, k, v (v only when writing caches),
cos, sin (+ the norm weights, cache-resident), write q', k' (or cache rows) and v rows.
num_warps = 8 for tiles of >= 4096 elements (e.g. 32 heads x 128), else 4.
"""

import triton
import triton.language as tl

OPS = ("rope", "rope1", "rope_cache_write")


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rnd(x, R: tl.constexpr):
    """Round an fp32 tile to the dtype coded by R (0 fp32: none, 1 fp16, 2 bf16), back in fp32."""
    if R == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif R == 2:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit
def _load_pairs(rows, mask, BH: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                NEOX: tl.constexpr):
    """rows: [BH, 1] pointers to head rows; -> (x1, x2) fp32 [BH, BLOCK_HALF], the two
    members of each rotation pair (zero where masked)."""
    if NEOX:
        j = tl.arange(0, BLOCK_HALF)[None, :]
        m = mask & (j < HALF)
        x1 = tl.load(rows + j, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(rows + HALF + j, mask=m, other=0.0).to(tl.float32)
    else:
        d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        x = tl.load(rows + d, mask=mask & (d < 2 * HALF), other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BH, BLOCK_HALF, 2]))
    return x1, x2


@triton.jit
def _store_pairs(rows, o1, o2, mask, BH: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, NEOX: tl.constexpr):
    ty = rows.dtype.element_ty
    if NEOX:
        j = tl.arange(0, BLOCK_HALF)[None, :]
        m = mask & (j < HALF)
        tl.store(rows + j, o1.to(ty), mask=m)
        tl.store(rows + HALF + j, o2.to(ty), mask=m)
    else:
        d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        o = tl.reshape(tl.join(o1, o2), [BH, 2 * BLOCK_HALF])
        tl.store(rows + d, o.to(ty), mask=mask & (d < 2 * HALF))


@triton.jit
def _rope_heads(x_row, x_hs, o_row, o_hs, w_ptr, eps, c1, c2, s1, s2, lim,
                H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr, NEOX: tl.constexpr, HAS_NORM: tl.constexpr,
                R_N: tl.constexpr, R_W: tl.constexpr, R_C: tl.constexpr, R_S: tl.constexpr,
                R_O: tl.constexpr, PASS: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Rotate the H heads of one token: x_row/o_row point at the token's first head,
    x_hs/o_hs are head strides; heads >= `lim` (H, or 0 to skip the token) are masked."""
    if HAS_NORM:
        one = tl.full([1, 1], 0, tl.int32)
        w1, w2 = _load_pairs(w_ptr + one, one == 0, 1, HALF, BLOCK_HALF, NEOX)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]
        hm = h < lim
        x1, x2 = _load_pairs(x_row + h * x_hs, hm, BLOCK_H, HALF, BLOCK_HALF, NEOX)
        if HAS_NORM:
            # tl.reduce with a local combine fn == tl.sum, but tl.sum (a @jit of triton.language)
            # is not interpretable where triton was imported before TRITON_INTERPRET was set
            ms = (tl.reduce(x1 * x1, 1, _add) + tl.reduce(x2 * x2, 1, _add)) / (2 * HALF)
            r = tl.rsqrt(ms + eps)[:, None]
            x1 = _rnd(_rnd(x1 * r, R_N) * w1, R_W)
            x2 = _rnd(_rnd(x2 * r, R_N) * w2, R_W)
        o1 = _rnd(_rnd(x1 * c1, R_C) - _rnd(x2 * s1, R_S), R_O)
        o2 = _rnd(_rnd(x2 * c2, R_C) + _rnd(x1 * s2, R_S), R_O)
        _store_pairs(o_row + h * o_hs, o1, o2, hm, BLOCK_H, HALF, BLOCK_HALF, NEOX)
        if PASS > 0:
            # partial rotary: the head's last PASS elements are copied as they are
            c = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
            pm = hm & (c < 2 * HALF + PASS)
            vals = tl.load(x_row + h * x_hs + c, mask=pm, other=0.0)
            tl.store(o_row + h * o_hs + c, vals.to(o_row.dtype.element_ty), mask=pm)


@triton.jit
def rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr,
                kc_ptr, vc_ptr, slot_ptr,
                q_rs, q_hs, k_rs, k_hs, v_rs, v_hs, cos_rs, sin_rs, qo_rs, qo_hs, ko_rs, ko_hs,
                kc_ss, kc_hs, vc_ss, vc_hs, eps,
                HQ: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, HALF: tl.constexpr,
                DV: tl.constexpr, NEOX: tl.constexpr, HAS_K: tl.constexpr, CACHE: tl.constexpr,
                HAS_NORM: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                BLOCK_HV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
                RQ_N: tl.constexpr, RQ_W: tl.constexpr, RQ_C: tl.constexpr, RQ_S: tl.constexpr,
                RK_N: tl.constexpr, RK_W: tl.constexpr, RK_C: tl.constexpr, RK_S: tl.constexpr,
                RK_O: tl.constexpr, PASS: tl.constexpr, BLOCK_PASS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    one = tl.full([1, 1], 0, tl.int32)          # [1, 1] row of pointers for cos/sin
    true = one == 0
    c1, c2 = _load_pairs(cos_ptr + t * cos_rs + one, true, 1, HALF, BLOCK_HALF, NEOX)
    s1, s2 = _load_pairs(sin_ptr + t * sin_rs + one, true, 1, HALF, BLOCK_HALF, NEOX)
    # q' for every row, padding included (as the reference); store casts to q'.dtype
    _rope_heads(q_ptr + t * q_rs, q_hs, qo_ptr + t * qo_rs, qo_hs, qw_ptr, eps, c1, c2, s1, s2,
                HQ, HQ, HALF, BLOCK_HQ, BLOCK_HALF, NEOX, HAS_NORM, RQ_N, RQ_W, RQ_C, RQ_S, 0,
                PASS, BLOCK_PASS)
    if HAS_K:
        if CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            ok = slot >= 0                           # slot -1: padding, no cache writes
            slot = tl.maximum(slot, 0)
            _rope_heads(k_ptr + t * k_rs, k_hs, kc_ptr + slot * kc_ss, kc_hs, kw_ptr, eps,
                        c1, c2, s1, s2, tl.where(ok, HK, 0), HK, HALF, BLOCK_HK, BLOCK_HALF,
                        NEOX, HAS_NORM, RK_N, RK_W, RK_C, RK_S, RK_O, PASS, BLOCK_PASS)
            d = tl.arange(0, BLOCK_DV)[None, :]
            hv_lim = tl.where(ok, HV, 0)
            for h0 in range(0, HV, BLOCK_HV):
                h = h0 + tl.arange(0, BLOCK_HV)[:, None]
                m = (h < hv_lim) & (d < DV)
                vals = tl.load(v_ptr + t * v_rs + h * v_hs + d, mask=m)
                tl.store(vc_ptr + slot * vc_ss + h * vc_hs + d,
                         vals.to(vc_ptr.dtype.element_ty), mask=m)
        else:
            _rope_heads(k_ptr + t * k_rs, k_hs, ko_ptr + t * ko_rs, ko_hs, kw_ptr, eps,
                        c1, c2, s1, s2, HK, HK, HALF, BLOCK_HK, BLOCK_HALF, NEOX, HAS_NORM,
                        RK_N, RK_W, RK_C, RK_S, 0, PASS, BLOCK_PASS)


# -- lowering (codegen only) -----------------------------------------------------------------

_TILE = 4096          # elements of one [heads, head_dim] tile (bounds registers per program)


def _code(dtype: str) -> int:
    from braze.ir.errors import BrazeError
    codes = {"f32": 0, "f16": 1, "bf16": 2}
    if dtype not in codes:
        raise BrazeError(f"rope kernels support f32/f16/bf16 math, not {dtype}")
    return codes[dtype]


def _rounding(x, cos, sin, w, scale_f32=False):
    """-> (R_N, R_W, R_C, R_S, R_O): the dtypes the reference rounds to (rope_ref).
    scale_f32 (Gemma's QK-norm): the normalised value stays f32 until (n * w).to(x dtype)."""
    from braze.ir.op_fused_norm_rope import _promote
    p1 = _promote(w.type.dtype, x.type.dtype) if w is not None else x.type.dtype
    r_n = _code(x.type.dtype)
    if w is not None and scale_f32:
        p1, r_n = x.type.dtype, 0
    pc, ps = _promote(p1, cos.type.dtype), _promote(p1, sin.type.dtype)
    return (r_n, _code(p1), _code(pc), _code(ps), _code(_promote(pc, ps)))


def _block_heads(heads: int, block_half: int, L) -> int:
    return max(1, min(L.pow2(heads, 1), _TILE // (2 * block_half)))


def lower(node, L):
    op, ops, res = node.op, node.operands, node.results
    style, eps = node.attrs["style"], node.attrs["eps"]
    if op == "rope1":
        (q, cos, sin), ws = ops[:3], ops[3:]
        k = v = kc = vc = slots = None
        qw, kw = (ws[0], None) if ws else (None, None)
    elif op == "rope":
        (q, k, cos, sin), ws = ops[:4], ops[4:]
        v = kc = vc = slots = None
        qw, kw = ws if ws else (None, None)
    else:
        (q, k, v, cos, sin, kc, vc, slots), ws = ops[:8], ops[8:]
        qw, kw = ws if ws else (None, None)
    qo = res[0]
    ko = res[1] if op == "rope" else None
    cache = op == "rope_cache_write"

    hq, d = q.type.shape[1], q.type.shape[2]
    rotary = node.attrs.get("rotary_dim") or d
    half, passed = rotary // 2, d - rotary
    block_half = L.pow2(half, 1)
    hk = k.type.shape[1] if k is not None else 0
    hv, dv = (v.type.shape[1], v.type.shape[2]) if cache else (0, 1)
    f32 = bool(node.attrs.get("scale_f32"))
    rq = _rounding(q, cos, sin, qw, f32)
    rk = _rounding(k, cos, sin, kw, f32) if k is not None else (0,) * 5
    block_hq = _block_heads(hq, block_half, L)
    block_hk = _block_heads(max(hk, 1), block_half, L)
    block_dv = L.pow2(dv, 1)
    block_hv = max(1, min(L.pow2(max(hv, 1), 1), _TILE // block_dv))

    dummy_ptr = L.buf(q)
    zero = L.int(0)
    ptr = lambda val: L.buf(val) if val is not None else dummy_ptr
    stride = lambda val, dim: L.stride(val, dim) if val is not None else zero
    args = [L.buf(q), ptr(k), ptr(v), L.buf(cos), L.buf(sin), ptr(qw), ptr(kw), L.buf(qo),
            ptr(ko), ptr(kc), ptr(vc), ptr(slots),
            L.stride(q, 0), L.stride(q, 1), stride(k, 0), stride(k, 1), stride(v, 0),
            stride(v, 1), L.stride(cos, 0), L.stride(sin, 0), L.stride(qo, 0), L.stride(qo, 1),
            stride(ko, 0), stride(ko, 1), stride(kc, 1), stride(kc, 2), stride(vc, 1),
            stride(vc, 2), L.float(eps if eps is not None else 0.0)]
    constexprs = {
        "HQ": hq, "HK": hk, "HV": hv, "HALF": half, "DV": dv, "NEOX": style == "neox",
        "HAS_K": k is not None, "CACHE": cache, "HAS_NORM": qw is not None,
        "BLOCK_HQ": block_hq, "BLOCK_HK": block_hk, "BLOCK_HV": block_hv,
        "BLOCK_HALF": block_half, "BLOCK_DV": block_dv,
        "PASS": passed, "BLOCK_PASS": L.pow2(max(passed, 1), 1),
        "RQ_N": rq[0], "RQ_W": rq[1], "RQ_C": rq[2], "RQ_S": rq[3],
        "RK_N": rk[0], "RK_W": rk[1], "RK_C": rk[2], "RK_S": rk[3], "RK_O": rk[4],
    }
    biggest = max(block_hq, block_hk) * 2 * block_half
    L.launch(rope_kernel, grid=[L.rows(q, 2)], args=args, constexprs=constexprs,
             num_warps=8 if biggest >= 4096 else 4, num_stages=1)
