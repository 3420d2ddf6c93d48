"""Data movement kernels: `index_select(x, index) {dim}` and `cat(xs...) {dim}`.

Where they occur: prune-logits gathers the sampled rows of the final hidden states,
`index_select(h: [T, H], logits_indices: i64[R]) {dim=0}`, and the RoPE preamble
builds `cat(freqs, freqs) {dim=-1}` ([T, D/2] twice into [T, D]). Unfused graphs
also hold other dims and ranks (the GPT-J rotation cats [T, H, D/2, 1] pieces on
the last dim; `x[idx]` indexing gathers on any dim), so both kernels take any dim
of a rank 1-4 tensor.

Layout model: a tensor [..., W] is rows of its contiguous last dim W (only the last
dim is assumed contiguous), the leading dims padded on the left to three levels
(n0, n1, n2) with a runtime stride each; row r -> (i0, i1, i2) by two divisions.
Every operand and result has its own strides, so views (column slices, permutes)
are read in place.

index_select  grid [cdiv(rows of out, ROWS)]; each program copies ROWS output rows.
    Gather on a leading dim (dim 0 of [T, H]: the prune-logits case): the row's
    source index is `index[i_dim]` (one scalar load per row), then the W-wide row is
    copied with vectorised loads/stores. Gather on the last dim: per-column indices,
    loaded once per column block and shared by the program's rows. Indices outside
    [0, x.shape[dim]) (torch raises) produce zero rows instead of reading out of
    bounds: padded index entries never fault.
cat  one launch per run of identical consecutive operands (cat(f, f) is one launch):
    the operand is read once and stored NREP times at its offsets along dim. On the
    last dim the column offset is a constexpr (stores stay aligned/vectorisable);
    on another dim the offset is a runtime expression times the output's stride.
Both: W is a constexpr when concrete (uniform masks -> 16-byte accesses), BLOCK =
next power of two of W up to 4096 (wider rows loop), ROWS = 2048 // BLOCK rows per
program so that narrow rows ([T, 8] RoPE halves) still give each program a real
tile; num_warps 4 up to 2048-element tiles, 8 at 4096. These ops move a few MB at
most per step, so one pass over the data with no extra traffic is the whole design.
"""

import triton
import triton.language as tl

OPS = ("index_select", "cat")

TILE = 2048                 # elements per program for narrow rows
MAX_BLOCK = 4096            # widest column block; wider rows loop
RUNTIME_BLOCK = 1024        # column block when the row width is symbolic


@triton.jit
def _split_rows(rows, n1, n2):
    """(i0, i1, i2) int64 indices of flat row r of an [n0, n1, n2, cols] view."""
    q = rows // n2
    i2 = (rows - q * n2).to(tl.int64)
    i0 = q // n1
    i1 = (q - i0 * n1).to(tl.int64)
    return i0.to(tl.int64), i1, i2


