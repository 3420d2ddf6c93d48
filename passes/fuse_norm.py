"""fuse-norm: RMSNorm math -> `rms_norm`; a residual add in front of it -> `add_rms_norm`.

RMSNorm as models/layers.py writes it (the casts are f32 -> f32 in a float32
model, and may be gone once `canonicalize` has run; `w * n` or `n * w`):

Before:
    %59: f32[T, 64] = add(%0, %58)
    %60: f32[T, 64] = cast(%59) {dtype="f32"}
    %61: f32[T, 64] = pow(%60) {scalar=2}
    %62: f32[T, 1] = mean(%61) {dims=[-1], keepdim=true}
    %63: f32[T, 1] = add(%62) {scalar=1e-06}
    %64: f32[T, 1] = rsqrt(%63)
    %65: f32[T, 64] = mul(%60, %64)
    %66: f32[T, 64] = cast(%65) {dtype="f32"}
    %67: f32[T, 64] = mul(@model.layers.0.post_attention_layernorm.weight, %66)
    %68: f32[T, 128] = linear(%67, @model.layers.0.mlp.gate_proj.weight)
    ...
    %73: f32[T, 64] = add(%59, %72)
After:
    %67: f32[T, 64], %59: f32[T, 64] = add_rms_norm(%0, %58, @model.layers.0.post_attention_layernorm.weight) {eps=1e-06}
    %68: f32[T, 128] = linear(%67, @model.layers.0.mlp.gate_proj.weight)
    ...
    %73: f32[T, 64] = add(%59, %72)

Step 1 turns every RMSNorm into `rms_norm(x, w) {eps}` wherever it sits (also
the per-head QK norm over [T, heads, head_dim]). It needs the reduction to be a
keepdim mean over the last dim, the math in float32 (x cast to f32, or x
already f32) and the cast back to x's own dtype, because that is exactly what
the op computes; w must be 1-D over the last dim. Step 2 folds a two-tensor,
same-shape `add` that feeds an `rms_norm` into `add_rms_norm(a, b, w)`, whose
second result is the sum (the residual stream, read again by the next
residual add); it sits where the add was. The first layer's input norm has no
add in front and stays `rms_norm`.

GemmaRMSNorm, `(x.f32 * rsqrt(..) * w').to(x.dtype)` with w' = 1 + w.float() (which
canonicalize computes once at compile time, a derived param), becomes
`rms_norm(x, w') {eps, scale_f32=true}`; in an f32 model there are no casts and it is
the plain pattern (the same math). Gemma's sandwich norms need nothing more: the
post-norm's output is what the residual add adds, so the next pre-norm folds that add
in as usual (`rms_norm` of the attention output, then `add_rms_norm`). The count returned is norms fused plus adds
folded.
"""

from __future__ import annotations

from braze.ir import Graph, Node, Value
from braze.ir.types import is_float

from .manager import PassContext, register_pass
from .pattern import Op, Opt, Var, match
from .rewrite import Rewriter, Rule


def _hf(cast_in: bool):
    """x.float(), or x itself when x is already f32 (canonicalize drops the f32 -> f32 cast)."""
    x32 = Var("x", dtype="f32")
    return Opt(Op("cast", Var("x"), dtype="f32"), x32) if cast_in else x32


def _rsqrt_pattern(hf):
    var = Op("mean", Op("pow", hf, scalar=2), dims=Var("dims"), keepdim=Var("keepdim"))
    return Op("rsqrt", Op("add", var, scalar=Var("eps")))


def _norm_pattern(cast_in: bool):
    hf = _hf(cast_in)
    norm = Op("mul", hf, _rsqrt_pattern(hf))
    return Op("mul", Var("w"), Opt(Op("cast", norm, dtype=Var("out_dtype")), norm))


WITH_CAST, NO_CAST, RSQRT = _norm_pattern(True), _norm_pattern(False), _rsqrt_pattern(_hf(True))
RSQRT_OF_F32 = _rsqrt_pattern(_hf(False))     # x.float() also read by the mul: from the f32 value


