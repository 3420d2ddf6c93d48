"""Generated Triton kernels for pointwise groups (`fused_pointwise`) and lone pointwise ops.

Every `fused_pointwise` node, and every pointwise op left standing after fusion
(`cast`, `mul`, `cos`, ...: lowered as a one-node body), becomes one kernel whose
source is generated from the body graph (`ir/op_pointwise_group.py`) and
registered as module `pw_<12 hex>` (a hash of the source, so the layers of a
model share one module per distinct group). What a program does:

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

Numerics follow the reference (torch on CPU) op by op: each op converts its
operands to the op's result dtype R and computes in R's opmath type (fp32 for
f16/bf16), then rounds to R, so f16 groups round after every op exactly where
the unfused graph did. Python-number attributes round as torch rounds them
(to R for add/sub, comparisons, maximum/minimum; kept in fp32 for a
right-hand mul/div; pow's exponent rounded to R). Division and sqrt are IEEE
(`div_rn`, `sqrt_rn`); rsqrt = 1/sqrt, silu = x / (1 + exp(-x)), gelu in
torch's erf and tanh forms; pow with exponent 0, 1, 2, 3, -2, 0.5, -0.5, -1
is the product/sqrt torch uses, any other exponent goes through fp64 exp/log;
maximum/minimum/amax propagate NaN. Only `triton.language` core math is used
(libdevice has no interpreter support); tanh is exp-based with a series near 0.

Strides are decided at codegen time where they can be: graph inputs, params and
results of kernels and GEMMs are dense, and views of them (split halves of the
gate_up GEMM, slices, permutes, expands) get their strides by replaying the view
ops on meta tensors at two probe sizes; those strides become literals, so the
compiler sees contiguity and divisibility (vector loads). Anything else (results
of other extern ops, or strides that depend on T) is read at run time
(`L.stride`). Symbolic sizes enter as `L.expr` arguments of the symbols
themselves (`sym_T`), and sizes are formed in the kernel (`sym_T * 4096`) so the
compiler knows their divisibility. Offsets are int32 unless a space or input
could exceed 2**31 elements with T, S <= 65536.

Limits: a row kernel keeps whole rows in registers (no looped variant), so rows
beyond ~16K elements spill; pow on integer tensors has no kernel form (BrazeError);
f64 computes in f64 but is not tuned. On the GPU tl.exp is ex2.approx-based
(~2 ulp, relative error growing to ~1e-5 near |x| = 80), while sin/cos/log/erf
are the precise libdevice forms Triton inlines.
"""

from __future__ import annotations

import hashlib

OPS = (
    "fused_pointwise",
    "abs", "add", "cast", "cos", "div", "eq", "exp", "ge", "gelu", "gt", "le", "log",
    "logical_and", "logical_not", "logical_or", "lt", "maximum", "minimum", "mul", "ne",
    "neg", "pow", "reciprocal", "relu", "rsqrt", "sigmoid", "silu", "sin", "sqrt", "sub",
    "tanh", "where",
)

_TL = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "f64": "tl.float64",
       "i64": "tl.int64", "i32": "tl.int32", "i16": "tl.int16", "i8": "tl.int8",
       "u8": "tl.uint8", "bool": "tl.int1"}
_FLOATS = ("f64", "f32", "f16", "bf16")
_INT_MIN = {"i64": -(1 << 63), "i32": -(1 << 31), "i16": -(1 << 15), "i8": -(1 << 7), "u8": 0,
            "bool": 0}
_DENSE_EXTERN = frozenset({"linear", "matmul"})     # torch GEMMs return fresh dense tensors
_BIG = 65536                   # the largest T (S, ...) the int32 offset check allows for
_TILE = 2048                   # elements per row-kernel program tile

_HELPERS = {
    "_tanh": '''
@triton.jit
def _tanh(x):
    # (1 - e) / (1 + e) with e = exp(-2|x|) loses digits near 0: a series covers |x| < 0.3
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = tl.div_rn(1.0 - e, 1.0 + e)
    x2 = x * x
    p = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197))))
    return tl.where(a < 0.3, p, tl.where(x < 0, -t, t))
''',
    "_pow": '''
@triton.jit
def _pow(x, y):
    # C pow on fp64 operands: pow(x, 0) = pow(1, y) = 1; a negative base needs an integral
    # exponent, whose parity gives the sign
    r = tl.exp(y * tl.log(tl.abs(x)))
    whole = tl.floor(y) == y
    odd = whole & (tl.floor(y * 0.5) * 2.0 != y)
    r = tl.where(x < 0, tl.where(whole, tl.where(odd, -r, r), float("nan")), r)
    return tl.where(y == 0, 1.0, tl.where(x == 1, 1.0, r))
''',
}


