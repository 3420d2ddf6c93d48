"""The op registry: every op braze knows, declared once.

An op declares its operands (a trailing `*` marks a variadic operand, a
trailing `?` an optional one), its attributes with defaults (`REQUIRED` for
none), shape/dtype inference over `TensorType`s, a reference implementation in
plain torch, and its properties:

    pointwise    elementwise with broadcasting; fusable into pointwise groups
    reduction    reduces over `dims`; may end a pointwise group
    combine      for a reduction a generated kernel computes: how it combines a row
                 ("sum", "mean" = sum / count, "max" = NaN-propagating maximum)
    graph_break  piecewise CUDA graphs cut here and run it eagerly (attention: a lowering
                 may read the step on the host); mode full captures it when it is bound
                 as kernels whose launches the bucket fixes
    writes       indices of operands the op mutates in place (persistent state)
    view         the result only re-describes the operand's storage (reshape, slice,
                 ...: torch may copy where it cannot, see ir/layout.py)
    commutative  two tensor operands in either order compute the same value
    last_dim_rowwise  every result works over the last dim of operand 0, each leading index
                 on its own (rms_norm and its fused forms): a result row depends only on
                 the same row of the operands, so rows may be dropped before it
    same_type_is_identity  a result with its operand's exact type is that operand
                 (reshape to the same shape, a full expand or slice)
    extern       stays a call of the torch implementation by design, never a kernel
                 (GEMMs run on cuBLAS; every view op is extern too)
    returns_dense  the torch implementation returns a fresh dense tensor, so an extern
                 call's result layout is known at codegen time
    triton       how a generated pointwise kernel computes it (`TritonForm`)

Everything the compiler knows about an op is here: a new op is one `register`
call, and passes and codegen read these properties instead of lists of op names.
Op definitions live in the `op_*.py` modules beside this one, grouped by kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import BrazeError
from .types import TensorType


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()

InferFn = Callable[[list[TensorType], dict], list[TensorType]]
ImplFn = Callable[..., Any]


@dataclass(frozen=True)
class TritonForm:
    """A pointwise op in a generated kernel (codegen/pointwise_kernel.py).

    `expr` is a Triton expression over the operands' code: `{x}` for a unary op, `{a}`
    and `{b}` for a binary one, `{cond}`, `{a}`, `{b}` for where; `{R}` is the result's
    Triton dtype. It may call the generator's device functions (`_tanh`, `_pow`). With
    `by`, `expr` is a dict from the value of that attribute to the expression.

    `numerics` names the rule (codegen/pointwise_ops.py) that converts the operands and
    rounds the result, so the kernel rounds where torch does:
        convert   the operand converted to the result dtype (cast)
        exact     operands converted to the result dtype R and computed in R
        raw       operands as they are
        float     the operand in R's opmath type (f32 for f16/bf16), the result rounded to R
        arith     two operands rounded to R, computed in opmath(R), rounded to R
        scale     as arith, but a right-hand number or one-element tensor keeps its fp32
                  value (torch's CPU mul and div)
        compare   operands in their common dtype
        minmax    operands in R; `{nan}` is where NaN propagation goes for floats
        select    cond as it is, a and b in R
        logical   truth values; a Python-number operand folds by the op's own reference
        pow       torch's special cases of the exponent, else fp64 exp/log
    """
    expr: str | dict
    numerics: str
    by: str | None = None

    def expression(self, attrs: dict) -> str:
        return self.expr if self.by is None else self.expr[attrs[self.by]]


@dataclass
class OpDef:
    name: str
    operands: tuple[str, ...]
    infer: InferFn
    impl: ImplFn
    attrs: dict[str, Any] = field(default_factory=dict)
    pointwise: bool = False
    reduction: bool = False
    combine: str | None = None
    graph_break: bool = False
    writes: tuple[int, ...] = ()
    view: bool = False
    commutative: bool = False
    last_dim_rowwise: bool = False
    same_type_is_identity: bool = False
    extern: bool = False
    returns_dense: bool = False
    triton: TritonForm | None = None
    doc: str = ""

    def __post_init__(self):
        if self.view:
            self.extern = True          # a view is torch's business: it costs no kernel

    def check_arity(self, n: int) -> None:
        fixed = [o for o in self.operands if not o.endswith(("*", "?"))]
        optional = [o for o in self.operands if o.endswith("?")]
        variadic = any(o.endswith("*") for o in self.operands)
        if n < len(fixed) or (not variadic and n > len(fixed) + len(optional)):
            raise BrazeError(
                f"op '{self.name}' takes operands ({', '.join(self.operands)}), got {n}")

    def resolve_attrs(self, attrs: dict) -> dict:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise BrazeError(
                f"op '{self.name}' has no attribute(s) {sorted(unknown)}; "
                f"it takes {sorted(self.attrs) or 'none'}")
        out = {}
        for k, default in self.attrs.items():
            if k in attrs:
                out[k] = attrs[k]
            elif default is REQUIRED:
                raise BrazeError(f"op '{self.name}' needs attribute '{k}'")
            else:
                out[k] = default
        return out

    def explicit_attrs(self, attrs: dict) -> dict:
        """The attributes that differ from their defaults: what the text form prints."""
        return {k: v for k, v in attrs.items()
                if self.attrs.get(k, REQUIRED) is REQUIRED or self.attrs[k] != v
                or type(self.attrs[k]) is not type(v)}


OPS: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.name in OPS:
        raise ValueError(f"op {opdef.name} registered twice")
    OPS[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    _load_definitions()
    try:
        return OPS[name]
    except KeyError:
        raise BrazeError(f"unknown op '{name}'; known ops: {', '.join(sorted(OPS))}") from None


def all_ops() -> dict[str, OpDef]:
    _load_definitions()
    return dict(OPS)


_loaded = False


def _load_definitions() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        # every ir/op_*.py module defines ops; new op families need only a new file
        import importlib
        import pkgutil
        from pathlib import Path
        for mod in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
            if mod.name.startswith("op_"):
                importlib.import_module(f"{__package__}.{mod.name}")


def meta_dtype(fn: Callable, types: list[TensorType], attrs: dict) -> str:
    """The dtype torch would give: run the reference on tiny meta tensors.

    Rank-0 operands stay rank-0 so torch's type-promotion rules for
    zero-dim tensors apply exactly as they will at run time.
    """
    from .types import dtype_name, torch_dtype
    args = [torch.empty((1,) * t.rank if t.rank else (), dtype=torch_dtype(t.dtype), device="meta")
            for t in types]
    try:
        out = fn(*args, **attrs)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise BrazeError(f"invalid operands or attributes: {e}") from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    return dtype_name(out.dtype)
