"""RMSNorm kernels: `rms_norm(x, w)` and `add_rms_norm(a, b, w) -> (rms_norm(a + b, w), a + b)`.

Semantics (ir/op_fused_norm_rope.py, the oracle), per row of the last dim D:

    s    = (a.f32 + b.f32).to(sum dtype)                 add_rms_norm only: torch's `a + b`
    h    = x.f32                                         x = s for add_rms_norm
    rstd = rsqrt(sum(h * h) / D + eps)                   fp32
    y    = (h * rstd).to(x dtype)                        rounded to x's dtype, as the reference
    out  = (w.f32 * y.f32).to(out dtype)                 torch's `w * y` (promoted dtype)

With {scale_f32} (Gemma: (1 + w) folded into an f32 weight at compile time) y is not
rounded: out = (w.f32 * h * rstd).to(x dtype), the one cast the model makes.

All math is fp32; the two rounding points (the residual sum to its dtype before it
is normalised, and the normalised row to x's dtype before the weight) are where the
reference rounds, so f32 agrees to ~1e-6 and f16/bf16 to an ulp of the output.

Design
- Grid: [cdiv(rows, ROWS)], rows = product of the leading dims (an `L.expr` over T/S,
  so one compiled variant serves every batch size). Each program normalises ROWS
  whole rows; ROWS = 1 for hidden sizes (D >= 2048) and grows for small D (per-head
  norms, D = 128 -> 16 rows) so every program still moves a ~2048-element tile
  instead of launching a near-empty CTA per 256-byte row.
- Single pass (D <= 8192): BLOCK = next power of two of D, the whole row is loaded
  once into registers, reduced, scaled and stored: each element of x (or a, b) is
  read once and each output written once, the bandwidth minimum. The weight row is
  loaded once per program (it stays in L2 across programs).
- Two passes (D > 8192): 4096-wide chunks; pass 1 accumulates the sum of squares in
  an fp32 vector (for add_rms_norm it also writes the rounded sum s), pass 2 re-reads
  x (resp. s, just written by this program, L2-resident) and writes the output.
- D is a constexpr (a static model size), so column masks are provably uniform over
  each vector and loads/stores along the contiguous dim vectorise (16-byte accesses).
- num_warps scales with the tile: 4 up to 2048 elements, 8 at 4096, 16 above
  (bf16 D = 4096: 256 threads x 16 elements = two 16-byte loads per thread per tensor).
- Strided rows: only the last dim is assumed contiguous. Rank-2 inputs [R, D] use a
  row stride; rank-3 inputs [T, H, D] (per-head norms of q/k column slices of a
  merged QKV output) use two strides: row r -> (r // H, r % H). Every operand and
  result gets its own strides. Rank 1 is a single row; rank > 3 is rejected.
- Gathered rows (prune-logits): with a `rows` index operand (2-D inputs only) output row
  r reads input row idx[r], so the final norm of a step reads the sampled rows itself
  instead of after two index_select launches.
- In-place safe: a program reads every element of its rows (pass 1) before it writes
  the element (single pass) or writes only elementwise where it read, so the memory
  planner may alias `s` with `a`, or `out` with `x`/`b`.
"""

import triton
import triton.language as tl
# tl.sum is itself a @jit function of triton.language; the test harness interprets kernels in
# a process where triton was imported first, and its interpreter only patches builtins. Reducing
# with tl.reduce (a builtin) and tl.sum's own combine function is the same code when compiled
# and takes the interpreter's vectorised numpy sum.
from triton.language.standard import _sum_combine

OPS = ("rms_norm", "add_rms_norm")

MAX_SINGLE_PASS = 8192      # widest row held whole in registers
CHUNK = 4096                # column chunk of the two-pass variant
TILE = 2048                 # minimum elements per program for small D (ROWS > 1)


