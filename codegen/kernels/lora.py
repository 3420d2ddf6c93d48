"""LoRA shrink and expand: `lora(x, a, b, slots) {sizes}` as Punica/S-LoRA-style grouped GEMMs.

    shrink  h[t, :] = a[slot_t] @ x[t]                              f32 workspace h [T, n*R]
            grid [K, cdiv(T, BLOCK_T), cdiv(n*R, BLOCK_N)]
    expand  d[t, part j] = h[t, j*R : (j+1)*R] @ b[slot_t, part j]^T   one launch per part
            grid [K + 1, cdiv(T, BLOCK_T), cdiv(O_j, BLOCK_O)]

Batched over adapters by slot index, with no sort and no host work: program (k, tile)
serves the tokens of its BLOCK_T-token tile whose slot is k (a tile holding none of them
returns after loading the tile's slots), as a tl.dot over the tile with the other rows
masked. A prefill of one adapter reads its matrices once per tile; a decode batch mixing
adapters runs each adapter's rows of a tile in that adapter's program. The extra
program k = K of the expand writes zeros for base-model tokens (slot -1) and padding, so
every row of the result is written every step. The grid depends only on T (the bucket)
and K: static, so the launches sit inside captured CUDA graphs.

Parts (a merged QKV or gate/up projection) get one expand launch each, reading their own
R columns of h and writing their own output columns. The shrink multiplies in the model
dtype with f32 accumulation (input_precision "ieee" for f32 models: torch's f32 GEMMs use
no TF32); the expand is tiny (R columns) and runs in f32, rounding to the model dtype once.
Every block is at least 16 (tl.dot's minimum on hardware) and loads are masked, so ranks
below 16 and odd widths work.
"""

import triton
import triton.language as tl
# tl.max, tl.sum and tl.zeros are @jit functions of triton.language, which the interpreter
# does not patch when triton was imported without TRITON_INTERPRET (see attention.py):
# tl.reduce with the standard combine function and tl.full are the same code compiled
from triton.language.standard import _elementwise_max

OPS = ("lora",)

BLOCK_T = 32                # tokens per tile
MAX_BLOCK = 64              # widest N / K / O / R block


@triton.jit
def _mma(a, b, acc):
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _any(mask):
    return tl.reduce(mask.to(tl.int32), 0, _elementwise_max) > 0


@triton.jit
def lora_shrink_kernel(x_ptr, a_ptr, slots_ptr, h_ptr, n_tokens, sx,
                       H: tl.constexpr, NR: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    s = tl.load(slots_ptr + t, mask=t < n_tokens, other=-1)
    mine = s == k
    if _any(mine):
        t64 = t.to(tl.int64)
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < NR
        a_tile = a_ptr + k.to(tl.int64) * (NR * H) + n[None, :].to(tl.int64) * H
        acc = tl.full([BLOCK_T, BLOCK_N], 0.0, dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            km = kk < H
            xv = tl.load(x_ptr + t64[:, None] * sx + kk[None, :], mask=mine[:, None] & km[None, :],
                         other=0)
            av = tl.load(a_tile + kk[:, None], mask=km[:, None] & nm[None, :], other=0)
            acc = _mma(xv, av.to(xv.dtype), acc)
        tl.store(h_ptr + t64[:, None] * NR + n[None, :], acc, mask=mine[:, None] & nm[None, :])


@triton.jit
def lora_expand_kernel(h_ptr, b_ptr, slots_ptr, out_ptr, n_tokens, so,
                       K: tl.constexpr, O: tl.constexpr, R: tl.constexpr, NR: tl.constexpr,
                       C0: tl.constexpr, CN: tl.constexpr, H0: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    k = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < n_tokens
    s = tl.load(slots_ptr + t, mask=tm, other=K)
    t64 = t.to(tl.int64)
    c = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    cm = c < CN
    out = out_ptr + t64[:, None] * so + C0 + c[None, :]
    if k == K:
        base = tm & (s < 0)                 # base-model tokens and padding: no delta
        if _any(base):
            tl.store(out, tl.full([BLOCK_T, BLOCK_O], 0.0, dtype=out_ptr.dtype.element_ty),
                     mask=base[:, None] & cm[None, :])
    else:
        mine = s == k
        if _any(mine):
            b_tile = b_ptr + k.to(tl.int64) * (O * R) + (C0 + c[None, :]).to(tl.int64) * R
            acc = tl.full([BLOCK_T, BLOCK_O], 0.0, dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                rm = r < R
                hv = tl.load(h_ptr + t64[:, None] * NR + H0 + r[None, :],
                             mask=mine[:, None] & rm[None, :], other=0)
                bv = tl.load(b_tile + r[:, None], mask=rm[:, None] & cm[None, :], other=0)
                acc = tl.dot(hv, bv.to(tl.float32), acc, input_precision="ieee")
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mine[:, None] & cm[None, :])


def _block(n: int) -> int:
    return min(MAX_BLOCK, max(16, 1 << max(0, (int(n) - 1).bit_length())))


def lower(node, L):
    from braze.codegen.lowering import expr_text
    x, a, b, slots = node.operands
    out = node.results[0]
    sizes = [int(s) for s in node.attrs["sizes"]]
    K, NR, H = (int(d) for d in a.type.shape)
    O, R = sum(sizes), int(b.type.shape[2])
    T = x.type.shape[0]
    tiles = f"cdiv({expr_text(T)}, {BLOCK_T})"
    h = L.ws("h", [T, NR], "f32")
    block_n, block_k = _block(NR), _block(H)
    L.launch(lora_shrink_kernel, grid=[K, tiles, f"cdiv({NR}, {block_n})"],
             args=[L.buf(x), L.buf(a), L.buf(slots), h, L.expr(T), L.stride(x, 0)],
             constexprs={"H": H, "NR": NR, "BLOCK_T": BLOCK_T, "BLOCK_N": block_n,
                         "BLOCK_K": block_k},
             num_warps=4, num_stages=2)
    c0 = 0
    for j, cn in enumerate(sizes):
        block_o = _block(cn)
        L.launch(lora_expand_kernel, grid=[K + 1, tiles, f"cdiv({cn}, {block_o})"],
                 args=[h, L.buf(b), L.buf(slots), L.buf(out), L.expr(T), L.stride(out, 0)],
                 constexprs={"K": K, "O": O, "R": R, "NR": NR, "C0": c0, "CN": cn,
                             "H0": j * R, "BLOCK_T": BLOCK_T, "BLOCK_O": block_o,
                             "BLOCK_R": _block(R)},
                 num_warps=4, num_stages=2)
        c0 += cn
