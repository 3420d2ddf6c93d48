"""The generated Triton kernel of a pointwise body: iteration space, addressing, source.

Every `fused_pointwise` node, and every pointwise op left standing after fusion
(`cast`, `mul`, `cos`, ...: lowered as a one-node body), becomes one kernel whose
source is generated from the body graph (`ir/op_pointwise_group.py`) and
registered as module `pw_<12 hex>` (a hash of the source, so the layers of a
model share one module per distinct group). What each op computes, and how it
rounds, is codegen/pointwise_ops.py; this module decides where every element is.
What a program does:

- pointwise-only bodies: the iteration space S is flattened to 1-D. Program p
  handles elements [p*BLOCK, (p+1)*BLOCK) of S (BLOCK=1024, 4 warps; less for
  small static spaces); grid = cdiv(numel(S), BLOCK). The output is contiguous,
  so stores are plain vector stores at the flat offset. Each input is read
  through its own strides: a flat index is split into per-dim indices only for
  the dims an input actually varies along (division by literal sizes), and 0 is
  the stride of every broadcast dim; an input with the full space's shape and a
  row-major layout is read at the flat offset directly.
- bodies with row reductions (sum/mean/amax over the last dim): program p holds
  ROWS whole rows of S as a [ROWS, BLOCK_N] register tile, BLOCK_N = next pow2
  of the (concrete) last dim; ROWS*BLOCK_N ~ 2K elements (ROWS=1 for rows of
  2K and more), num_warps from the tile size; grid = cdiv(rows(S), ROWS). A
  reduction is a `tl.sum`/`tl.reduce` along axis 1 (masked columns set to the
  identity) giving a [ROWS, 1] value that broadcasts back over the row, so
  RMSNorm, softmax or QK-norm read the row once and write it once.

Values keep the shapes their IR types imply: a [T, 1] value is a [ROWS, 1]
tile (or a per-lane value in the 1-D kernel), a [D] weight a [1, BLOCK_N] tile,
a scalar a 0-d value loaded once. An output smaller than the space (a [T, 1]
row statistic read outside the group) is stored only by the lanes at index 0
of its broadcast dims. Masks cover ragged sizes (numel, rows, columns).

Strides are decided at codegen time where they can be: graph inputs, params and
results of kernels and of extern ops whose torch call returns a fresh dense
tensor (the registry's `returns_dense`: GEMMs) are dense, and views of them
(split halves of the gate_up GEMM, slices, permutes, expands) get their strides
by replaying the view ops on meta tensors at two probe sizes (ir/layout.py);
those strides become literals, so the compiler sees contiguity and divisibility
(vector loads). Anything else (results of other extern ops, or strides that
depend on T) is read at run time (`L.stride`). Symbolic sizes enter as `L.expr`
arguments of the symbols themselves (`sym_T`), and sizes are formed in the kernel
(`sym_T * 4096`, codegen/dim_code.py) so the compiler knows their divisibility.
Offsets are int32 unless a space or input could exceed 2**31 elements with T, S
<= 65536.

Limits: a row kernel keeps whole rows in registers (no looped variant), so rows
beyond ~16K elements spill.
"""

from __future__ import annotations

import hashlib

import sympy

from braze.ir import Graph, print_graph
from braze.ir.layout import Layouts, dense_strides
from braze.ir.op_pointwise_group import parse_body, reduces_rows
from braze.ir.types import SYMBOLS

from .dim_code import kernel_printer
from .kernels import kernel_module_for
from .lowering import Lowering
from .pointwise_ops import FLOATS, HELPERS, OpEmitter, conv

_BIG = 65536                   # the largest T (S, ...) the int32 offset check allows for
_TILE = 2048                   # elements per row-kernel program tile


def lower(node, L):
    body, operands = _body_of(node)
    gen = _Kernel(body, operands, node.results)
    source = gen.source()
    name = "pw_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    L.generated(name, source)
    args = ([L.buf(v) for v in operands] + [L.buf(r) for r in node.results]
            + [L.expr(SYMBOLS[s]) for s in gen.sym_names]
            + [L.stride(v, d) for v, d in gen.runtime_strides])
    L.launch(f"{name}.kernel", grid=[gen.grid], args=args, constexprs=gen.constexprs,
             num_warps=gen.num_warps)


