"""Reductions along dimensions: sum, mean, amax, argmax, softmax, topk."""

from __future__ import annotations

import torch

from .errors import BrazeError
from .ops import REQUIRED, OpDef, meta_dtype, register
from .types import TensorType


def norm_dim(d: int, rank: int, op: str) -> int:
    if not -rank <= d < max(rank, 1):
        raise BrazeError(f"{op}: dim {d} out of range for rank {rank}")
    return d % rank if rank else 0


def _reduce(name: str, fn, combine: str) -> None:
    def infer(types, attrs):
        (x,) = types
        if not attrs["dims"]:
            raise BrazeError(f"{name}: name the dims to reduce (dims=[] would mean all of them "
                             f"in torch, which braze does not express)")
        dims = {norm_dim(d, x.rank, name) for d in attrs["dims"]}
        if len(dims) != len(attrs["dims"]):
            raise BrazeError(f"{name}: dims {attrs['dims']} name a dimension twice")
        if attrs["keepdim"]:
            shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
        else:
            shape = [s for i, s in enumerate(x.shape) if i not in dims]
        return [TensorType(tuple(shape), meta_dtype(fn, types, attrs))]

    register(OpDef(name, ("x",), infer, fn, attrs={"dims": REQUIRED, "keepdim": False},
                   reduction=True, combine=combine, doc=f"{name} over `dims`"))


_reduce("sum", lambda x, dims, keepdim: torch.sum(x, dim=list(dims), keepdim=keepdim), "sum")
_reduce("mean", lambda x, dims, keepdim: torch.mean(x, dim=list(dims), keepdim=keepdim), "mean")
_reduce("amax", lambda x, dims, keepdim: torch.amax(x, dim=list(dims), keepdim=keepdim), "max")


def _argmax_infer(types, attrs):
    (x,) = types
    d = norm_dim(attrs["dim"], x.rank, "argmax")
    shape = [1 if i == d else s for i, s in enumerate(x.shape)] if attrs["keepdim"] else \
        [s for i, s in enumerate(x.shape) if i != d]
    return [TensorType(tuple(shape), "i64")]


register(OpDef("argmax", ("x",), _argmax_infer,
               lambda x, dim, keepdim: torch.argmax(x, dim=dim, keepdim=keepdim),
               attrs={"dim": REQUIRED, "keepdim": False}, reduction=True))


def _softmax(x, dim, dtype):
    from .types import torch_dtype
    return torch.softmax(x, dim=dim, dtype=torch_dtype(dtype) if dtype else None)


def _softmax_infer(types, attrs):
    (x,) = types
    norm_dim(attrs["dim"], x.rank, "softmax")
    return [TensorType(x.shape, attrs["dtype"] or x.dtype)]


register(OpDef("softmax", ("x",), _softmax_infer, _softmax,
               attrs={"dim": REQUIRED, "dtype": None}, reduction=True,
               doc="torch.softmax(x, dim, dtype)"))


def _topk_infer(types, attrs):
    (x,) = types
    d = norm_dim(attrs["dim"], x.rank, "topk")
    k = attrs["k"]
    if isinstance(x.shape[d], int) and k > x.shape[d]:
        raise BrazeError(f"topk: k={k} is larger than dim {d} of size {x.shape[d]}")
    shape = tuple(k if i == d else s for i, s in enumerate(x.shape))
    return [TensorType(shape, x.dtype), TensorType(shape, "i64")]


def _topk(x, k, dim, largest, sorted):
    out = torch.topk(x, k, dim=dim, largest=largest, sorted=sorted)
    return out.values, out.indices


register(OpDef("topk", ("x",), _topk_infer, _topk,
               attrs={"k": REQUIRED, "dim": -1, "largest": True, "sorted": True},
               doc="torch.topk: (values, indices)"))
