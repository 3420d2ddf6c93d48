"""LoRA shrink and expand: `lora(x, a, b, slots) {sizes}` as two launches (Punica's BGMV form).

    shrink  h[t, :]  = a[slot_t] @ x[t]            grid [T, cdiv(n*R, BLOCK_N)]   f32 workspace h [T, n*R]
    expand  d[t, c]  = b[slot_t, c, :] @ h[t, j(c)*R : (j(c)+1)*R]   grid [T, cdiv(O, BLOCK_O)]

Each program serves one token, reading its adapter's matrices by the token's slot: tokens
of different adapters (and base tokens, slot -1, which write zeros and load nothing) mix
freely in one launch, with no sort and no host work, so the launches are static-shaped
and sit inside captured CUDA graphs. A decode step reads each adapter row once per
token that uses it; a large prefill re-reads A per token (a segmented, token-tiled
shrink with tl.dot is the next step for long prompts).

Parts (a merged QKV or gate/up projection): output column c belongs to part
j(c) = (c >= E1) + (c >= E2) + (c >= E3), the parts' cumulative ends as constexprs,
so one expand launch serves up to four parts, each reading its own R columns of h.
Reductions use elementwise products and a sum in f32 (no tl.dot: ranks below 16 would
not meet its shape rules); the delta is rounded to the model dtype once, at the store.
"""

import triton
import triton.language as tl
# tl.sum and tl.zeros are @jit functions of triton.language, which the interpreter does not
# patch when triton was imported without TRITON_INTERPRET (see attention.py): tl.reduce with
# the standard combine function and tl.full are the same code compiled
from triton.language.standard import _sum_combine

OPS = ("lora",)

MAX_PARTS = 4
TILE = 4096                 # elements of one program's [rows, cols] tile


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, sx,
                       H: tl.constexpr, NR: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < NR
    s = tl.load(slots_ptr + t).to(tl.int64)
    acc = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
    if s >= 0:
        a_row = a_ptr + s * (NR * H) + n[:, None].to(tl.int64) * H
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < H
            xv = tl.load(x_ptr + t * sx + k, mask=km, other=0).to(tl.float32)
            av = tl.load(a_row + k[None, :], mask=nm[:, None] & km[None, :], other=0)
            acc += tl.reduce(av.to(tl.float32) * xv[None, :], 1, _sum_combine)
    tl.store(h_ptr + t * NR + n, acc, mask=nm)


@triton.jit
def lora_expand_kernel(h_ptr, b_ptr, slots_ptr, out_ptr, so,
                       O: tl.constexpr, R: tl.constexpr, NR: tl.constexpr,
                       E1: tl.constexpr, E2: tl.constexpr, E3: tl.constexpr,
                       BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    cm = c < O
    s = tl.load(slots_ptr + t).to(tl.int64)
    acc = tl.full([BLOCK_O], 0.0, dtype=tl.float32)
    if s >= 0:
        j = (c >= E1).to(tl.int32) + (c >= E2).to(tl.int32) + (c >= E3).to(tl.int32)
        r = tl.arange(0, BLOCK_R)
        m = cm[:, None] & (r < R)[None, :]
        hv = tl.load(h_ptr + t * NR + j[:, None] * R + r[None, :], mask=m, other=0)
        bv = tl.load(b_ptr + s * (O * R) + c[:, None].to(tl.int64) * R + r[None, :], mask=m,
                     other=0)
        acc = tl.reduce(bv.to(tl.float32) * hv, 1, _sum_combine)
    tl.store(out_ptr + t * so + c, acc.to(out_ptr.dtype.element_ty), mask=cm)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (int(n) - 1).bit_length()))


def lower(node, L):
    from braze.ir.errors import BrazeError
    x, a, b, slots = node.operands
    out = node.results[0]
    sizes = [int(s) for s in node.attrs["sizes"]]
    _, NR, H = a.type.shape
    O, R = sum(sizes), int(b.type.shape[2])
    if len(sizes) > MAX_PARTS:
        raise BrazeError(f"lora: the expand kernel serves up to {MAX_PARTS} merged parts, "
                         f"got {len(sizes)} ({sizes})")
    T = x.type.shape[0]
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    ends += [O] * (MAX_PARTS - 1 - len(ends))         # c >= O never holds for a real column
    h = L.ws("h", [T, NR], "f32")
    block_k = min(_pow2(H), 128)
    block_n = min(_pow2(NR), max(16, TILE // block_k))
    L.launch(lora_shrink_kernel, grid=[T, f"cdiv({NR}, {block_n})"],
             args=[L.buf(x), L.buf(a), L.buf(slots), h, L.stride(x, 0)],
             constexprs={"H": int(H), "NR": int(NR), "BLOCK_N": block_n, "BLOCK_K": block_k},
             num_warps=4, num_stages=1)
    block_r = _pow2(R)
    block_o = min(_pow2(O), max(16, TILE // block_r))
    L.launch(lora_expand_kernel, grid=[T, f"cdiv({O}, {block_o})"],
             args=[h, L.buf(b), L.buf(slots), L.buf(out), L.stride(out, 0)],
             constexprs={"O": O, "R": R, "NR": int(NR), "E1": ends[0], "E2": ends[1],
                         "E3": ends[2], "BLOCK_O": block_o, "BLOCK_R": block_r},
             num_warps=4, num_stages=1)
