"""Embedding gather: out[t, :] = weight[ids[t], :]; one program per token, the row in blocks."""

import triton
import triton.language as tl

OPS = ("embedding",)


@triton.jit
def embedding_kernel(ids_ptr, w_ptr, out_ptr, hidden, w_stride, out_stride,
                     BLOCK: tl.constexpr):
    t = tl.program_id(0)
    row = tl.load(ids_ptr + t).to(tl.int64)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < hidden
        tl.store(out_ptr + t * out_stride + cols, tl.load(w_ptr + row * w_stride + cols, mask=m),
                 mask=m)


def lower(node, L):
    ids, w = node.operands
    out = node.results[0]
    hidden = w.type.shape[1]
    tokens = L.rows(out)
    L.launch(embedding_kernel, grid=[tokens],
             args=[L.buf(ids), L.buf(w), L.buf(out), L.int(hidden), L.stride(w, 0),
                   L.stride(out, -2)],
             constexprs={"BLOCK": min(L.pow2(hidden), 1024)}, num_warps=4)