def lower(node, L):
    body, operands = _body_of(node)
    gen = _Kernel(body, operands, node.results)
    source = gen.source()
    name = "pw_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    L.generated(name, source)
    args = ([L.buf(v) for v in operands] + [L.buf(r) for r in node.results]
            + [L.expr(gen.symbol(s)) for s in gen.sym_names]
            + [L.stride(v, d) for v, d in gen.runtime_strides])
    L.launch(f"{name}.kernel", grid=[gen.grid], args=args, constexprs=gen.constexprs,
             num_warps=gen.num_warps)


def _body_of(node):
    """(parsed Body, the outer operands its inputs stand for); a lone op is a one-node body."""
    from braze.ir import Graph, print_graph
    from braze.ir.op_pointwise_group import parse_body
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
    """Results the runtime hands this kernel as dense tensors: GEMMs' (torch returns fresh
    dense tensors) and kernels' (arena slots); an eager extern op's own tensor may have any
    layout, so its strides are read at run time."""
    from braze.codegen.kernels import kernel_module_for
    return node.op in _DENSE_EXTERN or kernel_module_for(node.op) is not None


# -- code generation ------------------------------------------------------------------------------

def _opmath(dt: str) -> str:
    return "f32" if dt in ("f16", "bf16") else dt


def _conv(x: str, src: str, dst: str) -> str:
    if src == dst:
        return x
    if dst == "bool":
        return f"({x} != 0)"
    return f"{x}.to({_TL[dst]})"


def _round_scalar(s, dt: str):
    """A Python number as torch holds it in dtype `dt` (a Python float or int)."""
    import torch
    from braze.ir.types import torch_dtype
    if dt == "bool":
        return int(bool(s))
    if dt not in _FLOATS:
        return int(s)
    return torch.tensor(s, dtype=torch.float64).to(torch_dtype(dt)).item()


def _lit(s, dt: str) -> str:
    """A literal of dtype `dt` for the Python number `s` (already rounded as wanted)."""
    if dt not in _FLOATS:
        return str(int(s))
    s = float(s)
    if s != s:
        return 'float("nan")'
    if s in (float("inf"), float("-inf")):
        return 'float("inf")' if s > 0 else 'float("-inf")'
    text = repr(s)
    return f"tl.full([], {text}, tl.float64)" if dt == "f64" else text


