"""Sympy dims as integer code: the one printer for launch expressions and generated kernels.

A dim (an int, or a sympy expression over T, S, MB, NB) prints in the integer
grammar both consumers share: literals, `+`, `*` (symbols before numbers), `//` for
an exact or floor division. The dialects differ only in what the caller names:

- how a symbol is spelt: `T` in a launch expression (braze/launch.py evaluates it
  when a batch size is bound), the kernel argument `sym_T` in Triton code;
- how a ceiling division is written: `cdiv(a, b)` for launch.py, `((a + b - 1) // b)`
  in a kernel;
- whether `max(...)` exists: launch.py has it, a kernel's integer code does not.
"""

from __future__ import annotations

from typing import Callable

import sympy

from braze.ir.errors import BrazeError


class DimPrinter:
    def __init__(self, symbol: Callable[[str], str], cdiv: Callable[[str, str], str],
                 has_max: bool, unprintable: str):
        self.symbol, self.cdiv, self.has_max = symbol, cdiv, has_max
        self.unprintable = unprintable      # the error message, `{d}` standing for the dim

    def __call__(self, d) -> str:
        if isinstance(d, int):
            return str(d)
        d = sympy.sympify(d)
        if d.is_Integer:
            return str(int(d))
        if d.is_Symbol:
            return self.symbol(d.name)
        if d.is_Add:
            return "(" + " + ".join(self(a) for a in d.args) + ")"
        if d.is_Mul:
            num, den = sympy.fraction(d)
            if den != 1:
                return f"({self(num)} // {self(den)})"
            factors = sorted(d.args, key=lambda a: a.is_Number)     # symbols first
            return "(" + " * ".join(self(a) for a in factors) + ")"
        if isinstance(d, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(d.args[0]))
            if isinstance(d, sympy.floor):
                return f"({self(num)} // {self(den)})"
            return self.cdiv(self(num), self(den))
        if isinstance(d, sympy.Max) and self.has_max:
            return f"max({', '.join(self(a) for a in d.args)})"
        raise BrazeError(self.unprintable.format(d=d))


# the launch-expression dialect (braze/launch.py: ints, T/S/MB/NB, + - * //, cdiv, max)
launch_expr = DimPrinter(symbol=lambda name: name, cdiv=lambda a, b: f"cdiv({a}, {b})",
                         has_max=True,
                         unprintable="cannot express dimension {d} as a launch expression")


def kernel_printer(symbols: list[str]) -> DimPrinter:
    """The Triton-code dialect: a symbol is the kernel argument `sym_<name>`, and each one
    used is appended to `symbols` (the kernel's size arguments, in order of first use)."""
    def symbol(name: str) -> str:
        if name not in symbols:
            symbols.append(name)
        return f"sym_{name}"
    return DimPrinter(symbol=symbol, cdiv=lambda a, b: f"(({a} + {b} - 1) // {b})",
                      has_max=False, unprintable="fused_pointwise: cannot write size {d} in a kernel")
