"""The table from torch functions and tensor methods to IR ops.

Each handler gets the graph builder, the positional args and kwargs of one
fx node (fx nodes already replaced by IR values) and returns a Value or a
tuple of Values. A target missing here is reported by the tracer with the
module, function and source line that used it.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from braze.ir import Graph, Value
from braze.ir.errors import BrazeError
from braze.ir.types import dtype_name


def _is_val(x) -> bool:
    return isinstance(x, Value)


def _scalar(x):
    if isinstance(x, (bool, int, float)):
        return x
    raise BrazeError(f"expected a tensor or a Python number, got {type(x).__name__} {x!r}")


def binary(op: str):
    def h(g: Graph, a, b, **kw):
        if kw.get("alpha", 1) != 1:
            raise BrazeError(f"{op} with alpha={kw['alpha']} is not supported")
        if _is_val(a) and _is_val(b):
            return g.op(op, a, b)
        if _is_val(a):
            return g.op(op, a, scalar=_scalar(b))
        if _is_val(b):
            return g.op(op, b, scalar=_scalar(a), scalar_first=True)
        raise BrazeError(f"{op} of two constants should have been folded by Python")
    return h


def unary(op: str):
    def h(g: Graph, x, *args, **kw):
        return g.op(op, x)
    return h


def _dims(dim) -> list[int]:
    if dim is None:
        raise BrazeError("reductions over all dimensions are not supported; pass dim=")
    return [dim] if isinstance(dim, int) else list(dim)


def reduction(op: str):
    def h(g: Graph, x, dim=None, keepdim=False, **kw):
        if kw.get("dtype") is not None:
            x = g.op("cast", x, dtype=dtype_name(kw["dtype"]))
        return g.op(op, x, dims=_dims(dim), keepdim=keepdim)
    return h


def _to(g: Graph, x, *args, **kw):
    dtype = kw.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif _is_val(a):
            dtype = a.type.dtype
    if dtype is None:
        return x  # a device move: the IR has no devices
    return g.op("cast", x, dtype=dtype_name(dtype))


def _shape_args(args) -> list[int]:
    shape = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    for d in shape:
        if not isinstance(d, int):
            raise BrazeError(f"reshape sizes must be Python ints (use -1 for the token "
                             f"dimension instead of x.shape[0]); got {d!r}")
    return shape


def _reshape(g, x, *args, **kw):
    return g.op("reshape", x, shape=_shape_args(args or (kw.get("shape") or kw.get("size"),)))


def _transpose(g, x, d0, d1):
    dims = list(range(x.type.rank))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return g.op("permute", x, dims=dims)


def _permute(g, x, *dims):
    return g.op("permute", x, dims=_shape_args(dims))


def _softmax(g, x, dim=None, dtype=None, **kw):
    if dim is None:
        dim = kw.get("dim")
    return g.op("softmax", x, dim=dim, dtype=dtype_name(dtype) if dtype else None)


def _topk(g, x, k, dim=-1, largest=True, sorted=True):
    n = g.add_node("topk", [x], {"k": k, "dim": dim, "largest": largest, "sorted": sorted})
    return tuple(n.results)


def _cat(g, xs, dim=0):
    return g.op("cat", *xs, dim=dim)


def _split(g, x, sizes, dim=0):
    n = x.type.shape[dim]
    if isinstance(sizes, int):
        if not isinstance(n, int):
            raise BrazeError(f"split by chunk size along a symbolic dim ({n}) is not supported")
        sizes = [min(sizes, n - i) for i in range(0, n, sizes)]
    return tuple(g.add_node("split", [x], {"sizes": list(sizes), "dim": dim}).results)


def _chunk(g, x, chunks, dim=0):
    n = x.type.shape[dim]
    if not isinstance(n, int):
        raise BrazeError(f"chunk along a symbolic dim ({n}) is not supported")
    step = -(-n // chunks)
    return _split(g, x, step, dim)


def _einsum(g, equation, *xs):
    if len(xs) == 1 and isinstance(xs[0], (list, tuple)):
        xs = xs[0]
    return g.op("einsum", *xs, equation=equation)


def _linear(g, x, weight, bias=None):
    return g.op("linear", *([x, weight] + ([bias] if bias is not None else [])))


def _zeros_like(g, x, **kw):
    out = g.op("full_like", x, value=0.0 if x.type.dtype not in ("i64", "i32") else 0)
    return _to(g, out, dtype=kw["dtype"]) if kw.get("dtype") else out


def _scatter(g, x, dim, index, src):
    if not _is_val(src):
        raise BrazeError("scatter with a scalar source is not supported")
    return g.op("scatter", x, index, src, dim=dim)


def _unsqueeze(g, x, dim):
    return g.op("unsqueeze", x, dim=dim)


def _squeeze(g, x, dim=None):
    if dim is None:
        raise BrazeError("squeeze() without dim is not supported: name the dimension")
    return g.op("squeeze", x, dim=dim)


def _expand(g, x, *sizes):
    return g.op("expand", x, shape=_shape_args(sizes))


def _pow(g, x, exponent):
    return binary("pow")(g, x, exponent)


def _getitem(g, x, index):
    if isinstance(x, (tuple, list)):
        return x[index]
    if not _is_val(x):
        raise BrazeError(f"cannot index {type(x).__name__}")
    idx = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (slice(None),) * (x.type.rank - n_real) + idx[at + 1:]
    dim = 0
    for i in idx:
        if i is None:
            x = g.op("unsqueeze", x, dim=dim)
            dim += 1
        elif isinstance(i, slice):
            if i != slice(None):
                x = g.op("slice", x, dim=dim, start=i.start, end=i.stop, step=i.step or 1)
            dim += 1
        elif isinstance(i, int):
            x = g.op("select", x, dim=dim, index=i)
        elif _is_val(i):
            if i.type.rank != 1:
                raise BrazeError("only 1-D integer tensor indices are supported")
            x = g.op("index_select", x, i, dim=dim)
            dim += 1
        else:
            raise BrazeError(f"unsupported index {i!r}")
    return x


def _method_float(g, x):
    return g.op("cast", x, dtype="f32")


def _identity(g, x, *a, **kw):
    return x


def _where(g, cond, a, b):
    return g.op("where", cond, a, b)


FUNCTIONS = {
    operator.add: binary("add"), torch.add: binary("add"),
    operator.sub: binary("sub"), torch.sub: binary("sub"),
    operator.mul: binary("mul"), torch.mul: binary("mul"),
    operator.truediv: binary("div"), torch.div: binary("div"),
    operator.pow: binary("pow"), torch.pow: binary("pow"),
    operator.ge: binary("ge"), operator.gt: binary("gt"), operator.le: binary("le"),
    operator.lt: binary("lt"),
    torch.maximum: binary("maximum"), torch.minimum: binary("minimum"),
    operator.neg: unary("neg"), torch.neg: unary("neg"),
    torch.exp: unary("exp"), torch.log: unary("log"), torch.sqrt: unary("sqrt"),
    torch.rsqrt: unary("rsqrt"), torch.sin: unary("sin"), torch.cos: unary("cos"),
    torch.tanh: unary("tanh"), torch.sigmoid: unary("sigmoid"), torch.abs: unary("abs"),
    F.silu: unary("silu"), F.relu: unary("relu"), torch.relu: unary("relu"),
    F.gelu: lambda g, x, approximate="none": g.op("gelu", x, approximate=approximate),
    torch.mean: reduction("mean"), torch.sum: reduction("sum"), torch.amax: reduction("amax"),
    F.softmax: _softmax, torch.softmax: _softmax, torch.topk: _topk,
    torch.cat: _cat, torch.concat: _cat, torch.split: _split, torch.chunk: _chunk,
    torch.einsum: _einsum, F.linear: _linear, torch.matmul: lambda g, a, b: g.op("matmul", a, b),
    operator.matmul: lambda g, a, b: g.op("matmul", a, b),
    F.embedding: lambda g, ids, w: g.op("embedding", ids, w),
    torch.zeros_like: _zeros_like, torch.where: _where,
    torch.full_like: lambda g, x, value, **kw: g.op("full_like", x, value=_scalar(value)),
    torch.gather: lambda g, x, dim, index: g.op("gather", x, index, dim=dim),
    torch.unsqueeze: _unsqueeze, torch.reshape: _reshape, torch.transpose: _transpose,
    operator.getitem: _getitem,
}

METHODS = {
    "add": binary("add"), "sub": binary("sub"), "mul": binary("mul"), "div": binary("div"),
    "pow": _pow, "neg": unary("neg"), "exp": unary("exp"), "rsqrt": unary("rsqrt"),
    "sqrt": unary("sqrt"), "sin": unary("sin"), "cos": unary("cos"), "tanh": unary("tanh"),
    "sigmoid": unary("sigmoid"), "abs": unary("abs"),
    "mean": reduction("mean"), "sum": reduction("sum"), "amax": reduction("amax"),
    "softmax": _softmax, "topk": _topk, "float": _method_float, "to": _to,
    "type_as": lambda g, x, other: _to(g, x, other),
    "view": _reshape, "reshape": _reshape, "transpose": _transpose, "permute": _permute,
    "unsqueeze": _unsqueeze, "squeeze": _squeeze, "expand": _expand, "contiguous": _identity,
    "split": _split, "chunk": _chunk, "scatter": _scatter,
    "gather": lambda g, x, dim, index: g.op("gather", x, index, dim=dim),
    "index_select": lambda g, x, dim, index: g.op("index_select", x, index, dim=dim),
}