@triton.jit
def _split_rows(rows, n_inner):
    """(outer, inner) int64 indices of flat row r of an [outer, n_inner, D] view."""
    outer = rows // n_inner
    inner = (rows - outer * n_inner).to(tl.int64)
    return outer.to(tl.int64), inner


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, idx_ptr, n_rows, n_inner, eps,
                    x_s0, x_s1, o_s0, o_s1,
                    D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                    F32_SCALE: tl.constexpr, GATHER: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    outer, inner = _split_rows(rows, n_inner)
    if GATHER:      # output row r normalises input row idx[r] (2-D input)
        src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        x_row = (src * x_s0)[:, None]
    else:
        x_row = (outer * x_s0 + inner * x_s1)[:, None]
    o_row = (outer * o_s0 + inner * o_s1)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    if BLOCK >= D:
        m = rmask[:, None] & (cols < D)
        h = tl.load(x_ptr + x_row + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.reduce(h * h, 1, _sum_combine) / D + eps)
        y = h * rstd[:, None]
        if not F32_SCALE:
            y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(out_ptr + o_row + cols, (w * y).to(out_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.full([ROWS, BLOCK], 0.0, tl.float32)
        for start in range(0, D, BLOCK):
            c = start + cols
            m = rmask[:, None] & (c < D)
            h = tl.load(x_ptr + x_row + c, mask=m, other=0.0).to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.reduce(acc, 1, _sum_combine) / D + eps)[:, None]
        for start in range(0, D, BLOCK):
            c = start + cols
            m = rmask[:, None] & (c < D)
            h = tl.load(x_ptr + x_row + c, mask=m, other=0.0).to(tl.float32)
            y = h * rstd
            if not F32_SCALE:
                y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(tl.float32)
            tl.store(out_ptr + o_row + c, (w * y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def add_rms_norm_kernel(a_ptr, b_ptr, w_ptr, out_ptr, sum_ptr, idx_ptr, n_rows, n_inner, eps,
                        a_s0, a_s1, b_s0, b_s1, o_s0, o_s1, s_s0, s_s1,
                        D: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                        F32_SCALE: tl.constexpr, GATHER: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    outer, inner = _split_rows(rows, n_inner)
    if GATHER:      # output row r adds and normalises input rows idx[r] (2-D inputs)
        src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        a_row = (src * a_s0)[:, None]
        b_row = (src * b_s0)[:, None]
    else:
        a_row = (outer * a_s0 + inner * a_s1)[:, None]
        b_row = (outer * b_s0 + inner * b_s1)[:, None]
    o_row = (outer * o_s0 + inner * o_s1)[:, None]
    s_row = (outer * s_s0 + inner * s_s1)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    if BLOCK >= D:
        m = rmask[:, None] & (cols < D)
        a = tl.load(a_ptr + a_row + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + b_row + cols, mask=m, other=0.0).to(tl.float32)
        s = (a + b).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + s_row + cols, s, mask=m)
        h = s.to(tl.float32)
        rstd = tl.rsqrt(tl.reduce(h * h, 1, _sum_combine) / D + eps)
        y = h * rstd[:, None]
        if not F32_SCALE:
            y = y.to(sum_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(out_ptr + o_row + cols, (w * y).to(out_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.full([ROWS, BLOCK], 0.0, tl.float32)
        for start in range(0, D, BLOCK):
            c = start + cols
            m = rmask[:, None] & (c < D)
            a = tl.load(a_ptr + a_row + c, mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + b_row + c, mask=m, other=0.0).to(tl.float32)
            s = (a + b).to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + s_row + c, s, mask=m)
            h = s.to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.reduce(acc, 1, _sum_combine) / D + eps)[:, None]
        tl.debug_barrier()      # the sum row written above is read back below
        for start in range(0, D, BLOCK):
            c = start + cols
            m = rmask[:, None] & (c < D)
            h = tl.load(sum_ptr + s_row + c, mask=m, other=0.0).to(tl.float32)
            y = h * rstd
            if not F32_SCALE:
                y = y.to(sum_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(tl.float32)
            tl.store(out_ptr + o_row + c, (w * y).to(out_ptr.dtype.element_ty), mask=m)


def config(d: int) -> dict:
    """BLOCK, ROWS and num_warps for rows of width d."""
    if d <= MAX_SINGLE_PASS:
        block = max(16, 1 << (d - 1).bit_length())
        rows = max(1, TILE // block)
    else:
        block, rows = CHUNK, 1
    tile = block * rows
    warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return {"BLOCK": block, "ROWS": rows, "num_warps": warps}


def _rows_and_strides(L, v, what):
    """-> (n_inner, [stride of the outer rows, stride of the inner rows]) of a rank-1..3 value."""
    from braze.ir.errors import BrazeError
    rank = v.type.rank
    if rank == 1:
        return L.int(1), [L.int(0), L.int(0)]
    if rank == 2:
        return L.int(1), [L.stride(v, 0), L.int(0)]
    if rank == 3:
        return L.expr(v.type.shape[1]), [L.stride(v, 0), L.stride(v, 1)]
    raise BrazeError(f"{what}: the norm kernel takes rank 1-3 tensors, got {v.type}")


def lower(node, L):
    from braze.codegen.lowering import expr_text
    from braze.ir.errors import BrazeError
    d = node.operands[0].type.shape[-1]
    if not isinstance(d, int):
        raise BrazeError(f"{node.op}: the normalised dim must be concrete, got {node.operands[0].type}")
    cfg = config(d)
    rows = L.rows(node.results[0])         # with a rows index: its length, not the input's
    n_rows = L.expr(rows)
    grid = [f"cdiv({expr_text(rows)}, {cfg['ROWS']})"]
    if node.op == "rms_norm":
        x, w, *index = node.operands
        (out,) = node.results
        vals, kernel = [x, out], rms_norm_kernel
        head = [L.buf(x), L.buf(w), L.buf(out)]
    else:
        a, b, w, *index = node.operands
        out, s = node.results
        vals, kernel = [a, b, out, s], add_rms_norm_kernel
        head = [L.buf(a), L.buf(b), L.buf(w), L.buf(out), L.buf(s)]
    head.append(L.buf(index[0]) if index else L.buf(w))     # not read without GATHER
    n_inner, strides = None, []
    for v in vals:
        n_inner, st = _rows_and_strides(L, v, node.op)
        strides += st
    L.launch(kernel, grid=grid,
             args=head + [n_rows, n_inner, L.float(node.attrs["eps"])] + strides,
             constexprs={"D": d, "BLOCK": cfg["BLOCK"], "ROWS": cfg["ROWS"],
                         "F32_SCALE": bool(node.attrs.get("scale_f32")), "GATHER": bool(index)},
             num_warps=cfg["num_warps"], num_stages=1)