def _scaled_f32_pattern():
    """GemmaRMSNorm: (n.f32 * w).to(x dtype), w the compile-time 1 + w.float()."""
    hf = _hf(True)
    return Op("cast", Op("mul", Var("w"), Op("mul", hf, _rsqrt_pattern(hf))),
              dtype=Var("out_dtype"))


SCALED_F32 = _scaled_f32_pattern()


def match_rms_norm(g: Graph, root: Value):
    """The RMSNorm rooted at `root`, or the failed Match (with its reason)."""
    m = match(WITH_CAST, root, g)
    if not m and "also used by" in m.reason:
        # x.float() read elsewhere too: match from the f32 value instead (the cast stays)
        m2 = match(NO_CAST, root, g)
        if m2:
            return m2
    return m


def norm_problem(m) -> str:
    """Why a structurally matched RMSNorm is not the op's exact math, or ''."""
    x, w = m["x"], m["w"]
    rank = x.type.rank
    if not is_float(x.type.dtype):
        return f"x {x.ref} is {x.type.dtype}, not floating point"
    if list(m["dims"]) not in ([-1], [rank - 1]) or m["keepdim"] is not True:
        return f"mean over dims {m['dims']} keepdim={m['keepdim']}, not the last dim with keepdim"
    eps = m["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return f"eps {eps!r} is not a number"
    out = m.get("out_dtype", x.type.dtype)
    if out != x.type.dtype:
        return f"the normalised value is cast to {out}, not back to x's dtype {x.type.dtype}"
    if m.get("out_dtype") is None and x.type.dtype != "f32":
        return (f"the f32 normalised value is scaled without a cast back to x's dtype "
                f"{x.type.dtype} (before or after the weight)")
    if w.type.shape != (x.type.shape[-1],):
        return f"weight {w.ref} is {w.type}, not [{x.type.shape[-1]}] over the last dim of x"
    return ""


def _looks_like_norm(node: Node) -> bool:
    """rsqrt of a mean of squares (eps added or not): an RMSNorm, whether or not it matches."""
    p = node.operands[0].producer
    p = p.operands[0].producer if p is not None and p.op == "add" else p
    p = p.operands[0].producer if p is not None and p.op == "mean" else None
    return p is not None and p.op == "pow"


def _roots_after(g: Graph, rsqrt: Node) -> list[Value]:
    """Muls up to four steps downstream of an rsqrt, farthest first: candidate norm outputs."""
    out, frontier = [], [rsqrt]
    for _ in range(4):
        frontier = [u for n in frontier for u in g.users(n.results[0])
                    if u.op in ("mul", "cast", "add")]
        out += [n.results[0] for n in frontier if n.op == "mul"]
    return out[::-1]


def diagnose(g: Graph, rsqrt: Node) -> str:
    """Why the RMSNorm around this rsqrt did not match (pattern reasons name the first
    difference only when the pattern has no alternatives, so look piece by piece)."""
    m = match(RSQRT, rsqrt.results[0], g)
    if not m and "also used by" in m.reason:
        m = match(RSQRT_OF_F32, rsqrt.results[0], g)
    if not m:
        return f"rsqrt is not of mean(x^2) + eps: {m.reason}"
    for root in _roots_after(g, rsqrt):
        reason = match_rms_norm(g, root).reason
        if "also used by" in reason:
            return reason
    return ("the normalised x * rsqrt(mean(x^2) + eps) is not scaled by a 1-D weight (w * n): "
            "a weightless norm (Gemma 4's value and router norms) is left to fuse-pointwise")


def unshare_normalisations(g: Graph) -> int:
    """Give each reader of a shared x * rsqrt(mean(x^2) + eps) its own copy of that chain.

    Norms of the same x with the same eps normalise identically, so canonicalize's CSE
    merges them (Gemma 4 norms its residual three times: dense MLP, experts, router; and
    its k_eq_v layers norm the one projection as k with a weight and as v without).
    Each norm then matches on its own; recomputing the reduction costs less than leaving
    them unfused. Returns the number of copies made."""
    copies = 0
    for rsqrt in [n for n in g.nodes if n.op == "rsqrt" and _looks_like_norm(n)]:
        add = rsqrt.operands[0].producer                 # _looks_like_norm: add? <- mean <- pow
        mean = add.operands[0].producer if add.op == "add" else add
        pow_ = mean.operands[0].producer
        chain = [pow_, mean] + ([add] if add is not mean else []) + [rsqrt]
        hf = pow_.operands[0]            # x.float(), or x
        if hf.producer is not None and hf.producer.op == "cast":
            chain.insert(0, hf.producer)      # each copy casts x itself, as one norm does
        for n in list(g.users(rsqrt.results[0])):
            if n.op != "mul" or hf not in n.operands:
                continue
            readers = g.users(n.results[0])
            for reader in readers[1:]:
                _clone_chain(g, chain + [n], reader, n.results[0])
                copies += 1
    return copies


def _clone_chain(g: Graph, chain: list, reader: Node, old: Value) -> None:
    new: dict[int, Value] = {}
    with g.inserting_before(reader):
        for nd in chain:
            c = g.add_node(nd.op, [new.get(id(o), o) for o in nd.operands], dict(nd.attrs))
            new[id(nd.results[0])] = c.results[0]
    reader.operands = [new[id(old)] if o is old else o for o in reader.operands]


def _fuse_norm(node: Node, rw: Rewriter):
    """An RMSNorm whose outermost op is `node` (a mul) -> rms_norm."""
    m = match_rms_norm(rw.g, node.results[0])
    if not m:
        return None
    rw.claim(m.nodes)        # its inner muls are not the roots of smaller norms
    problem = norm_problem(m)
    if problem:
        return problem
    rw.rebuild(node, m.nodes, "rms_norm", [m["x"], m["w"]], {"eps": m["eps"]},
               replacing=[node.results[0]])
    return 1


def _fuse_scaled_f32(node: Node, rw: Rewriter):
    """A GemmaRMSNorm whose outermost op is `node` (the cast back) -> rms_norm {scale_f32}."""
    if node.results[0].type.dtype == "f32":
        return None          # f32 models: no cast, the plain pattern matches (same math)
    m = match(SCALED_F32, node.results[0], rw.g)
    if not m:
        return None
    rw.claim(m.nodes)
    problem = norm_problem(m)
    if problem:
        return problem
    rw.rebuild(node, m.nodes, "rms_norm", [m["x"], m["w"]], {"eps": m["eps"], "scale_f32": True},
               replacing=[node.results[0]])
    return 1


def _explain_norm(node: Node, rw: Rewriter):
    """An rsqrt of a mean of squares that no RMSNorm match took: why not."""
    return diagnose(rw.g, node) if _looks_like_norm(node) else None


def _fold_residual_add(node: Node, rw: Rewriter):
    """rms_norm(add(a, b), w) -> add_rms_norm(a, b, w), which also returns a + b."""
    g = rw.g
    if len(node.operands) != 2:
        return None                     # a norm of gathered rows (prune-logits): left as is
    s, w = node.operands
    add = s.producer
    if add is None or add.op != "add":
        return None
    if len(add.operands) != 2:
        return f"residual add {s.ref} adds a scalar, not two tensors"
    a, b = add.operands
    if a.type.shape != b.type.shape:
        return f"residual add {s.ref} broadcasts {a.type} with {b.type}"
    if w.producer is not None and g.index(w.producer) > g.index(add):
        return f"weight {w.ref} is computed after the residual add {s.ref}"
    rw.rebuild(add, [add, node], "add_rms_norm", [a, b, w], dict(node.attrs),
               replacing=[node.results[0], s])
    return 1


@register_pass("fuse-norm")
def fuse_norm(g: Graph, ctx: PassContext) -> int:
    """RMSNorm -> rms_norm; residual add + rms_norm -> add_rms_norm."""
    unshare_normalisations(g)
    rw = Rewriter(g, ctx)
    # outermost mul first: a norm's inner muls are then gone, or claimed by its refusal
    rw.run([Rule("cast", _fuse_scaled_f32, explain="RMSNorm (scaled in f32) not fused: "),
            Rule("mul", _fuse_norm, explain="RMSNorm not fused: ")], reverse=True)
    rw.run([Rule("rsqrt", _explain_norm, explain="RMSNorm not fused: ")])
    rw.run([Rule("rms_norm", _fold_residual_add)])
    return rw.count
