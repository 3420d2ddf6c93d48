"""Ops that move data without arithmetic: views, slices, concatenation, indexing."""

from __future__ import annotations

import sympy
import torch

from .errors import BrazeError
from .op_reduce import norm_dim
from .ops import REQUIRED, OpDef, register
from .types import TensorType, canon_dim


def _reshape_infer(types, attrs):
    (x,) = types
    shape = list(attrs["shape"])
    if shape.count(-1) > 1:
        raise BrazeError(f"reshape: at most one -1 in {shape}")
    numel = sympy.sympify(x.numel())
    if -1 in shape:
        known = 1
        for d in shape:
            if d != -1:
                known *= d
        rest = numel / known if known else sympy.Integer(0)
        if sympy.sympify(rest).is_integer is not True:
            raise BrazeError(f"reshape: {x} cannot be viewed as {shape} (the -1 dim would be "
                             f"{rest}, not a whole number for every size)")
        shape[shape.index(-1)] = canon_dim(rest)
    else:
        total = 1
        for d in shape:
            total *= d
        if sympy.expand(numel - total) != 0:
            raise BrazeError(f"reshape: {x} has a different number of elements from {shape}")
    return [x.with_shape(shape)]


register(OpDef("reshape", ("x",), _reshape_infer, lambda x, shape: x.reshape(shape),
               attrs={"shape": REQUIRED}, view=True, same_type_is_identity=True,
               doc="x.reshape(shape); one -1 allowed"))


def _permute_infer(types, attrs):
    (x,) = types
    dims = [norm_dim(d, x.rank, "permute") for d in attrs["dims"]]
    if sorted(dims) != list(range(x.rank)):
        raise BrazeError(f"permute: {attrs['dims']} is not a permutation of {x.rank} dims")
    return [x.with_shape([x.shape[d] for d in dims])]


register(OpDef("permute", ("x",), _permute_infer, lambda x, dims: x.permute(dims),
               attrs={"dims": REQUIRED}, view=True))


def _unsqueeze_infer(types, attrs):
    (x,) = types
    d = norm_dim(attrs["dim"], x.rank + 1, "unsqueeze")
    return [x.with_shape(x.shape[:d] + (1,) + x.shape[d:])]


register(OpDef("unsqueeze", ("x",), _unsqueeze_infer, lambda x, dim: x.unsqueeze(dim),
               attrs={"dim": REQUIRED}, view=True))


def _squeeze_infer(types, attrs):
    (x,) = types
    d = norm_dim(attrs["dim"], x.rank, "squeeze")
    if not isinstance(x.shape[d], int):
        raise BrazeError(f"squeeze: dim {d} of {x} is symbolic; it would vanish only when it "
                         f"is 1 at run time, so the result type is unknown")
    if x.shape[d] != 1:
        return [x]
    return [x.with_shape(x.shape[:d] + x.shape[d + 1:])]


register(OpDef("squeeze", ("x",), _squeeze_infer, lambda x, dim: x.squeeze(dim),
               attrs={"dim": REQUIRED}, view=True))


def _expand_infer(types, attrs):
    (x,) = types
    shape = list(attrs["shape"])
    if len(shape) < x.rank:
        raise BrazeError(f"expand: {shape} has fewer dims than {x}")
    lead = len(shape) - x.rank
    out = []
    for i, d in enumerate(shape):
        src = x.shape[i - lead] if i >= lead else None
        if d == -1:
            if src is None:
                raise BrazeError(f"expand: -1 not allowed in new leading dim {i}")
            out.append(src)
        else:
            if src is not None and src != 1 and src != d:
                raise BrazeError(f"expand: cannot expand {x} to {shape}")
            out.append(d)
    return [x.with_shape(out)]


register(OpDef("expand", ("x",), _expand_infer, lambda x, shape: x.expand(shape),
               attrs={"shape": REQUIRED}, view=True, same_type_is_identity=True,
               doc="x.expand(shape); -1 keeps a dim"))


def _slice_infer(types, attrs):
    (x,) = types
    d = norm_dim(attrs["dim"], x.rank, "slice")
    size = x.shape[d]
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if step < 1:
        raise BrazeError(f"slice: step must be positive, got {step}")
    if isinstance(size, int):
        n = len(range(*slice(start, end, step).indices(size)))
    elif (start or 0) >= 0 and end is None:
        n = sympy.ceiling((size - (start or 0)) / step)
        n = canon_dim(n if not start else sympy.Max(0, n))
    else:
        raise BrazeError(f"slice: cannot take [{start}:{end}:{step}] of symbolic dim {size}")
    return [x.with_shape(x.shape[:d] + (n,) + x.shape[d + 1:])]


