"""What each op of a pointwise body computes in a generated Triton kernel, rounded as torch rounds.

An op's expression comes from the IR registry (`OpDef.triton`, see ir/ops.py); its
`numerics` names one of the rules below, which converts the operands and rounds
the result. Numerics follow the reference (torch on CPU) op by op: each op converts
its operands to the op's result dtype R and computes in R's opmath type (fp32 for
f16/bf16), then rounds to R, so f16 groups round after every op exactly where the
unfused graph did. Python-number attributes round as torch rounds them (to R for
add/sub, comparisons, maximum/minimum; kept in fp32 for a right-hand mul/div; pow's
exponent rounded to R). Division and sqrt are IEEE (`div_rn`, `sqrt_rn`); pow with
exponent 0, 1, 2, 3, -2, 0.5, -0.5, -1 is the product/sqrt torch uses, any other
exponent goes through fp64 exp/log; maximum/minimum/amax propagate NaN. Only
`triton.language` core math is used (libdevice has no interpreter support); tanh is
exp-based with a series near 0 (`_tanh` below).

Limits: pow on integer tensors has no kernel form (BrazeError); f64 computes in f64
but is not tuned. On the GPU tl.exp is ex2.approx-based (~2 ulp, relative error
growing to ~1e-5 near |x| = 80), while sin/cos/log/erf are the precise libdevice
forms Triton inlines.
"""

from __future__ import annotations

import re

from braze.ir.errors import BrazeError

TL = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "f64": "tl.float64",
      "i64": "tl.int64", "i32": "tl.int32", "i16": "tl.int16", "i8": "tl.int8",
      "u8": "tl.uint8", "bool": "tl.int1"}
FLOATS = ("f64", "f32", "f16", "bf16")
_INT_MIN = {"i64": -(1 << 63), "i32": -(1 << 31), "i16": -(1 << 15), "i8": -(1 << 7), "u8": 0,
            "bool": 0}

