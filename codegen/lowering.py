"""Helpers a kernel module's `lower(node, L)` uses to describe its launches (braze/launch.py).

    def lower(node, L):
        x, w = node.operands
        out = node.results[0]
        rows = L.rows(x)                                  # expression: product of all but last dim
        L.launch(rms_norm_kernel, grid=[rows], args=[L.buf(x), L.buf(w), L.buf(out), L.expr(rows),
                 L.int(x.type.shape[-1]), L.float(node.attrs["eps"]), L.stride(x, -2)],
                 constexprs={"BLOCK": L.pow2(x.type.shape[-1])}, num_warps=4)

Expressions are written from sympy dims at codegen time (`L.expr`), so index math
never reaches the runtime's hot path as sympy.
"""

from __future__ import annotations

import math

import sympy

from braze.ir import Node, Value
from braze.ir.errors import BrazeError

from .dim_code import launch_expr as expr_text     # templates write grids with it too

_TRITON_TYPES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "f64": "fp64", "i64": "i64",
                 "i32": "i32", "i16": "i16", "i8": "i8", "u8": "u8", "bool": "i1"}


class Lowering:
    """Collects the launches and workspaces of one node."""

    def __init__(self, node: Node, module: str, index: int = 0):
        self.node, self.module, self.index = node, module, index
        self.launches: list[dict] = []
        self.workspaces: dict[str, dict] = {}
        self.sources: dict[str, str] = {}     # generated kernel modules: name -> source

    def generated(self, module: str, source: str) -> None:
        """Register a generated kernel module; launches name it like a template module."""
        self.sources[module] = source

    # -- arguments -----------------------------------------------------------------
    def buf(self, v: Value) -> dict:
        return {"buf": v.ref, "ty": "*" + _TRITON_TYPES[v.type.dtype]}

    def ws(self, name: str, shape: list, dtype: str, zero: bool = False) -> dict:
        """A workspace; `zero`: allocated zeroed, and every launch that uses it leaves it
        zeroed again (a count the kernel resets), so it never needs a clearing launch."""
        full = f"ws.{self.index}.{name}"
        self.workspaces[full] = {"shape": [expr_text(d) for d in shape], "dtype": dtype}
        if zero:
            self.workspaces[full]["zero"] = True
        return {"ws": full, "ty": "*" + _TRITON_TYPES[dtype]}

    def expr(self, d) -> dict:
        return {"expr": expr_text(d), "ty": "i32"}

    def int(self, v: int) -> dict:
        return {"int": int(v), "ty": "i32"}

    def float(self, v: float) -> dict:
        return {"float": float(v), "ty": "fp32"}

    def stride(self, v: Value, dim: int) -> dict:
        return {"stride": [v.ref, dim], "ty": "i32"}

    # -- sizes ----------------------------------------------------------------------
    @staticmethod
    def rows(v: Value, keep_last: int = 1):
        """The product of all but the last `keep_last` dims (a sympy expr or int)."""
        n = sympy.Integer(1)
        for d in v.type.shape[: v.type.rank - keep_last]:
            n = n * d
        return int(n) if n.is_Integer else n

    @staticmethod
    def pow2(n: int, minimum: int = 16) -> int:
        if not isinstance(n, int):
            raise BrazeError(f"block size needs a concrete dim, got {n}")
        return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))

    # -- launches -------------------------------------------------------------------
    def launch(self, fn, grid: list, args: list, constexprs: dict | None = None,
               num_warps: int = 4, num_stages: int = 2, decode_idle: bool = False) -> None:
        """`decode_idle`: a decode-only step at T == S has nothing for this launch to do
        (another launch of the node covers it); braze/launch.py."""
        name = fn if isinstance(fn, str) else (getattr(fn, "__name__", None) or fn.fn.__name__)
        module = self.module
        if isinstance(fn, str) and "." in fn:          # "generated_module.kernel_name"
            module, name = fn.rsplit(".", 1)
        grid = [expr_text(g) if not isinstance(g, str) else g for g in grid] + ["1"] * (3 - len(grid))
        self.launches.append({"node": self.index, "module": module, "fn": name,
                              "grid": grid, "args": args, "constexprs": dict(constexprs or {}),
                              "num_warps": num_warps, "num_stages": num_stages})
        if decode_idle:
            self.launches[-1]["decode_idle"] = True