def _slice(x, dim, start, end, step):
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


register(OpDef("slice", ("x",), _slice_infer, _slice,
               attrs={"dim": REQUIRED, "start": None, "end": None, "step": 1}, view=True,
               same_type_is_identity=True,
               doc="x[..., start:end:step, ...] along dim"))


def _select_infer(types, attrs):
    (x,) = types
    d = norm_dim(attrs["dim"], x.rank, "select")
    return [x.with_shape(x.shape[:d] + x.shape[d + 1:])]


register(OpDef("select", ("x",), _select_infer,
               lambda x, dim, index: x.select(dim, index),
               attrs={"dim": REQUIRED, "index": REQUIRED}, view=True, doc="x.select(dim, index)"))


def _cat_infer(types, attrs):
    first = types[0]
    d = norm_dim(attrs["dim"], first.rank, "cat")
    total = 0
    for t in types:
        if t.rank != first.rank or t.dtype != first.dtype or any(
                a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != d):
            raise BrazeError(f"cat: operands {[str(t) for t in types]} differ outside dim {d}")
        total = total + t.shape[d]
    return [first.with_shape(first.shape[:d] + (canon_dim(total),) + first.shape[d + 1:])]


register(OpDef("cat", ("xs*",), _cat_infer, lambda *xs, dim: torch.cat(xs, dim=dim),
               attrs={"dim": REQUIRED}, doc="torch.cat(xs, dim)"))


def _split_infer(types, attrs):
    (x,) = types
    d = norm_dim(attrs["dim"], x.rank, "split")
    sizes = attrs["sizes"]
    if isinstance(x.shape[d], int) and sum(sizes) != x.shape[d]:
        raise BrazeError(f"split: sizes {sizes} do not add up to dim {d} of {x}")
    return [x.with_shape(x.shape[:d] + (s,) + x.shape[d + 1:]) for s in sizes]


register(OpDef("split", ("x",), _split_infer,
               lambda x, sizes, dim: tuple(torch.split(x, list(sizes), dim=dim)),
               attrs={"sizes": REQUIRED, "dim": REQUIRED}, view=True,
               doc="torch.split: one result per size"))


def _index_select_infer(types, attrs):
    x, index = types
    d = norm_dim(attrs["dim"], x.rank, "index_select")
    if index.rank != 1 or index.dtype not in ("i64", "i32"):
        raise BrazeError(f"index_select: index must be 1-D integer, got {index}")
    return [x.with_shape(x.shape[:d] + (index.shape[0],) + x.shape[d + 1:])]


register(OpDef("index_select", ("x", "index"), _index_select_infer,
               lambda x, index, dim: torch.index_select(x, dim, index),
               attrs={"dim": REQUIRED}, doc="torch.index_select(x, dim, index)"))


def _arange_infer(types, attrs):
    n = attrs["n"]
    if types or not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BrazeError(f"arange: takes no operands and a positive int n, got {len(types)} "
                         f"operands and n={n!r}")
    return [TensorType((n,), "i64")]


register(OpDef("arange", (), _arange_infer, lambda n: torch.arange(n, dtype=torch.int64),
               attrs={"n": REQUIRED},
               doc="0, 1, ..., n - 1 (i64): the positions a derived parameter tabulates a "
                   "function of the step's positions over (passes/tabulate_positions.py)"))


def _gather_infer(types, attrs):
    x, index = types
    norm_dim(attrs["dim"], x.rank, "gather")
    return [index.with_dtype(x.dtype)]


register(OpDef("gather", ("x", "index"), _gather_infer,
               lambda x, index, dim: torch.gather(x, dim, index), attrs={"dim": REQUIRED}))


def _scatter_infer(types, attrs):
    x, index, src = types
    norm_dim(attrs["dim"], x.rank, "scatter")
    if index.shape != src.shape:
        raise BrazeError(f"scatter: index {index} and src {src} must have one shape")
    return [x]


register(OpDef("scatter", ("x", "index", "src"), _scatter_infer,
               lambda x, index, src, dim: torch.scatter(x, dim, index, src.to(x.dtype)),
               attrs={"dim": REQUIRED}, doc="out-of-place torch.scatter(x, dim, index, src)"))


register(OpDef("full_like", ("x",), lambda types, attrs: [types[0]],
               lambda x, value: torch.full_like(x, value),
               attrs={"value": REQUIRED}, doc="a tensor like x filled with value"))
