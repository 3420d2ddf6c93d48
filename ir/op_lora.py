"""The LoRA delta of a linear, batched over adapters by a per-token slot index.

    %d: f32[T, 192] = lora(%x, %lora_a.L0.qkv_proj, %lora_b.L0.qkv_proj, %lora_slots) {sizes=[64, 64, 64]}

    x      [T, H]        the linear's input
    a      [K, n*R, H]   per slot, the n stacked "A" (down) matrices of the linear's n parts
                         (one part for a plain linear; q, k, v for a merged QKV projection)
    b      [K, O, R]     per slot, the "B" (up) matrices, the parts' rows one after another
                         (O = sum(sizes)); the adapter's scale is folded in when it is loaded
    slots  i32[T]        the adapter slot of each token; -1 = none (the delta is 0)

Semantics (Punica / S-LoRA's shrink then expand):

    h[t]      = a[s_t] @ x[t]                            # [n*R], in f32   ("shrink")
    d[t, c]   = b[s_t, c, :] @ h[t, j(c)*R : (j(c)+1)*R]  # c in part j(c) ("expand")
    d         = 0 where s_t < 0; rounded to x.dtype once

Part j of the output (columns sum(sizes[:j]) .. + sizes[j]) reads only its own R
columns of h: a merged projection's parts keep their own adapters' matrices. A rank
r < R fills the first r rows of A and columns of B; the rest stay zero.

Shapes are static (K slots, rank R fixed at compile time), so the op sits inside a
captured CUDA graph whatever the batch's adapters are. The reference below loops
over the K slots with masks (no gather of [T, R, H] weights, no host sync).
"""

from __future__ import annotations

import torch

from .errors import BrazeError
from .ops import REQUIRED, OpDef, register
from .types import TensorType, is_float


def _lora_infer(types, attrs):
    x, a, b, slots = types
    sizes = list(attrs["sizes"])
    if x.rank != 2 or a.rank != 3 or b.rank != 3 or slots.rank != 1:
        raise BrazeError(f"lora: want x [T, H], a [K, n*R, H], b [K, O, R], slots [T]; got "
                         f"{x}, {a}, {b}, {slots}")
    if slots.dtype not in ("i32", "i64"):
        raise BrazeError(f"lora: slots must be integers, got {slots}")
    if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
        raise BrazeError(f"lora: sizes must be positive ints, got {sizes}")
    k, nr, h = a.shape
    r = b.shape[2]
    if a.shape[2] != x.shape[1] or b.shape[0] != k or b.shape[1] != sum(sizes) \
            or nr != r * len(sizes):
        raise BrazeError(f"lora: shapes disagree: x {x}, a {a}, b {b}, sizes {sizes}")
    if not (is_float(x.dtype) and x.dtype == a.dtype == b.dtype):
        raise BrazeError(f"lora: x, a and b must share one float dtype, got {x}, {a}, {b}")
    return [TensorType((x.shape[0], sum(sizes)), x.dtype)]


def lora_reference(x, a, b, slots, sizes):
    K, _, _ = a.shape
    R = b.shape[2]
    xf = x.float()
    out = torch.zeros(x.shape[0], sum(sizes), dtype=torch.float32, device=x.device)
    for k in range(K):
        m = (slots == k).to(torch.float32)[:, None]
        h = (xf @ a[k].float().T) * m
        off = 0
        for j, o in enumerate(sizes):
            out[:, off:off + o] += h[:, j * R:(j + 1) * R] @ b[k, off:off + o].float().T
            off += o
    return out.to(x.dtype)


register(OpDef("lora", ("x", "a", "b", "slots"), _lora_infer, lora_reference,
               attrs={"sizes": REQUIRED}, returns_dense=True,
               doc="per token t with slot s >= 0: B[s] (A[s] x[t]), part by part; 0 for s = -1"))