# device functions an op's expression may call; a kernel includes the ones it uses
HELPERS = {
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
_CALL = re.compile(r"\b(_[a-z_]+)\(")


def opmath(dt: str) -> str:
    return "f32" if dt in ("f16", "bf16") else dt


def conv(x: str, src: str, dst: str) -> str:
    if src == dst:
        return x
    if dst == "bool":
        return f"({x} != 0)"
    return f"{x}.to({TL[dst]})"


def round_scalar(s, dt: str):
    """A Python number as torch holds it in dtype `dt` (a Python float or int)."""
    import torch
    from braze.ir.types import torch_dtype
    if dt == "bool":
        return int(bool(s))
    if dt not in FLOATS:
        return int(s)
    return torch.tensor(s, dtype=torch.float64).to(torch_dtype(dt)).item()


def lit(s, dt: str) -> str:
    """A literal of dtype `dt` for the Python number `s` (already rounded as wanted)."""
    if dt not in FLOATS:
        return str(int(s))
    s = float(s)
    if s != s:
        return 'float("nan")'
    if s in (float("inf"), float("-inf")):
        return 'float("inf")' if s > 0 else 'float("-inf")'
    text = repr(s)
    return f"tl.full([], {text}, tl.float64)" if dt == "f64" else text


class OpEmitter:
    """Writes each body node as a Triton expression over its operands' code.

    `var` maps body values to (code, dtype); temporaries are appended to `lines`; the
    device functions used collect in `helpers`; `row_len` is the row length a reduction
    runs over (a row kernel's last space dim)."""

    def __init__(self, var: dict, lines: list, row_len):
        self.var, self.lines, self.row_len = var, lines, row_len
        self.helpers: set[str] = set()
        self.n = 0

    def emit(self, node) -> str:
        R = node.results[0].type.dtype
        if node.opdef.combine is not None:
            return self._reduce(node, R)
        form = node.opdef.triton
        if form is None:
            raise BrazeError(f"no generated kernel form for op '{node.op}'")
        start = len(self.lines)
        code = _RULES[form.numerics](self, node, form.expression(node.attrs), R)
        for text in [code, *self.lines[start:]]:     # the device functions the code calls
            self.helpers.update(h for h in _CALL.findall(text) if h in HELPERS)
        return code

    def _tmp(self, e: str) -> str:
        """`e` as a variable name (formulas use their operand several times)."""
        if e.isidentifier():
            return e
        self.n += 1
        self.lines.append(f"t{self.n} = {e}")
        return f"t{self.n}"

    def _operand(self, node, i):
        return self.var[node.operands[i]]

    # -- unary and select rules --------------------------------------------------------------
    def _convert(self, node, expr, R):
        x, dx = self._operand(node, 0)
        return expr.format(x=conv(x, dx, R))

    def _exact(self, node, expr, R):
        x, dx = self._operand(node, 0)
        return expr.format(x=conv(x, dx, R), R=TL[R])

    def _raw(self, node, expr, R):
        x, _ = self._operand(node, 0)
        return expr.format(x=x)

    def _float(self, node, expr, R):
        x, dx = self._operand(node, 0)
        C = opmath(R)
        if C not in FLOATS:
            raise BrazeError(f"{node.op} on {R} has no kernel form")
        return conv(f"({expr.format(x=self._tmp(conv(x, dx, C)))})", C, R)

    def _select(self, node, expr, R):
        (cv, _), (a, da), (b, db) = (self._operand(node, i) for i in range(3))
        return expr.format(cond=cv, a=conv(a, da, R), b=conv(b, db, R))

    # -- binary rules ------------------------------------------------------------------------
    def _args2(self, node):
        """The two operands as (code, dtype, value); a scalar attr is (None, None, number)."""
        s, first = node.attrs.get("scalar"), node.attrs.get("scalar_first")
        ops = [self._operand(node, i) + (node.operands[i],) for i in range(len(node.operands))]
        if s is None:
            return ops
        sc = (None, None, s)
        return [sc, ops[0]] if first else [ops[0], sc]

    def _arg(self, x, round_to: str, compute: str) -> str:
        code, dt, s = x
        if code is None:
            return lit(round_scalar(s, round_to), compute)
        return conv(conv(code, dt, round_to), round_to, compute)

    def _arith(self, node, expr, R, keep_rhs_scalar=False):
        args = self._args2(node)
        C = opmath(R) if R != "bool" else "i32"     # bool add/mul: or/and through ints
        reduced = R in ("f16", "bf16")
        parts = []
        for pos, x in enumerate(args):
            # torch's CPU mul/div read a right-hand scalar (a number or 0-d/numel-1 tensor)
            # at its original value in fp32; everything else is first rounded to R
            keep = reduced and keep_rhs_scalar and pos == 1 and (
                x[0] is None or all(d == 1 for d in x[2].type.shape))
            parts.append(self._arg(x, C if keep else R, C))
        a, b = parts
        return conv(expr.format(a=a, b=b), C, R)

    def _scale(self, node, expr, R):
        return self._arith(node, expr, R, keep_rhs_scalar=True)

    def _compare(self, node, expr, R):
        K = self._common_dtype(node)
        a, b = (self._arg(x, K, K) for x in self._args2(node))
        return expr.format(a=a, b=b)

    def _minmax(self, node, expr, R):
        a, b = (self._arg(x, R, R) for x in self._args2(node))
        nan = ", propagate_nan=tl.PropagateNan.ALL" if R in FLOATS else ""
        return expr.format(a=a, b=b, nan=nan)

    def _common_dtype(self, node) -> str:
        import torch
        from braze.ir.types import dtype_name, torch_dtype
        metas = [torch.empty((1,) * v.type.rank if v.type.rank else (), device="meta",
                             dtype=torch_dtype(v.type.dtype)) for v in node.operands]
        s = node.attrs.get("scalar")
        other = s if s is not None else metas[1]
        return dtype_name(torch.result_type(metas[0], other))

    def _logical(self, node, expr, R):
        (a, _, sa), (b, _, sb) = self._args2(node)
        if a is None:
            (a, sa), (b, sb) = (b, sb), (a, sa)
        if b is None:
            # a Python number decides by the op's own reference: the result either follows
            # the tensor's truth or is a constant
            import torch
            impl = node.opdef.impl
            outs = [bool(impl(torch.tensor(t), scalar=bool(sb), scalar_first=False))
                    for t in (False, True)]
            if outs == [False, True]:
                return f"({a} != 0)"
            return f"tl.full({a}.shape, {int(outs[0])}, tl.int1)"
        return expr.format(a=a, b=b)

    def _pow(self, node, expr, R):
        if R not in FLOATS:
            raise BrazeError(f"pow on {R} has no kernel form (integer powers)")
        C = opmath(R)
        (a, da, va), (b, db, vb) = self._args2(node)
        if b is None and a is not None:             # tensor ** number: torch's special cases
            y = float(round_scalar(vb, R) if R in ("f16", "bf16") else vb)
            x = self._tmp(conv(conv(a, da, R), R, C))
            one = lit(1.0, C)
            special = {0.0: f"tl.full({x}.shape, 1, {TL[C]})", 1.0: x, 2.0: f"({x} * {x})",
                       3.0: f"({x} * {x} * {x})", -2.0: f"tl.div_rn({one}, {x} * {x})",
                       0.5: f"tl.sqrt_rn({x})", -0.5: f"tl.div_rn({one}, tl.sqrt_rn({x}))",
                       -1.0: f"tl.div_rn({one}, {x})"}
            if y in special:
                return conv(special[y], C, R)
        f64 = "f64"
        # a number is rounded to R first; torch's fp32 pow keeps a number exponent in fp64
        xs = self._arg((a, da, va), R, f64)
        ys = self._arg((b, db, vb), R if R != "f32" or b is not None else f64, f64)
        e = expr.format(a=xs, b=ys)
        return conv(conv(e, f64, C), C, R) if C != f64 else e

    # -- row reductions ----------------------------------------------------------------------
    def _reduce(self, node, R: str) -> str:
        x, dx = self._operand(node, 0)
        n = self.row_len
        combine = node.opdef.combine
        if combine == "max":
            # 16-bit floats are compared in f32 (exact both ways): Triton 3.6 refuses a bf16
            # reduce whose combine comes back f32 ("tt.reduce op type mismatch")
            M = opmath(dx)
            ident = lit(float("-inf"), M) if M in FLOATS else str(_INT_MIN[M])
            red = f"tl.reduce(tl.where(cm, {conv(x, dx, M)}, {ident}), 1, _elementwise_max)[:, None]"
            if dx in FLOATS:       # torch's amax propagates NaN; max.f32 on the GPU does not
                nan = f"tl.reduce(tl.where(cm, {x} != {x}, 0).to(tl.int32), 1, _sum_combine)"
                red = f"tl.where(({nan})[:, None] > 0, float(\"nan\"), {red})"
            return conv(red, M, R)
        A = opmath(R)
        zero = "0.0" if A in FLOATS else "0"
        red = f"tl.reduce(tl.where(cm, {conv(x, dx, A)}, {zero}), 1, _sum_combine)[:, None]"
        if combine == "mean":
            red = f"tl.div_rn({red}, {lit(float(n), A)})"
        return conv(red, A, R)


_RULES = {"convert": OpEmitter._convert, "exact": OpEmitter._exact, "raw": OpEmitter._raw,
          "float": OpEmitter._float, "select": OpEmitter._select, "arith": OpEmitter._arith,
          "scale": OpEmitter._scale, "compare": OpEmitter._compare, "minmax": OpEmitter._minmax,
          "logical": OpEmitter._logical, "pow": OpEmitter._pow}
NUMERICS = frozenset(_RULES)
