"""canonicalize: dead code, common subexpressions, no-ops, constant folding; to a fixed point.

Before (a float32 Llama, abridged):

    %1: f32[T] = cast(%positions) {dtype="f32"}
    %2: f32[T, 1] = unsqueeze(%1) {dim=1}
    %3: f32[1, 8] = unsqueeze(@model.rotary_emb.inv_freq) {dim=0}
    %4: f32[T, 8] = mul(%2, %3)
    %5: f32[T, 16] = cat(%4, %4) {dim=-1}
    %6: f32[T, 16] = cos(%5)
    %8: f32[T, 16] = cast(%6) {dtype="f32"}
    %9: f32[T, 1, 16] = unsqueeze(%8) {dim=1}
    %12: f32[T, 64] = cast(%0) {dtype="f32"}
    %13: f32[T, 64] = pow(%12) {scalar=2}

After:

    param @model.rotary_emb.inv_freq.unsqueeze0: f32[1, 8] = unsqueeze(@model.rotary_emb.inv_freq) {dim=0}
    %1: f32[T] = cast(%positions) {dtype="f32"}
    %2: f32[T, 1] = unsqueeze(%1) {dim=1}
    %4: f32[T, 8] = mul(%2, @model.rotary_emb.inv_freq.unsqueeze0)
    %5: f32[T, 16] = cat(%4, %4) {dim=-1}
    %6: f32[T, 16] = cos(%5)
    %9: f32[T, 1, 16] = unsqueeze(%6) {dim=1}
    %13: f32[T, 64] = pow(%0) {scalar=2}

Each sweep walks the node list once, in order, keeping a map old value -> new value
(so replacing a value costs nothing per use), and applies at each node:

1. No-op rules. Every one is exact in the IR's semantics (torch on the reference
   interpreter), bit for bit, for every input value including -0.0, inf and nan:
   - `cast` to the dtype the value already has.
   - `reshape`, `expand`, `slice` whose result type equals the operand's type (same
     shape: a slice that keeps all n of n elements in order is the whole dim with
     step 1); `squeeze` of a concrete dim that is not 1 (a symbolic dim such as T may
     be 1 at run time, and torch then squeezes it).
   - `permute` by the identity; `permute` of a `permute` becomes one permute.
   - `reshape` of a `reshape` becomes one reshape of the first operand.
   - `cast(cast(x: A, B), C)` becomes `cast(x, C)` when every A value is exactly a B
     value (f16/bf16 -> f32 -> f64, ints into wider ints, small ints into floats that
     hold them; see `_EXACT`) and the last step is not float -> int (out-of-range
     float -> int conversions depend on the source type). With C == A the cast then
     disappears: f16 -> f32 -> f16 and bf16 -> f32 -> bf16 are identities; f32 -> f16
     -> f32 rounds and stays.
   - `mul`/`div` by a scalar 1 (int or float, not bool) when the result dtype equals
     x's (an i64 tensor * 1.0 is f32 and stays).
   - `add` of int 0 to an integer tensor; `x - 0` and `x - 0.0`; `x + (-0.0)`. For
     floats `x + 0.0` (and so `x - (-0.0)`) is NOT removed: IEEE gives -0.0 + 0.0 =
     +0.0, while x - 0.0 and x + (-0.0) return x exactly, -0.0 included.
   No-op rules never look through a value that some op writes (the KV cache): an alias
   of mutable state is not the same as a copy of it.
2. Common subexpressions: same op, the same operand values, equal attributes (floats
   by exact value and type, -0.0 != 0.0, nan never equal) compute the same results,
   so a later node is replaced by the earlier one. Ops the registry calls commutative
   (add, mul, maximum, minimum, eq, ne, logical_and, logical_or) match either operand order. Ops that write are never merged.
   An operand that some op writes carries a version bumped at each write, so a read
   of the cache after a `cache_write` is never merged with one before it (the verifier
   forbids reads before the write today; the pass does not rely on it).
3. Constant folding: a node with one result, no writes, and only params as operands
   becomes a derived param (`param @w.op = op(@w)`, computed once at compile time).
   Fold results are params, so chains fold. Refused (with a reason for --explain): a
   result with a symbolic dim, or one bigger than its sources together and over
   `SMALL_CONSTANT_BYTES` (an expand or full_like to a big shape would bloat the
   artifact for no saving).
4. Dead code: `g.remove_dead()` after each sweep; ops that write are never dead.

Sweeps repeat until one changes nothing (one sweep in order usually reaches the fixed
point; the next confirms it). Surviving nodes keep their order: the list is the
schedule, and cache writes must stay before the attention that reads them.
Returns the number of rewrites: rule applications plus other nodes found dead.
"""