@triton.jit
def index_select_kernel(src_ptr, idx_ptr, dst_ptr, n_rows, n1, n2, n_src, n_cols, idx_stride,
                        s0, s1, s2, d0, d1, d2,
                        W: tl.constexpr, GL: tl.constexpr, BLOCK: tl.constexpr,
                        ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    i0, i1, i2 = _split_rows(rows, n1, n2)
    dst_row = (i0 * d0 + i1 * d1 + i2 * d2)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    n_c = n_cols
    if W > 0:
        n_c = W
    if GL == 3:
        # gather along the last dim: one index per output column
        src_row = (i0 * s0 + i1 * s1 + i2 * s2)[:, None]
        for start in range(0, n_c, BLOCK):
            c = start + cols
            cm = c < n_c
            j = tl.load(idx_ptr + c.to(tl.int64) * idx_stride, mask=cm, other=-1).to(tl.int64)
            ok = cm & (j >= 0) & (j < n_src)
            v = tl.load(src_ptr + src_row + j, mask=rmask[:, None] & ok, other=0)
            tl.store(dst_ptr + dst_row + c, v, mask=rmask[:, None] & cm)
    else:
        # gather along leading level GL: the row's source index comes from index[i_GL]
        g = i0
        if GL == 1:
            g = i1
        if GL == 2:
            g = i2
        j = tl.load(idx_ptr + g * idx_stride, mask=rmask, other=-1).to(tl.int64)
        ok = rmask & (j >= 0) & (j < n_src)
        if GL == 0:
            src_row = j * s0 + i1 * s1 + i2 * s2
        elif GL == 1:
            src_row = i0 * s0 + j * s1 + i2 * s2
        else:
            src_row = i0 * s0 + i1 * s1 + j * s2
        src_row = src_row[:, None]
        for start in range(0, n_c, BLOCK):
            c = start + cols
            cm = c < n_c
            v = tl.load(src_ptr + src_row + c, mask=ok[:, None] & cm, other=0)
            tl.store(dst_ptr + dst_row + c, v, mask=rmask[:, None] & cm)


@triton.jit
def cat_copy_kernel(src_ptr, dst_ptr, n_rows, n1, n2, n_cols, off, size_d,
                    s0, s1, s2, d0, d1, d2, d_cat,
                    W: tl.constexpr, OFF: tl.constexpr, LAST: tl.constexpr,
                    NREP: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    i0, i1, i2 = _split_rows(rows, n1, n2)
    src_row = (i0 * s0 + i1 * s1 + i2 * s2)[:, None]
    dst_row = (i0 * d0 + i1 * d1 + i2 * d2)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    n_c = n_cols
    if W > 0:
        n_c = W
    if LAST:
        # cat on the last dim: operand k of the run lands at columns OFF + k * W
        for start in range(0, n_c, BLOCK):
            c = start + cols
            m = rmask[:, None] & (c < n_c)
            v = tl.load(src_ptr + src_row + c, mask=m)
            for k in range(NREP):
                tl.store(dst_ptr + dst_row + (OFF + k * W) + c, v, mask=m)
    else:
        # cat on a leading dim: shift by off (+ k * size_d) along it, in output strides
        base = dst_row + off.to(tl.int64) * d_cat
        step = size_d.to(tl.int64) * d_cat
        for start in range(0, n_c, BLOCK):
            c = start + cols
            m = rmask[:, None] & (c < n_c)
            v = tl.load(src_ptr + src_row + c, mask=m)
            for k in range(NREP):
                tl.store(dst_ptr + base + k * step + c, v, mask=m)


def _block(w) -> tuple[int, int, int]:
    """(W constexpr or 0 when symbolic, BLOCK, ROWS) for rows of width w."""
    if isinstance(w, int):
        block = min(MAX_BLOCK, max(16, 1 << max(0, (w - 1).bit_length())))
        return w, block, max(1, TILE // block)
    return 0, RUNTIME_BLOCK, max(1, TILE // RUNTIME_BLOCK)


def _warps(block: int, rows: int) -> int:
    tile = block * rows
    return 4 if tile <= 2048 else 8


def _levels(L, v, shape=None):
    """-> ([n1, n2] exprs, [s0, s1, s2] strides) of v's leading dims padded to three levels."""
    shape = list(shape if shape is not None else v.type.shape)
    lead = len(shape) - 1
    pad = 3 - lead
    sizes = [1] * pad + shape[:lead]
    strides = [L.int(0)] * pad + [L.stride(v, d) for d in range(lead)]
    return [L.expr(sizes[1]), L.expr(sizes[2])], strides


def _rows(shape):
    import sympy
    n = sympy.Integer(1)
    for d in shape[:-1]:
        n = n * d
    return int(n) if n.is_Integer else n


def _check_rank(node, rank):
    from braze.ir.errors import BrazeError
    if not 1 <= rank <= 4:
        raise BrazeError(f"{node.op}: the gather kernels take rank 1-4 tensors, got rank {rank}")


def lower(node, L):
    from braze.codegen.lowering import expr_text
    if node.op == "index_select":
        _lower_index_select(node, L, expr_text)
    else:
        _lower_cat(node, L, expr_text)


def _lower_index_select(node, L, expr_text):
    x, index = node.operands
    out = node.results[0]
    rank = x.type.rank
    _check_rank(node, rank)
    d = node.attrs["dim"] % rank
    gl = 3 if d == rank - 1 else d + (4 - rank)
    w, block, rows_per = _block(out.type.shape[-1])
    n_rows = _rows(out.type.shape)
    _, src_strides = _levels(L, x)
    (n1, n2), dst_strides = _levels(L, out)         # rows run over the output's index space
    L.launch(index_select_kernel, grid=[f"cdiv({expr_text(n_rows)}, {rows_per})"],
             args=[L.buf(x), L.buf(index), L.buf(out), L.expr(n_rows), n1, n2,
                   L.expr(x.type.shape[d]), L.expr(out.type.shape[-1]), L.stride(index, 0)]
             + src_strides + dst_strides,
             constexprs={"W": w, "GL": gl, "BLOCK": block, "ROWS": rows_per},
             num_warps=_warps(block, rows_per), num_stages=1)


def _lower_cat(node, L, expr_text):
    out = node.results[0]
    rank = out.type.rank
    _check_rank(node, rank)
    d = node.attrs["dim"] % rank
    last = d == rank - 1
    runs = []                                   # [value, count] of identical consecutive operands
    for v in node.operands:
        if runs and runs[-1][0] is v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    off = 0
    for v, nrep in runs:
        size_d = v.type.shape[d]
        if size_d == 0:
            continue
        w, block, rows_per = _block(v.type.shape[-1])
        n_rows = _rows(v.type.shape)
        (n1, n2), src_strides = _levels(L, v)
        _, dst_strides = _levels(L, out, v.type.shape)
        const_off = last and isinstance(off, int) and w > 0
        L.launch(cat_copy_kernel, grid=[f"cdiv({expr_text(n_rows)}, {rows_per})"],
                 args=[L.buf(v), L.buf(out), L.expr(n_rows), n1, n2, L.expr(v.type.shape[-1]),
                       L.expr(off), L.expr(size_d)] + src_strides + dst_strides
                 + [L.stride(out, d)],
                 constexprs={"W": w, "OFF": off if const_off else 0, "LAST": const_off,
                             "NREP": nrep, "BLOCK": block, "ROWS": rows_per},
                 num_warps=_warps(block, rows_per), num_stages=1)
        off = off + size_d * nrep