def _body_of(node):
    """(parsed Body, the outer operands its inputs stand for); a lone op is a one-node body."""
    if node.op == "fused_pointwise":
        return parse_body(node.attrs["body"]), list(node.operands)
    g = Graph("group")
    operands, local = [], {}
    for v in node.operands:
        if v not in local:
            local[v] = g.add_input(f"in{len(operands)}", v.type)
            operands.append(v)
    n = g.add_node(node.op, [local[v] for v in node.operands], dict(node.attrs),
                   types=[r.type for r in node.results])
    g.set_output("out0", n.results[0])
    return parse_body(print_graph(g)), operands


# -- layouts --------------------------------------------------------------------------------------

def _dense_result(node) -> bool:
    """Results the runtime hands this kernel as dense tensors: those of extern ops the
    registry says return fresh dense tensors (`returns_dense`: GEMMs) and of kernels (arena
    slots); another eager extern op's own tensor may have any layout, so its strides are
    read at run time."""
    return node.opdef.returns_dense or kernel_module_for(node.op) is not None


# -- code generation ------------------------------------------------------------------------------

class _Kernel:
    """The source, launch grid and arguments of one body's kernel."""

    def __init__(self, body, operands: list, results: list):
        self.g = body.graph
        self.space = tuple(body.space.shape)
        self.row = body.space.row
        self.operands, self.results = operands, results
        self.rank = len(self.space)
        self.sym_names: list[str] = []   # the size arguments, in order of first use
        self.code = kernel_printer(self.sym_names)   # a sympy size as kernel code
        self.runtime_strides: list[tuple] = []
        self.pre: list[str] = []         # index math, before the loads that use it
        self.lines: list[str] = []
        self.index_vars: dict = {}
        self.var: dict = {}              # body value -> (name, dtype)
        self.ops = OpEmitter(self.var, self.lines, self.space[-1] if self.space else None)
        self.layouts = Layouts(_dense_result)
        numel = sympy.Integer(1)
        for d in self.space:
            numel = numel * d
        self.numel = numel
        self.i64 = self._needs_i64()
        if self.row:
            self._row_setup()
        else:
            self._flat_setup()
        for v in self.g.inputs:
            self._load(v)
        for node in self.g.nodes:
            name = f"v{len(self.var)}"
            dt = node.results[0].type.dtype
            self.lines.append(f"{name} = {self.ops.emit(node)}")
            self.var[node.results[0]] = (name, dt)
        for k, v in enumerate(self.g.outputs.values()):
            self._store(k, v)

    # -- sizes -----------------------------------------------------------------------------------
    def _needs_i64(self) -> bool:
        """Could an element offset reach 2**31 with every symbol at _BIG?"""
        subs = {s: _BIG for s in SYMBOLS.values()}
        ev = lambda e: int(sympy.sympify(e).subs(subs))
        worst = ev(self.numel)
        for v in self.operands:
            strides = self.layouts(v)
            ext = 1
            for d, s in zip(v.type.shape, strides):
                if s is not None:
                    ext += (ev(d) - 1) * abs(ev(s))
            worst = max(worst, ext)
        return worst >= 2 ** 31

    # -- iteration space --------------------------------------------------------------------------
    def _flat_setup(self):
        if isinstance(self.numel, sympy.Integer) or self.numel.is_Integer:
            block = min(1024, Lowering.pow2(int(self.numel), 32))
            self.grid = -(-int(self.numel) // block)
        else:
            block = 1024
            self.grid = sympy.ceiling(self.numel / block)
        self.constexprs = {"BLOCK": block}
        self.num_warps = max(1, min(4, block // 256))
        pid = "tl.program_id(0).to(tl.int64)" if self.i64 else "tl.program_id(0)"
        self.head = [f"pid = {pid}",
                     "offs = pid * BLOCK + tl.arange(0, BLOCK)",
                     f"mask = offs < {self.code(self.numel)}"]

    def _row_setup(self):
        n = self.space[-1]
        rows = sympy.Integer(1)
        for d in self.space[:-1]:
            rows = rows * d
        block_n = Lowering.pow2(n, 16)
        nrows = max(1, _TILE // block_n)
        if rows.is_Integer:
            nrows = min(nrows, Lowering.pow2(int(rows), 1))
            self.grid = -(-int(rows) // nrows)
        else:
            self.grid = sympy.ceiling(rows / nrows)
        self.constexprs = {"ROWS": nrows, "BLOCK_N": block_n}
        self.num_warps = min(16, max(1, nrows * block_n // 512))
        pid = "tl.program_id(0).to(tl.int64)" if self.i64 else "tl.program_id(0)"
        self.head = [f"pid = {pid}",
                     "r = pid * ROWS + tl.arange(0, ROWS)",
                     f"rmask = r < {self.code(rows)}",
                     "c = tl.arange(0, BLOCK_N)",
                     f"cmask = c < {n}",
                     "cm = cmask[None, :]"]

    def _index(self, k: int) -> str:
        """The index along space dim k of each lane (1-D) or each row (row kernel)."""
        if k not in self.index_vars:
            last = self.rank if not self.row else self.rank - 1
            inner = sympy.Integer(1)
            for d in self.space[k + 1:last]:
                inner = inner * d
            base = "r" if self.row else "offs"
            e = base if inner == 1 else f"({base} // {self.code(inner)})"
            if k > 0:
                e = f"{e} % {self.code(self.space[k])}"
            name = f"i{k}"
            self.pre.append(f"{name} = {e}")
            self.index_vars[k] = name
        return self.index_vars[k]

    def _dims(self, rank: int, leading: bool = False) -> list:
        """The space dims that the dims of a value of rank `rank` align with (trailing dims,
        as broadcasting aligns them; `leading` for a keepdim=false row reduction)."""
        return list(range(rank)) if leading else [j + self.rank - rank for j in range(rank)]

    def _offset(self, shape, strides, dims, owner=None, lead_only=False):
        """Code for the element offset of a value (None: it does not vary).

        `dims` maps each of the value's dims to a space dim; a dim of size 1 (or one whose
        space dim is 1) is broadcast. `lead_only` limits the sum to the row kernel's leading
        dims; strides that are None are read at run time from `owner`."""
        last = self.rank - 1
        used = [(j, k) for j, k in enumerate(dims)
                if shape[j] != 1 and self.space[k] != 1 and strides[j] != 0
                and (not lead_only or k < last)]
        if not used:
            return None
        scode = []
        for j, _ in used:
            s = strides[j]
            if s is None:
                name = f"st{len(self.runtime_strides)}"
                self.runtime_strides.append((owner, j))
                scode.append((name, None))
            else:
                scode.append((self.code(s), s))
        # every varying space dim present, strides row-major: the flat (row) index times the
        # innermost stride, no per-dim split
        span = [k for k in range(self.rank) if self.space[k] != 1 and (not lead_only or k < last)]
        if [k for _, k in used] == span and all(c[1] is not None for c in scode):
            ok = True
            for (j, k), (j2, k2) in zip(used, used[1:]):
                outer = sympy.sympify(strides[j2]) * self.space[k2]
                if sympy.simplify(sympy.sympify(strides[j]) - outer) != 0:
                    ok = False
            if ok:
                base = "r" if self.row else "offs"
                inner = scode[-1][0]
                return base if inner == "1" else f"{base} * {inner}"
        terms = []
        for (j, k), (c, _) in zip(used, scode):
            idx = self._index(k)
            terms.append(idx if c == "1" else f"{idx} * {c}")
        return " + ".join(terms)

    # -- loads and stores -------------------------------------------------------------------------
    def _load(self, v):
        k = self.g.inputs.index(v)
        outer = self.operands[k]
        strides = self.layouts(outer)
        dims = self._dims(v.type.rank)
        name = f"x{k}"
        self.var[v] = (name, v.type.dtype)
        other = "0" if v.type.dtype not in FLOATS else "0.0"
        if not self.row:
            off = self._offset(v.type.shape, strides, dims, outer)
            if off is None:
                self.lines.append(f"{name} = tl.load(in{k})")
            else:
                self.lines.append(f"{name} = tl.load(in{k} + {off}, mask=mask, other={other})")
            return
        ro = self._offset(v.type.shape, strides, dims, outer, lead_only=True)
        co = self._col_offset(v.type.shape, strides, dims, outer)
        self.lines.append(f"{name} = {self._row_access(f'in{k}', ro, co, other=other)}")

    def _col_offset(self, shape, strides, dims, owner):
        if not dims or dims[-1] != self.rank - 1 or shape[-1] == 1 or self.space[-1] == 1:
            return None
        s = strides[-1]
        if s == 0:                  # an expanded last dim
            return None
        if s is None:
            name = f"st{len(self.runtime_strides)}"
            self.runtime_strides.append((owner, len(shape) - 1))
            return f"c * {name}"
        return "c" if s == 1 else f"c * {self.code(s)}"

    def _row_access(self, ptr, ro, co, other=None, value=None, extra=None):
        if ro is not None and co is not None:
            addr, m = f"{ptr} + ({ro})[:, None] + ({co})[None, :]", "rmask[:, None] & cm"
        elif ro is not None:
            addr, m = f"{ptr} + ({ro})[:, None]", "rmask[:, None]"
        elif co is not None:
            addr, m = f"{ptr} + ({co})[None, :]", "cm"
        else:
            addr, m = ptr, None
        if extra:
            m = f"({m}) & {extra}" if m else extra
        if value is None:
            return f"tl.load({addr})" if m is None else f"tl.load({addr}, mask={m}, other={other})"
        if co is None and ro is None:
            addr = f"{ptr} + tl.full([1, 1], 0, tl.int32)"
        return f"tl.store({addr}, {value})" if m is None else f"tl.store({addr}, {value}, mask={m})"

    def _store(self, k: int, v):
        out = self.results[k]
        name, dt = self.var[v]
        value = conv(name, dt, out.type.dtype)
        p = v.producer
        keep = not (p is not None and reduces_rows(p.op) and not p.attrs["keepdim"])
        dims = self._dims(v.type.rank, leading=not keep)
        strides = dense_strides(out.type.shape)
        last = self.rank - 1
        present = {k2 for j, k2 in enumerate(dims) if v.type.shape[j] != 1}
        missing = [k2 for k2 in range(self.rank) if self.space[k2] != 1 and k2 not in present
                   and (not self.row or k2 < last)]
        if not self.row:
            off = self._offset(v.type.shape, strides, dims)
            if off is None:
                self.lines.append(f"tl.store(out{k}, {value}, mask=pid == 0)")
                return
            m = " & ".join(["mask"] + [f"({self._index(k2)} == 0)" for k2 in missing])
            self.lines.append(f"tl.store(out{k} + {off}, {value}, mask={m})")
            return
        ro = self._offset(v.type.shape, strides, dims, lead_only=True)
        co = self._col_offset(v.type.shape, strides, dims, None) if keep else None
        extra = None
        if missing and ro is None:                 # not row-varying: the first program writes
            extra = "((tl.full([1, 1], 0, tl.int32) + pid) == 0)"
        elif missing:
            conds = " & ".join(f"({self._index(k2)} == 0)" for k2 in missing)
            extra = f"({conds})[:, None]"
        self.lines.append(self._row_access(f"out{k}", ro, co, value=value, extra=extra))

    # -- the module -------------------------------------------------------------------------------
    def source(self) -> str:
        params = ([f"in{k}" for k in range(len(self.operands))]
                  + [f"out{k}" for k in range(len(self.results))]
                  + [f"sym_{s}" for s in self.sym_names]
                  + [f"st{k}" for k in range(len(self.runtime_strides))]
                  + [f"{c}: tl.constexpr" for c in self.constexprs])
        body_text = "\n".join("# " + ln for ln in print_graph(self.g).rstrip().splitlines())
        lines = ['"""Generated by braze codegen/pointwise_kernel.py for the body below."""',
                 "", body_text, "", "import triton", "import triton.language as tl",
                 # tl.sum / tl.max are @jit functions of triton.language: where triton was
                 # imported before TRITON_INTERPRET was set (the test harness) only builtins
                 # interpret, so reductions name the standard library's combine functions
                 "from triton.language.standard import _elementwise_max, _sum_combine", ""]
        for h in sorted(self.ops.helpers):
            lines.append(HELPERS[h].rstrip("\n"))
            lines.append("")
        lines.append("")
        lines.append("@triton.jit")
        lines.append(f"def kernel({', '.join(params)}):")
        for ln in self.head + self.pre + self.lines:
            lines.append("    " + ln)
        return "\n".join(lines) + "\n"


