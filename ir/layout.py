"""Strides of graph values as the runtime lays them out: the one layout analysis.

Used by plan-memory (which view results share their operand's storage), the
pointwise code generator (which strides it may bake into a kernel) and the kernel
specialiser (which integer arguments are 1 or multiples of 16, as Triton's JIT
would see them).

A value's storage is dense (a graph input, a parameter, an arena slot, a GEMM's
`out=` buffer) or a view of another value's; what a view op does to strides is
found by running it on meta tensors at two unrelated prime-sized probes, so no
size coincidence makes a copy look like a view or a varying stride look fixed.
A stride is an int, a sympy expression over the step symbols (dense strides over
symbolic dims), or None: not known before run time.
"""

from __future__ import annotations

import functools
from typing import Callable

import sympy
import torch

from .ops import all_ops
from .types import eval_dim, torch_dtype

# ops whose result only re-describes its operand's storage (the registry's `view`; a
# reshape torch cannot express as a view of the operand's strides is the exception: it copies)
VIEW_OPS = frozenset(name for name, opdef in all_ops().items() if opdef.view)

PROBES = ({"T": 1021, "S": 67, "MB": 37, "NB": 41, "R": 89},
          {"T": 4093, "S": 131, "MB": 61, "NB": 53, "R": 211})


def dense_strides(shape) -> list:
    """Row-major strides of `shape`: ints where the trailing dims are ints, else sympy."""
    out, acc = [], sympy.Integer(1)
    for d in reversed(shape):
        out.append(int(acc) if acc.is_Integer else acc)
        acc = acc * d
    return out[::-1]


def _probe_strides(shape) -> list | None:
    """Row-major strides of `shape` at each probe, or None when it cannot be sized there."""
    sizes = _at_probes(shape)
    return None if sizes is None else [dense_strides(list(s)) for s in sizes]


@functools.lru_cache(maxsize=8192)
def _at_probes(shape: tuple) -> tuple | None:
    """`shape` at each probe (sympy is slow: a graph repeats a few shapes many times)."""
    try:
        return tuple(tuple(eval_dim(d, p) for d in shape) for p in PROBES)
    except (TypeError, ValueError, RuntimeError):
        return None


def run_view(node, src: list) -> list | None:
    """Per probe, per result of view `node`: its strides, from running the op on meta
    tensors with the operand's strides `src` (one list per probe); None: torch copies (a
    reshape it cannot view), so the results are dense tensors of their own."""
    x = node.operands[0]
    shapes = _at_probes(x.type.shape)
    per_probe = []
    for shape, strides in zip(shapes, src):
        m = torch.empty_strided(shape, strides,
                                dtype=torch_dtype(x.type.dtype), device="meta")
        try:
            out = m.view(node.attrs["shape"]) if node.op == "reshape" else node.opdef.impl(m, **node.attrs)
        except (RuntimeError, IndexError, ValueError):
            return None
        per_probe.append([list(o.stride()) for o in (out if isinstance(out, (tuple, list)) else (out,))])
    return per_probe


class Layouts:
    """Each value's strides (see the module docstring), computed once per value.

    `dense(node)` says whether a non-view node's results are dense tensors: always, for
    bound launch plans (every result is written into its planned slot); an eager extern
    op's own tensor may have any layout, so the pointwise generator passes a stricter rule."""

    def __init__(self, dense: Callable[[object], bool] = lambda node: True):
        self.dense = dense
        self._probed: dict = {}      # value -> its strides at each probe, or None (unknown)
        self._own: set = set()       # values with dense storage of their own

    def probed(self, v) -> list | None:
        """`v`'s strides at each of PROBES, or None when its layout is not known."""
        if v in self._probed:
            return self._probed[v]
        p = v.producer
        out = None
        if p is not None and p.opdef.view:
            src = self.probed(p.operands[0])
            views = run_view(p, src) if src is not None else None
            if views is not None:
                out = [per_result[p.results.index(v)] for per_result in views]
            elif src is not None:                  # torch copies: dense storage of its own
                self._own.add(v)
                out = _probe_strides(v.type.shape)
        elif p is None or self.dense(p):
            self._own.add(v)
            out = _probe_strides(v.type.shape)
        self._probed[v] = out
        return out

    def __call__(self, v) -> list:
        """Per dim of `v`: its stride as an int or sympy expression, or None (read at run
        time: unknown, or a view's stride that differs between the probes)."""
        probed = self.probed(v)
        if v in self._own:
            return dense_strides(v.type.shape)
        if probed is None:
            return [None] * v.type.rank
        return [a if all(a == b for b in rest) else None
                for a, *rest in zip(*probed)]

    def is_view(self, node) -> bool:
        """Whether view-op `node`'s results share its operand's storage (a reshape of a value
        whose layout is unknown counts as a copy)."""
        if self.probed(node.operands[0]) is None:
            return node.op != "reshape"
        self.probed(node.results[0])
        return node.results[0] not in self._own
