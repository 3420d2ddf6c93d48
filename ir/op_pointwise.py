"""Elementwise ops: unary math, binary arithmetic with broadcasting, casts, where.

A binary op takes two tensor operands, or one operand and a Python scalar in
the `scalar` attribute (`scalar_first=true` when the scalar is the left side),
so `x * 0.5` keeps torch's exact type-promotion and rounding:

    %3: f32[T, 64] = mul(%2) {scalar=0.5}
    %4: f32[T, 64] = sub(%3) {scalar=1.0, scalar_first=true}     # 1.0 - %3
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BrazeError
from .ops import REQUIRED, OpDef, TritonForm, meta_dtype, register
from .types import TensorType, canon_dim, torch_dtype


def broadcast_shapes(*shapes: tuple) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j < 0:
                continue
            d = s[j]
            if d == 1:
                continue
            if dim == 1:
                dim = d
            elif dim != d:
                raise BrazeError("shapes " + " and ".join(f"[{', '.join(map(str, s))}]"
                                                         for s in shapes) + " do not broadcast")
        out.append(canon_dim(dim))
    return tuple(out)


def _unary(name: str, fn, triton: TritonForm, doc: str, attrs: dict | None = None) -> None:
    def infer(types, attrs):
        (x,) = types
        return [TensorType(x.shape, meta_dtype(fn, types, attrs))]

    def impl(x, **attrs):
        return fn(x, **attrs)

    register(OpDef(name, ("x",), infer, impl, attrs=attrs or {}, pointwise=True,
                   triton=triton, doc=doc))


# The kernel forms: division and sqrt are IEEE (div_rn, sqrt_rn), rsqrt is 1/sqrt and
# silu x / (1 + exp(-x)) as torch computes them on the CPU; tanh goes through the
# generator's _tanh (exp-based, with a series near 0)
for _name, _fn, _expr, _numerics in [
    ("neg", torch.neg, "-{x}", "exact"),
    ("exp", torch.exp, "tl.exp({x})", "float"),
    ("log", torch.log, "tl.log({x})", "float"),
    ("sqrt", torch.sqrt, "tl.sqrt_rn({x})", "float"),
    ("rsqrt", torch.rsqrt, "tl.div_rn(1.0, tl.sqrt_rn({x}))", "float"),
    ("sin", torch.sin, "tl.sin({x})", "float"),
    ("cos", torch.cos, "tl.cos({x})", "float"),
    ("tanh", torch.tanh, "_tanh({x})", "float"),
    ("sigmoid", torch.sigmoid, "tl.div_rn(1.0, 1.0 + tl.exp(-{x}))", "float"),
    ("silu", F.silu, "tl.div_rn({x}, 1.0 + tl.exp(-{x}))", "float"),
    ("relu", F.relu, "tl.where({x} < 0, 0, {x}).to({R})", "exact"),
    ("abs", torch.abs, "tl.abs({x})", "exact"),
    ("reciprocal", torch.reciprocal, "tl.div_rn(1.0, {x})", "float"),
    ("logical_not", torch.logical_not, "({x} == 0)", "raw"),
]:
    _unary(_name, _fn, TritonForm(_expr, _numerics), f"torch.{_fn.__name__}(x)")

# torch's CPU forms: x * 0.5 * (1 + erf(x / sqrt 2)); 0.5 * x * (1 + tanh(b * (x + k x^3)))
_unary("gelu", lambda x, approximate: F.gelu(x, approximate=approximate),
       TritonForm({"none": "{x} * 0.5 * (1.0 + tl.erf({x} * 0.7071067811865476))",
                   "tanh": "0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * "
                           "({x} * {x} * {x}))))"}, "float", by="approximate"),
       "F.gelu(x, approximate)", {"approximate": "none"})


_MIRROR = {"lt": torch.gt, "le": torch.ge, "gt": torch.lt, "ge": torch.le,
           "eq": torch.eq, "ne": torch.ne}
_NO_NUMBER = (torch.maximum, torch.minimum, torch.logical_and, torch.logical_or)


def _binary_call(fn, args, scalar, scalar_first):
    if scalar is None:
        if len(args) != 2:
            raise BrazeError(f"{fn.__name__} needs two tensor operands or a `scalar` attribute")
        return fn(args[0], args[1])
    if len(args) != 1:
        raise BrazeError(f"{fn.__name__} with a `scalar` attribute takes one tensor operand")
    x = args[0]
    if fn in _NO_NUMBER:
        # these take no Python number: a 0-d tensor of the dtype the number would promote to
        # gives the same result and dtype
        other = torch.tensor(scalar, dtype=torch.result_type(x, scalar), device=x.device)
        return fn(other, x) if scalar_first else fn(x, other)
    if scalar_first:
        if fn.__name__ in _MIRROR:          # comparisons take no number on the left: mirror
            return _MIRROR[fn.__name__](x, scalar)
        return fn(scalar, x)
    return fn(x, scalar)


def _binary(name: str, fn, triton: TritonForm, commutative: bool) -> None:
    def infer(types, attrs):
        shape = broadcast_shapes(*(t.shape for t in types))
        dtype = meta_dtype(lambda *a, **kw: _binary_call(fn, a, **kw), types, attrs)
        return [TensorType(shape, dtype)]

    def impl(*args, scalar, scalar_first):
        return _binary_call(fn, args, scalar, scalar_first)

    register(OpDef(name, ("a", "b?"), infer, impl,
                   attrs={"scalar": None, "scalar_first": False}, pointwise=True,
                   commutative=commutative, triton=triton,
                   doc=f"torch semantics of {name}(a, b) with broadcasting"))


def _pow(a, b):
    # torch.pow has no (Number, Tensor) overload on every version; ** does.
    return a ** b


for _name, _fn, _expr, _numerics, _commutative in [
    ("add", torch.add, "({a} + {b})", "arith", True),
    ("sub", torch.sub, "({a} - {b})", "arith", False),
    ("mul", torch.mul, "({a} * {b})", "scale", True),
    ("div", torch.div, "tl.div_rn({a}, {b})", "scale", False),
    ("pow", _pow, "_pow({a}, {b})", "pow", False),
    ("maximum", torch.maximum, "tl.maximum({a}, {b}{nan})", "minmax", True),
    ("minimum", torch.minimum, "tl.minimum({a}, {b}{nan})", "minmax", True),
    ("eq", torch.eq, "({a} == {b})", "compare", True),
    ("ne", torch.ne, "({a} != {b})", "compare", True),
    ("lt", torch.lt, "({a} < {b})", "compare", False),
    ("le", torch.le, "({a} <= {b})", "compare", False),
    ("gt", torch.gt, "({a} > {b})", "compare", False),
    ("ge", torch.ge, "({a} >= {b})", "compare", False),
    # as selects: the interpreter cannot `&` a 0-d bool with a block
    ("logical_and", torch.logical_and, "tl.where({a} != 0, {b} != 0, False)", "logical", True),
    ("logical_or", torch.logical_or, "tl.where({a} != 0, True, {b} != 0)", "logical", True),
]:
    _binary(_name, _fn, TritonForm(_expr, _numerics), _commutative)


def _cast_infer(types, attrs):
    return [types[0].with_dtype(attrs["dtype"])]


register(OpDef("cast", ("x",), _cast_infer,
               lambda x, dtype: x.to(torch_dtype(dtype)),
               attrs={"dtype": REQUIRED}, pointwise=True, triton=TritonForm("{x}", "convert"),
               doc="x.to(dtype)"))


def _where_infer(types, attrs):
    cond, a, b = types
    if cond.dtype != "bool":
        raise BrazeError(f"where: condition must be bool, got {cond.dtype}")
    shape = broadcast_shapes(cond.shape, a.shape, b.shape)
    return [TensorType(shape, meta_dtype(torch.where, types, attrs))]


register(OpDef("where", ("cond", "a", "b"), _where_infer, torch.where, pointwise=True,
               triton=TritonForm("tl.where({cond}, {a}, {b})", "select"),
               doc="torch.where(cond, a, b)"))
