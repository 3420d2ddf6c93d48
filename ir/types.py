"""Tensor types: a dtype and a shape whose dims are ints or sympy expressions.

The symbols are the few sizes that change from step to step or from host to
host; everything else is a concrete int fixed at compile time:

    T   tokens in the step (padded)
    S   sequences in the step
    R   logits rows in the step (the rows the LM head computes after prune-logits: one
        per sequence, or up to k + 1 per sequence when speculative decoding verifies k
        proposed tokens; docs/batch-contract.md)
    NB  blocks in the paged KV cache (chosen by the runtime from free memory)
    MB  blocks per sequence in the block table (max_model_len / block_size)

Sympy is used for shape inference and index math only, never on a hot path.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Union

import sympy
import torch
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from .dim_grammar import MAX_DIGITS, read_dim
from .errors import BrazeError

T = sympy.Symbol("T", integer=True, positive=True)
S = sympy.Symbol("S", integer=True, positive=True)
NB = sympy.Symbol("NB", integer=True, positive=True)
MB = sympy.Symbol("MB", integer=True, positive=True)
R = sympy.Symbol("R", integer=True, positive=True)
SYMBOLS = {"T": T, "S": S, "NB": NB, "MB": MB, "R": R}

Dim = Union[int, sympy.Expr]

DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BrazeError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise BrazeError(f"dtype {dtype} has no braze IR name; known: {', '.join(DTYPES)}")
    return DTYPE_NAMES[dtype]


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[dtype_name(name)]


def is_float(name: str) -> bool:
    return torch_dtype(name).is_floating_point


def canon_dim(d) -> Dim:
    """An int stays an int; an expression that simplifies to an integer becomes one."""
    if isinstance(d, bool):
        raise BrazeError(f"dimension must be an int or expression, got {d!r}")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Integer):
        return int(d)
    if isinstance(d, sympy.Expr):
        return int(d) if d.is_Integer else d
    raise BrazeError(f"dimension must be an int or sympy expression, got {d!r}")


_INT = re.compile(rf"-?[0-9]{{1,{MAX_DIGITS}}}")


@functools.lru_cache(maxsize=4096)
def parse_dim(text: str) -> Dim:
    """An int, or an integer-valued expression over the declared symbols, read by the small
    grammar of ir/dim_grammar.py (dimension text is never evaluated, by Python or sympy)."""
    text = text.strip()
    if _INT.fullmatch(text):
        return int(text)
    try:
        expr = read_dim(text, SYMBOLS)
    except BrazeError as e:
        raise BrazeError(f"cannot parse dimension {text[:80]!r}: {e}; dimensions are ints or "
                         f"expressions over {', '.join(SYMBOLS)} with + - * / ( ) and "
                         f"ceiling, floor, Max, Min") from None
    if not isinstance(expr, sympy.Expr) or expr.is_integer is not True:
        raise BrazeError(f"dimension {text!r} is not an integer expression over "
                         f"{', '.join(SYMBOLS)}")
    return canon_dim(expr)


def dim_str(d: Dim) -> str:
    return str(d) if isinstance(d, int) else _expr_str(d)


class _DimPrinter(StrPrinter):
    """sympy's text, but a power as a product (`(T*T)`): the dimension grammar has no `**`."""

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.as_base_exp()
        if exp.is_Integer and exp > 1:
            return "(" + "*".join([self.parenthesize(base, PRECEDENCE["Mul"])] * int(exp)) + ")"
        return super()._print_Pow(expr, rational)


_PRINTER = _DimPrinter()


@functools.lru_cache(maxsize=4096)
def _expr_str(d) -> str:
    # sympy's printer is slow, and the same few expressions (T, S + 1, ...) print thousands of times
    return _PRINTER.doprint(d)


def eval_dim(d: Dim, bindings: dict[str, int]) -> int:
    if isinstance(d, int):
        return d
    return int(d.subs({SYMBOLS[k]: v for k, v in bindings.items() if k in SYMBOLS}))


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


@dataclass(frozen=True)
class TensorType:
    shape: tuple
    dtype: str

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(canon_dim(d) for d in self.shape))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self) -> Dim:
        n = sympy.Integer(1)
        for d in self.shape:
            n = n * d
        return canon_dim(n)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype) -> "TensorType":
        return TensorType(self.shape, dtype_name(dtype))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(dim_str(d) for d in self.shape)}]"

    def concrete_shape(self, bindings: dict[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, bindings) for d in self.shape)