class _Kernel:
    """The source, launch grid and arguments of one body's kernel."""

    def __init__(self, body, operands: list, results: list):
        import sympy
        self.g = body.graph
        self.space = tuple(body.space.shape)
        self.row = body.space.row
        self.operands, self.results = operands, results
        self.rank = len(self.space)
        self.sym_names: list[str] = []
        self.runtime_strides: list[tuple] = []
        self.helpers: set[str] = set()
        self.pre: list[str] = []         # index math, before the loads that use it
        self.lines: list[str] = []
        self.index_vars: dict = {}
        self.var: dict = {}              # body value -> (name, dtype)
        from braze.ir.layout import Layouts
        self.layouts = Layouts(_dense_result)
        self.n = 0
        self._sympy = sympy
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
            self.lines.append(f"{name} = {self._emit(node)}")
            self.var[node.results[0]] = (name, dt)
        for k, v in enumerate(self.g.outputs.values()):
            self._store(k, v)

    # -- sizes and symbols ------------------------------------------------------------------------
    def symbol(self, name: str):
        from braze.ir.types import SYMBOLS
        return SYMBOLS[name]

    def code(self, d) -> str:
        """A sympy size as kernel code over the symbol arguments (`sym_T`) and literals."""
        sp = self._sympy
        if isinstance(d, int):
            return str(d)
        d = sp.sympify(d)
        if d.is_Integer:
            return str(int(d))
        if d.is_Symbol:
            if d.name not in self.sym_names:
                self.sym_names.append(d.name)
            return f"sym_{d.name}"
        if d.is_Add:
            return "(" + " + ".join(self.code(a) for a in d.args) + ")"
        if d.is_Mul:
            num, den = sp.fraction(d)
            if den != 1:
                return f"({self.code(num)} // {self.code(den)})"
            factors = sorted(d.args, key=lambda a: a.is_Number)     # symbols first
            return "(" + " * ".join(self.code(a) for a in factors) + ")"
        if isinstance(d, (sp.floor, sp.ceiling)):
            num, den = sp.fraction(sp.together(d.args[0]))
            if isinstance(d, sp.floor):
                return f"({self.code(num)} // {self.code(den)})"
            return f"(({self.code(num)} + {self.code(den)} - 1) // {self.code(den)})"
        from braze.ir.errors import BrazeError
        raise BrazeError(f"fused_pointwise: cannot write size {d} in a kernel")

    def _needs_i64(self) -> bool:
        """Could an element offset reach 2**31 with every symbol at _BIG?"""
        from braze.ir.types import SYMBOLS
        sp = self._sympy
        subs = {s: _BIG for s in SYMBOLS.values()}
        ev = lambda e: int(sp.sympify(e).subs(subs))
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
        from braze.codegen.lowering import Lowering
        sp = self._sympy
        if isinstance(self.numel, sp.Integer) or self.numel.is_Integer:
            block = min(1024, Lowering.pow2(int(self.numel), 32))
            self.grid = -(-int(self.numel) // block)
        else:
            block = 1024
            self.grid = sp.ceiling(self.numel / block)
        self.constexprs = {"BLOCK": block}
        self.num_warps = max(1, min(4, block // 256))
        pid = "tl.program_id(0).to(tl.int64)" if self.i64 else "tl.program_id(0)"
        self.head = [f"pid = {pid}",
                     "offs = pid * BLOCK + tl.arange(0, BLOCK)",
                     f"mask = offs < {self.code(self.numel)}"]

    def _row_setup(self):
        from braze.codegen.lowering import Lowering
        sp = self._sympy
        n = self.space[-1]
        rows = sp.Integer(1)
        for d in self.space[:-1]:
            rows = rows * d
        block_n = Lowering.pow2(n, 16)
        nrows = max(1, _TILE // block_n)
        if rows.is_Integer:
            nrows = min(nrows, Lowering.pow2(int(rows), 1))
            self.grid = -(-int(rows) // nrows)
        else:
            self.grid = sp.ceiling(rows / nrows)
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
            sp = self._sympy
            last = self.rank if not self.row else self.rank - 1
            inner = sp.Integer(1)
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
        sp = self._sympy
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
                outer = sp.sympify(strides[j2]) * self.space[k2]
                if sp.simplify(sp.sympify(strides[j]) - outer) != 0:
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
        other = "0" if v.type.dtype not in _FLOATS else "0.0"
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
        from braze.ir.layout import dense_strides
        out = self.results[k]
        name, dt = self.var[v]
        value = _conv(name, dt, out.type.dtype)
        p = v.producer
        keep = not (p is not None and p.op in ("sum", "mean", "amax") and not p.attrs["keepdim"])
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

    # -- ops --------------------------------------------------------------------------------------
    def _tmp(self, e: str) -> str:
        """`e` as a variable name (formulas use their operand several times)."""
        if e.isidentifier():
            return e
        self.n += 1
        self.lines.append(f"t{self.n} = {e}")
        return f"t{self.n}"

    def _operand(self, node, i):
        return self.var[node.operands[i]]

    def _emit(self, node) -> str:
        from braze.ir.errors import BrazeError
        op = node.op
        R = node.results[0].type.dtype
        if op in ("sum", "mean", "amax"):
            return self._reduce(node, R)
        if op == "cast":
            x, dx = self._operand(node, 0)
            return _conv(x, dx, R)
        if op in ("neg", "abs", "relu", "logical_not"):
            x, dx = self._operand(node, 0)
            x = _conv(x, dx, R) if op != "logical_not" else x
            return {"neg": f"-{x}", "abs": f"tl.abs({x})",
                    "relu": f"tl.where({x} < 0, 0, {x}).to({_TL[R]})",
                    "logical_not": f"({x} == 0)"}[op]
        if op in _UNARY_MATH:
            x, dx = self._operand(node, 0)
            C = _opmath(R)
            if C not in _FLOATS:
                raise BrazeError(f"{op} on {R} has no kernel form")
            if op == "tanh" or (op == "gelu" and node.attrs["approximate"] == "tanh"):
                self.helpers.add("_tanh")
            form = _UNARY_MATH[op]
            if op == "gelu":
                form = form[node.attrs["approximate"]]
            return _conv(f"({form.format(x=self._tmp(_conv(x, dx, C)))})", C, R)
        if op == "where":
            (cv, _), (a, da), (b, db) = (self._operand(node, i) for i in range(3))
            return f"tl.where({cv}, {_conv(a, da, R)}, {_conv(b, db, R)})"
        if op in _BINARY:
            return self._binary(node, R)
        raise BrazeError(f"no generated kernel form for op '{op}'")

    def _args2(self, node):
        """The two operands as (code, dtype, value); a scalar attr is (None, None, number)."""
        s, first = node.attrs.get("scalar"), node.attrs.get("scalar_first")
        ops = [self._operand(node, i) + (node.operands[i],) for i in range(len(node.operands))]
        if s is None:
            return ops
        sc = (None, None, s)
        return [sc, ops[0]] if first else [ops[0], sc]

    def _binary(self, node, R: str) -> str:
        op = node.op
        args = self._args2(node)
        if op in ("logical_and", "logical_or"):
            return self._logical(op, args)
        if op in _COMPARE:
            K = self._common_dtype(node)
            a, b = (self._arg(x, K, K) for x in args)
            return f"({a} {_COMPARE[op]} {b})"
        if op in ("maximum", "minimum"):
            a, b = (self._arg(x, R, R) for x in args)
            nan = ", propagate_nan=tl.PropagateNan.ALL" if R in _FLOATS else ""
            return f"tl.{op}({a}, {b}{nan})"
        if op == "pow":
            return self._pow(args, R)
        C = _opmath(R) if R != "bool" else "i32"     # bool add/mul: or/and through ints
        reduced = R in ("f16", "bf16")
        parts = []
        for pos, x in enumerate(args):
            # torch's CPU mul/div read a right-hand scalar (a number or 0-d/numel-1 tensor)
            # at its original value in fp32; everything else is first rounded to R
            keep = reduced and op in ("mul", "div") and pos == 1 and (
                x[0] is None or all(d == 1 for d in x[2].type.shape))
            parts.append(self._arg(x, C if keep else R, C))
        a, b = parts
        if op == "div":                 # true division: R is always a float type
            e = f"tl.div_rn({a}, {b})"
        else:
            e = f"({a} {_ARITH[op]} {b})"
        return _conv(e, C, R)

    def _arg(self, x, round_to: str, compute: str) -> str:
        code, dt, s = x
        if code is None:
            return _lit(_round_scalar(s, round_to), compute)
        return _conv(_conv(code, dt, round_to), round_to, compute)

    def _common_dtype(self, node) -> str:
        import torch
        from braze.ir.types import dtype_name, torch_dtype
        metas = [torch.empty((1,) * v.type.rank if v.type.rank else (), device="meta",
                             dtype=torch_dtype(v.type.dtype)) for v in node.operands]
        s = node.attrs.get("scalar")
        other = s if s is not None else metas[1]
        return dtype_name(torch.result_type(metas[0], other))

    def _logical(self, op, args) -> str:
        # as selects: the interpreter cannot `&` a 0-d bool with a block
        (a, _, sa), (b, _, sb) = args
        if a is None:
            (a, sa), (b, sb) = (b, sb), (a, sa)
        if b is None:
            truth = bool(sb)
            if truth == (op == "logical_and"):
                return f"({a} != 0)"
            return f"tl.full({a}.shape, {int(truth)}, tl.int1)"
        if op == "logical_and":
            return f"tl.where({a} != 0, {b} != 0, False)"
        return f"tl.where({a} != 0, True, {b} != 0)"

    def _pow(self, args, R: str) -> str:
        from braze.ir.errors import BrazeError
        if R not in _FLOATS:
            raise BrazeError(f"pow on {R} has no kernel form (integer powers)")
        C = _opmath(R)
        (a, da, va), (b, db, vb) = args
        if b is None and a is not None:             # tensor ** number: torch's special cases
            y = float(_round_scalar(vb, R) if R in ("f16", "bf16") else vb)
            x = self._tmp(_conv(_conv(a, da, R), R, C))
            one = _lit(1.0, C)
            special = {0.0: f"tl.full({x}.shape, 1, {_TL[C]})", 1.0: x, 2.0: f"({x} * {x})",
                       3.0: f"({x} * {x} * {x})", -2.0: f"tl.div_rn({one}, {x} * {x})",
                       0.5: f"tl.sqrt_rn({x})", -0.5: f"tl.div_rn({one}, tl.sqrt_rn({x}))",
                       -1.0: f"tl.div_rn({one}, {x})"}
            if y in special:
                return _conv(special[y], C, R)
        self.helpers.add("_pow")
        f64 = "f64"
        # a number is rounded to R first; torch's fp32 pow keeps a number exponent in fp64
        xs = self._arg((a, da, va), R, f64)
        ys = self._arg((b, db, vb), R if R != "f32" or b is not None else f64, f64)
        e = f"_pow({xs}, {ys})"
        return _conv(_conv(e, f64, C), C, R) if C != f64 else e

    def _reduce(self, node, R: str) -> str:
        x, dx = self._operand(node, 0)
        n = self.space[-1]
        if node.op == "amax":
            ident = _lit(float("-inf"), dx) if dx in _FLOATS else str(_INT_MIN[dx])
            red = f"tl.reduce(tl.where(cm, {x}, {ident}), 1, _elementwise_max)[:, None]"
            if dx in _FLOATS:       # torch's amax propagates NaN; max.f32 on the GPU does not
                nan = f"tl.reduce(tl.where(cm, {x} != {x}, 0).to(tl.int32), 1, _sum_combine)"
                red = f"tl.where(({nan})[:, None] > 0, float(\"nan\"), {red})"
            return _conv(red, dx, R)
        A = _opmath(R)
        zero = "0.0" if A in _FLOATS else "0"
        red = f"tl.reduce(tl.where(cm, {_conv(x, dx, A)}, {zero}), 1, _sum_combine)[:, None]"
        if node.op == "mean":
            red = f"tl.div_rn({red}, {_lit(float(n), A)})"
        return _conv(red, A, R)

    # -- the module -------------------------------------------------------------------------------
    def source(self) -> str:
        from braze.ir import print_graph
        params = ([f"in{k}" for k in range(len(self.operands))]
                  + [f"out{k}" for k in range(len(self.results))]
                  + [f"sym_{s}" for s in self.sym_names]
                  + [f"st{k}" for k in range(len(self.runtime_strides))]
                  + [f"{c}: tl.constexpr" for c in self.constexprs])
        body_text = "\n".join("# " + ln for ln in print_graph(self.g).rstrip().splitlines())
        lines = ['"""Generated by braze codegen/kernels/pointwise.py for the body below."""',
                 "", body_text, "", "import triton", "import triton.language as tl",
                 # tl.sum / tl.max are @jit functions of triton.language: where triton was
                 # imported before TRITON_INTERPRET was set (the test harness) only builtins
                 # interpret, so reductions name the standard library's combine functions
                 "from triton.language.standard import _elementwise_max, _sum_combine", ""]
        for h in sorted(self.helpers):
            lines.append(_HELPERS[h].rstrip("\n"))
            lines.append("")
        lines.append("")
        lines.append("@triton.jit")
        lines.append(f"def kernel({', '.join(params)}):")
        for ln in self.head + self.pre + self.lines:
            lines.append("    " + ln)
        return "\n".join(lines) + "\n"


_UNARY_MATH = {
    "exp": "tl.exp({x})",
    "log": "tl.log({x})",
    "sqrt": "tl.sqrt_rn({x})",
    "rsqrt": "tl.div_rn(1.0, tl.sqrt_rn({x}))",
    "sin": "tl.sin({x})",
    "cos": "tl.cos({x})",
    "tanh": "_tanh({x})",
    "sigmoid": "tl.div_rn(1.0, 1.0 + tl.exp(-{x}))",
    "silu": "tl.div_rn({x}, 1.0 + tl.exp(-{x}))",
    "reciprocal": "tl.div_rn(1.0, {x})",
    # torch's CPU forms: x * 0.5 * (1 + erf(x / sqrt 2)); 0.5 * x * (1 + tanh(b * (x + k x^3)))
    "gelu": {"none": "{x} * 0.5 * (1.0 + tl.erf({x} * 0.7071067811865476))",
             "tanh": "0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * "
                     "({x} * {x} * {x}))))"},
}
_ARITH = {"add": "+", "sub": "-", "mul": "*"}
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_BINARY = set(_ARITH) | set(_COMPARE) | {"div", "pow", "maximum", "minimum", "logical_and",
                                         "logical_or"}
