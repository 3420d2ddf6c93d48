"""Matrix products and lookups: linear, matmul, einsum, embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BrazeError
from .op_pointwise import broadcast_shapes
from .ops import REQUIRED, OpDef, register
from .types import TensorType


def _same_dtype(op: str, types: list[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise BrazeError(f"{op}: operands must share a dtype, got {sorted(dtypes)}")
    return dtypes.pop()


def _linear_infer(types, attrs):
    x, w = types[0], types[1]
    if w.rank != 2 or x.rank < 1:
        raise BrazeError(f"linear: weight must be 2-D and input at least 1-D, got {w} and {x}")
    if x.shape[-1] != w.shape[1]:
        raise BrazeError(f"linear: input {x} does not match weight {w}")
    if len(types) == 3 and types[2].shape != (w.shape[0],):
        raise BrazeError(f"linear: bias {types[2]} does not match weight {w}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), _same_dtype("linear", types))]


# GEMMs stay torch calls (cuBLAS on a GPU); linear and matmul return fresh dense tensors,
# einsum may return a permuted view of its result
register(OpDef("linear", ("x", "weight", "bias?"), _linear_infer,
               lambda x, w, b=None: F.linear(x, w, b), extern=True, returns_dense=True,
               doc="F.linear(x, weight, bias): x @ weight.T"))


# The gated activations a linear_glu applies to the first half of its product, in torch's
# CPU form (the forms fused_pointwise bodies use, ir/op_pointwise.py)
GLU_ACTS = {"silu": F.silu,
            "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"),
            "gelu": F.gelu}


def _linear_glu_infer(types, attrs):
    (h,) = _linear_infer(types, attrs)
    if attrs["act"] not in GLU_ACTS:
        raise BrazeError(f"linear_glu: act must be one of {', '.join(GLU_ACTS)}, got "
                         f"{attrs['act']!r}")
    n = h.shape[-1]
    if not isinstance(n, int) or n % 2:
        raise BrazeError(f"linear_glu: the product's last dim must be even, got {h}")
    return [TensorType(h.shape[:-1] + (n // 2,), h.dtype), h]


def _linear_glu(x, w, b=None, *, act):
    h = F.linear(x, w, b)
    gate, up = h.chunk(2, dim=-1)
    return GLU_ACTS[act](gate) * up, h


# A gated MLP's up projection and its activation (passes/fuse_linear_glu.py): y is the
# model's act(gate) * up, h the product both halves come from. Which of the two a step
# computes is the lowering's choice (codegen/small_m_gemm.py): at decode sizes one kernel
# writes y straight from its accumulators and h is never written; at larger sizes cuBLAS
# writes h and a pointwise kernel makes y from it.
register(OpDef("linear_glu", ("x", "weight", "bias?"), _linear_glu_infer, _linear_glu,
               attrs={"act": REQUIRED},
               doc="h = F.linear(x, weight, bias); gate, up = h.chunk(2, -1); "
                   "-> (act(gate) * up, h)"))


def _matmul_infer(types, attrs):
    a, b = types
    if a.rank < 2 or b.rank < 2:
        raise BrazeError(f"matmul: operands must be at least 2-D, got {a} and {b}")
    if a.shape[-1] != b.shape[-2]:
        raise BrazeError(f"matmul: {a} @ {b} do not agree on the inner dimension")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [TensorType(batch + (a.shape[-2], b.shape[-1]), _same_dtype("matmul", types))]


register(OpDef("matmul", ("a", "b"), _matmul_infer, torch.matmul, extern=True, returns_dense=True,
               doc="torch.matmul(a, b)"))


def _einsum_infer(types, attrs):
    eq = attrs["equation"].replace(" ", "")
    if "->" not in eq or "." in eq:
        raise BrazeError(f"einsum: equation {eq!r} must be explicit ('ab,bc->ac') without '...'")
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    if len(subs) != len(types):
        raise BrazeError(f"einsum: {eq!r} names {len(subs)} operands, got {len(types)}")
    sizes: dict[str, object] = {}
    for sub, t in zip(subs, types):
        if len(sub) != t.rank:
            raise BrazeError(f"einsum: subscript {sub!r} does not match {t}")
        for ch, d in zip(sub, t.shape):
            if ch in sizes and sizes[ch] != d and d != 1 and sizes[ch] != 1:
                raise BrazeError(f"einsum: index {ch!r} has sizes {sizes[ch]} and {d}")
            if ch not in sizes or sizes[ch] == 1:
                sizes[ch] = d
    try:
        shape = tuple(sizes[ch] for ch in out)
    except KeyError as e:
        raise BrazeError(f"einsum: output index {e} appears in no operand of {eq!r}") from None
    return [TensorType(shape, _same_dtype("einsum", types))]


register(OpDef("einsum", ("xs*",), _einsum_infer,
               lambda *xs, equation: torch.einsum(equation, *xs),
               attrs={"equation": REQUIRED}, extern=True, doc="torch.einsum(equation, *xs)"))


def _embedding_infer(types, attrs):
    ids, w = types
    if ids.dtype not in ("i64", "i32") or w.rank != 2:
        raise BrazeError(f"embedding: needs integer ids and a 2-D table, got {ids} and {w}")
    return [TensorType(ids.shape + (w.shape[1],), w.dtype)]


register(OpDef("embedding", ("ids", "weight"), _embedding_infer, F.embedding,
               doc="weight[ids]"))