from __future__ import annotations

import math

from braze.ir import BrazeError, Graph, Node, Value
from braze.ir.ops import get_op
from braze.ir.types import is_float, torch_dtype

from .manager import PassContext, register_pass

SMALL_CONSTANT_BYTES = 64 * 1024
MAX_SWEEPS = 20

# _EXACT[a] = dtypes that hold every value of dtype a exactly (besides a itself): wider
# floats, ints of wider range, and floats whose significand holds the int (f16: 11 bits,
# bf16: 8, f32: 24, f64: 53). Nothing holds every f16 value but f32/f64; nothing holds i64.
_EXACT = {
    "f16": {"f32", "f64"}, "bf16": {"f32", "f64"}, "f32": {"f64"}, "f64": set(),
    "bool": {"u8", "i8", "i16", "i32", "i64", "f16", "bf16", "f32", "f64"},
    "u8": {"i16", "i32", "i64", "f16", "bf16", "f32", "f64"},   # 0..255: bf16 holds 2^8
    "i8": {"i16", "i32", "i64", "f16", "bf16", "f32", "f64"},
    "i16": {"i32", "i64", "f32", "f64"},
    "i32": {"i64", "f64"},
    "i64": set(),
}


def _exact(a: str, b: str) -> bool:
    return a == b or b in _EXACT[a]


def _freeze(v):
    """A hashable key for an attribute value: floats by exact bits and type, nan unique."""
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, int):
        return ("i", v)
    if isinstance(v, float):
        return object() if math.isnan(v) else ("f", v.hex())
    if isinstance(v, (list, tuple)):
        return ("l",) + tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return ("d",) + tuple((k, _freeze(x)) for k, x in sorted(v.items()))
    try:
        hash(v)
    except TypeError:
        return object()         # an attribute we cannot compare: never equal
    return ("o", type(v).__name__, v)


def _is_number(v, target: float) -> bool:
    return type(v) in (int, float) and v == target


def _is_neg_zero(v) -> bool:
    return type(v) is float and v == 0.0 and math.copysign(1.0, v) < 0


def _is_pos_zero(v) -> bool:
    return type(v) is float and v == 0.0 and math.copysign(1.0, v) > 0


def _identity_of(node: Node, written: set) -> Value | None:
    """The existing value this node always equals, if a no-op rule says so."""
    if len(node.operands) != 1 or len(node.results) != 1:
        return None
    x, res, op, a = node.operands[0], node.results[0], node.op, node.attrs
    if x in written or res.type != x.type:
        return None
    if op == "squeeze":
        # a symbolic dim may be 1 at run time (T == 1), and then torch does squeeze it
        # (the squeeze op refuses to type that case today; this rule does not rely on it)
        return x if type(x.type.shape[a["dim"] % x.type.rank]) is int else None
    if op == "cast" or get_op(op).same_type_is_identity:
        return x
    if op == "permute":
        rank = x.type.rank
        return x if [d % rank for d in a["dims"]] == list(range(rank)) else None
    s = a.get("scalar")
    if op == "mul" and _is_number(s, 1):
        return x
    if op == "div" and _is_number(s, 1) and not a["scalar_first"]:
        return x
    if op == "sub" and not a["scalar_first"] and ((type(s) is int and s == 0) or _is_pos_zero(s)):
        return x                    # x - 0.0 is exact, -0.0 included; x - (-0.0) is x + 0.0
    if op == "add" and (_is_neg_zero(s) or (type(s) is int and s == 0 and not is_float(x.type.dtype))):
        return x
    return None


def _fold_through(node: Node, written: set) -> bool:
    """Rewrite op(op(x)) into op(x) in place for cast and reshape chains; True if done."""
    if node.op not in ("cast", "reshape", "permute"):
        return False
    inner_v = node.operands[0]
    inner = inner_v.producer
    if inner is None or inner.op != node.op or inner_v in written or inner.operands[0] in written:
        return False
    x = inner.operands[0]
    if node.op == "cast":
        a, b, c = x.type.dtype, inner_v.type.dtype, node.results[0].type.dtype
        if not (b in _EXACT[a] and (is_float(c) or not is_float(b) or _exact(a, c))):
            return False
        node.operands = (x,)
        return True
    if node.op == "permute":
        rank = x.type.rank
        p1 = [d % rank for d in inner.attrs["dims"]]
        node.attrs = dict(node.attrs, dims=[p1[d % rank] for d in node.attrs["dims"]])
        node.operands = (x,)
        return True
    # reshape: the outer shape (maybe with -1) read against x gives the same type
    try:
        if node.opdef.infer([x.type], node.attrs) != [node.results[0].type]:
            return False
    except BrazeError:
        return False
    node.operands = (x,)
    return True


def _cse_key(node: Node, version: dict):
    ops = tuple((id(v), version.get(v, 0)) for v in node.operands)
    if node.opdef.commutative and len(ops) == 2:
        ops = tuple(sorted(ops))
    return (node.op, ops, tuple((k, _freeze(v)) for k, v in node.attrs.items()))


def _nbytes(t) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n * torch_dtype(t.dtype).itemsize


def _fold_name(g: Graph, node: Node) -> str:
    src = node.operands[0].name
    tag = node.op
    dim = node.attrs.get("dim")
    if type(dim) is int:
        rank = node.results[0].type.rank if node.op == "unsqueeze" else node.operands[0].type.rank
        tag += str(dim % rank if rank else 0)
    elif node.op == "cast":
        tag += "_" + node.attrs["dtype"]
    return g.unique_param_name(f"{src}.{tag}")


def _why_not_fold(node: Node) -> str | None:
    out = node.results[0].type
    if not all(type(d) is int for d in out.shape):
        return f"constant folding: result {out} has a symbolic dim; derived params need concrete shapes"
    size = _nbytes(out)
    src = sum(_nbytes(v.type) for v in node.operands)
    if size > src and size > SMALL_CONSTANT_BYTES:
        return (f"constant folding: result {out} is {size} bytes, more than its sources' "
                f"{src} bytes; computing it at run time is cheaper than shipping it")
    return None


def _sweep(g: Graph, ctx: PassContext, refused: set) -> tuple[int, int]:
    """One pass over the nodes; returns (rewrites, nodes replaced outright)."""
    written = {n.operands[i] for n in g.nodes for i in n.opdef.writes}
    repl: dict[Value, Value] = {}
    seen: dict = {}
    version: dict[Value, int] = {}
    rewrites = replaced = 0
    for node in g.nodes:
        if repl and any(v in repl for v in node.operands):
            node.operands = [repl.get(v, v) for v in node.operands]
        ops = node.operands
        writes = node.opdef.writes
        if writes:
            for i in writes:
                version[ops[i]] = version.get(ops[i], 0) + 1
            continue
        if _fold_through(node, written):
            rewrites += 1
        same = _identity_of(node, written)
        if same is not None:
            repl[node.results[0]] = same
            rewrites += 1
            replaced += 1
            continue
        key = _cse_key(node, version)
        prev = seen.get(key)
        if prev is not None:
            for r, p in zip(node.results, prev):
                repl[r] = p
            rewrites += 1
            replaced += 1
            continue
        ops = node.operands              # (a fold through may have replaced them)
        if len(node.results) == 1 and ops and all(v.kind == "param" for v in ops):
            why = _why_not_fold(node)
            if why is None:
                p = g.add_derived_param(_fold_name(g, node), node.op, list(ops), node.attrs,
                                        type=node.results[0].type)
                repl[node.results[0]] = p
                seen[key] = [p]
                rewrites += 1
                replaced += 1
                continue
            if node not in refused:
                refused.add(node)
                ctx.refuse(node, why)
        seen[key] = node.results
    for k, v in g.outputs.items():
        g.outputs[k] = repl.get(v, v)
    return rewrites, replaced


@register_pass("canonicalize", stage="simplify", level=1)
def run(g: Graph, ctx: PassContext) -> int:
    """Dead code, common subexpressions, no-op casts/reshapes/..., constant folding."""
    total = 0
    refused: set = set()
    for _ in range(MAX_SWEEPS):
        rewrites, replaced = _sweep(g, ctx, refused)
        dead = g.remove_dead() - replaced
        total += rewrites + dead
        if rewrites + dead == 0:
            break
    return total
