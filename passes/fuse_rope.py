"""fuse-rope: rotary embedding math on q and k -> one `rope` op, with QK-norm and cache write.

Before (Qwen3 after fuse-norm; a layer's q/k may also come from `reshape(split(..))`
once merge-projections has run, or be raw RMSNorm math on a traced graph):
    %33: f32[T, 4, 24] = rms_norm(%21, @model.layers.0.self_attn.q_norm.weight) {eps=1e-06}
    %41: f32[T, 2, 24] = rms_norm(%23, @model.layers.0.self_attn.k_norm.weight) {eps=1e-06}
    %42: f32[T, 4, 24] = mul(%33, %9)
    %43: f32[T, 4, 12] = slice(%33) {dim=2, end=12}
    %44: f32[T, 4, 12] = slice(%33) {dim=2, start=12}
    %45: f32[T, 4, 12] = neg(%44)
    %46: f32[T, 4, 24] = cat(%45, %43) {dim=-1}
    %47: f32[T, 4, 24] = mul(%46, %11)
    %48: f32[T, 4, 24] = add(%42, %47)
    ... the same on %41 ... -> %55
    cache_write(%55, %25, %k_cache.0, %v_cache.0, %slot_mapping)
    %56: f32[T, 4, 24] = paged_attention(%48, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.2041241452319315}
After:
    %48: f32[T, 4, 24] = rope_cache_write(%21, %23, %25, %9, %11, %k_cache.0, %v_cache.0, %slot_mapping, @model.layers.0.self_attn.q_norm.weight, @model.layers.0.self_attn.k_norm.weight) {style="neox", eps=1e-06}
    %56: f32[T, 4, 24] = paged_attention(%48, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.2041241452319315}

A rotation is `x * cos + rotate(x) * sin` (either order of each mul and of the add)
with rotate either NeoX rotate-half `cat(-x[..., h:], x[..., :h], -1)` or GPT-J
rotate-every-two `reshape(cat(unsqueeze(-x[..., 1::2], -1), unsqueeze(x[..., ::2], -1), -1))`
(torch.stack + flatten), x [T, heads, head_dim] and cos/sin [T, 1, head_dim].

Rotations pair up as (q, k) when they share cos, sin and style: first the pairs an
attention op states (k' written by a cache_write, q' read by the attention over that
cache), then the rest in schedule order (k being the one whose only reader is a
cache_write, if either is), never two that attention ops read as queries (Gemma 4's
KV-shared layers rotate q alone: each is a `rope1`). A pair becomes `rope(q, k, cos, sin)`, a
rotation left alone `rope1(x, cos, sin)`. Partial rotary (Phi-3/Phi-4),
`cat(rotation of x[..., :R], x[..., R:], -1)`, is the same with the whole head as x and
{rotary_dim=R}; its QK-norm (no family has one) is not folded. A pair's inputs that are single-use
`rms_norm`s with one eps (Qwen3's per-head QK-norm) fold in as trailing weights
(both or neither: the operands are positional). When k' has exactly one user, a
`cache_write(k', v, ...)`, the pair and the write become `rope_cache_write`, placed
where the write was, so it stays before the attention that reads the cache.
The count returned is rotations fused + norms folded + cache writes fused.
"""

from __future__ import annotations

from dataclasses import dataclass

from braze.ir import Graph, Node, Value
from braze.ir.types import dims_equal, is_float

from .manager import PassContext, register_pass
from .pattern import Op, Var, match
from .rewrite import Rewriter, Rule


def _slice(x, tag):
    return Op("slice", x, dim=Var(tag + "_dim"), start=Var(tag + "_start"), end=Var(tag + "_end"),
              step=Var(tag + "_step"))


def _rotation(rot):
    # the rotated half first: once it binds x, cos and sin, the plain `x * cos` mul matches
    # in either operand order (the matcher does not backtrack across sibling operands)
    return Op("add", Op("mul", rot, Var("sin")), Op("mul", Var("x"), Var("cos")))


NEOX = _rotation(Op("cat", Op("neg", _slice(Var("x"), "hi")), _slice(Var("x"), "lo"),
                    dim=Var("cat_dim")))
GPTJ = _rotation(Op("reshape", Op("cat", Op("unsqueeze", Op("neg", _slice(Var("x"), "hi")),
                                             dim=Var("u1_dim")),
                                  Op("unsqueeze", _slice(Var("x"), "lo"), dim=Var("u2_dim")),
                                  dim=Var("cat_dim")), shape=Var("shape")))


@dataclass
class Rotation:
    root: Node
    x: Value
    cos: Value
    sin: Value
    style: str
    nodes: list
    norm: Node | None = None     # the single-use rms_norm that produced x, if any
    rotary_dim: int = 0          # partial rotary: only x[..., :rotary_dim] rotates


def _last(d, rank) -> bool:
    return d in (-1, rank - 1)


def _slice_ok(m, tag, size, start, step) -> bool:
    end = m[tag + "_end"]
    return (m[tag + "_start"] in start and m[tag + "_step"] == step
            and (end is None or isinstance(end, int) and end >= size))


def rotation_problem(m, style: str) -> str:
    """Why a structural match is not exactly the op's rotation, or ''."""
    x, cos, sin = m["x"], m["cos"], m["sin"]
    t = x.type
    if t.rank != 3 or not is_float(t.dtype):
        return f"{x.ref} is {t}, not a floating [T, heads, head_dim] tensor"
    d = t.shape[2]
    if not isinstance(d, int) or d % 2:
        return f"head_dim {d} of {x.ref} is not a concrete even number"
    for v in (cos, sin):
        s = v.type.shape
        if v.type.rank != 3 or not is_float(v.type.dtype) or not (
                dims_equal(s[0], t.shape[0]) and s[1] == 1 and s[2] == d):
            return f"cos/sin {v.ref} is {v.type}, not [{t.shape[0]}, 1, {d}]"
    if not (_last(m["lo_dim"], 3) and _last(m["hi_dim"], 3)):
        return f"slices along dims {m['hi_dim']}, {m['lo_dim']}, not the last"
    h = d // 2
    if style == "neox":
        if not _last(m["cat_dim"], 3):
            return f"rotate-half concatenates along dim {m['cat_dim']}, not the last"
        if not (_slice_ok(m, "hi", d, (h,), 1) and m["lo_start"] in (None, 0)
                and m["lo_end"] == h and m["lo_step"] == 1):
            return (f"rotate-half must be cat(-x[..., {h}:], x[..., :{h}]); got "
                    f"-x[..., {m['hi_start']}:{m['hi_end']}:{m['hi_step']}], "
                    f"x[..., {m['lo_start']}:{m['lo_end']}:{m['lo_step']}]")
        return ""
    if not (_last(m["u1_dim"], 4) and _last(m["u2_dim"], 4) and _last(m["cat_dim"], 4)):
        return "rotate-every-two must stack along a new last dim"
    if not (_slice_ok(m, "hi", d, (1,), 2) and _slice_ok(m, "lo", d, (None, 0), 2)):
        return (f"rotate-every-two must stack (-x[..., 1::2], x[..., ::2]); got "
                f"-x[..., {m['hi_start']}::{m['hi_step']}], x[..., {m['lo_start']}::{m['lo_step']}]")
    flat = next(n for n in m.nodes if n.op == "reshape").results[0]
    if flat.type.rank != 3 or not all(dims_equal(a, b) for a, b in zip(flat.type.shape, t.shape)):
        return f"the stacked halves are reshaped to {flat.type}, not back to {t}"
    return ""


def _looks_like_rope(node: Node) -> str:
    """The style an `add(mul, mul)` with a cat or reshape(cat) factor would be, or ''."""
    if len(node.operands) != 2:
        return ""
    for v in node.operands:
        p = v.producer
        if p is None or p.op != "mul":
            return ""
    for v in node.operands:
        for f in v.producer.operands:
            p = f.producer
            if p is not None and p.op == "cat":
                return "neox"
            if p is not None and p.op == "reshape" and p.operands[0].producer is not None \
                    and p.operands[0].producer.op == "cat":
                return "gptj"
    return ""


def find_rotations(rw: Rewriter) -> list[Rotation]:
    """Every rotation in the graph (a walk that only collects: pairing needs them all)."""
    g, out = rw.g, []

    def found(node: Node, rw: Rewriter):
        style = _looks_like_rope(node)
        if not style:
            return None
        m = match(NEOX if style == "neox" else GPTJ, node.results[0], g)
        if not m:
            return f"RoPE ({style}) not fused: {m.reason}"
        problem = rotation_problem(m, style)
        if problem:
            return f"RoPE ({style}) not fused: {problem}"
        r = Rotation(node, m["x"], m["cos"], m["sin"], style, m.nodes)
        partial = _widen_partial(g, r)
        if partial:
            return f"partial RoPE ({style}) not fused: {partial}"
        p = r.x.producer
        inside = set(map(id, r.nodes))
        if p is not None and p.op == "rms_norm" and len(p.operands) == 2 and not r.rotary_dim \
                and r.x not in g.outputs.values() \
                and all(id(u) in inside for u in g.users(r.x)):
            r.norm = p
        out.append(r)
        return 0

    rw.run([Rule("add", found)])
    return out


def _widen_partial(g: Graph, r: Rotation) -> str:
    """Partial rotary, `cat(rotate(x[..., :R]), x[..., R:], -1)`: widen `r` to the whole head
    (x, the cat as root, rotary_dim R). '' when done or when this is not that pattern;
    else why the near miss is refused."""
    sl = r.x.producer
    out = r.root.results[0]
    readers = g.users(out)
    if sl is None or sl.op != "slice" or len(readers) != 1 or readers[0].op != "cat":
        return ""
    cat, src = readers[0], sl.operands[0]
    rank = src.type.rank
    if rank != 3 or not _last(sl.attrs["dim"], 3) or sl.attrs.get("start") not in (None, 0) \
            or sl.attrs.get("step", 1) != 1:
        return ""
    rd, d = r.x.type.shape[2], src.type.shape[2]
    if len(cat.operands) != 2 or cat.operands[0] is not out or not _last(cat.attrs["dim"], 3):
        return f"{cat.results[0].ref} is not cat(rotated, x[..., {rd}:], -1)"
    rest = cat.operands[1].producer
    if rest is None or rest.op != "slice" or rest.operands[0] is not src \
            or not _last(rest.attrs["dim"], 3) or rest.attrs.get("start") != rd \
            or rest.attrs.get("step", 1) != 1 or not (rest.attrs.get("end") is None
                                                     or rest.attrs["end"] >= d):
        return (f"the pass-through half {cat.operands[1].ref} is not x[..., {rd}:] of the "
                f"rotated {src.ref}")
    if out in g.outputs.values():
        return f"the rotated part {out.ref} is a graph output"
    inside = set(map(id, r.nodes))
    extra = [sl] if all(id(u) in inside for u in g.users(r.x)) else []
    if g.num_users(rest.results[0]) == 1:
        extra.append(rest)
    r.nodes = r.nodes + extra + [cat]
    r.root, r.x, r.rotary_dim = cat, src, rd
    return ""


def _pairable(a: Rotation, b: Rotation) -> bool:
    ta, tb = a.x.type, b.x.type
    return (a.cos is b.cos and a.sin is b.sin and a.style == b.style
            and a.rotary_dim == b.rotary_dim
            and dims_equal(ta.shape[0], tb.shape[0]) and ta.shape[2] == tb.shape[2])


def pair_rotations(g: Graph, rots: list[Rotation]):
    """[(q, k, cache_write or None)] and the single rotations left over."""
    by_root = {id(r.root.results[0]): r for r in rots}
    taken, pairs = set(), []
    for cw in g.nodes:
        if cw.op != "cache_write" or id(cw.operands[0]) not in by_root:
            continue
        rk = by_root[id(cw.operands[0])]
        for att in g.users(cw.operands[2]):
            if att.op not in ("paged_attention", "attention") or att.operands[1] is not cw.operands[2]:
                continue
            rq = by_root.get(id(att.operands[0]))
            if rq and rq is not rk and not {id(rq), id(rk)} & taken and _pairable(rq, rk):
                pairs.append((rq, rk, cw))
                taken |= {id(rq), id(rk)}
                break
    rest = [r for r in rots if id(r) not in taken]
    singles = []
    while rest:
        a = rest.pop(0)
        # two queries are never a (q, k) pair (Gemma 4's KV-shared layers rotate only q)
        b = next((b for b in rest if _pairable(a, b)
                  and not (_is_query(g, a) and _is_query(g, b))), None)
        if b is None:
            singles.append(a)
            continue
        rest.remove(b)
        # no attention says which is k: the one whose only reader is a cache_write
        cw = _sole_cache_write(g, b) or _sole_cache_write(g, a)
        pairs.append((b, a, cw) if cw is not None and cw.operands[0] is a.root.results[0]
                     else (a, b, cw))
    return pairs, singles


def _is_query(g: Graph, r: Rotation) -> bool:
    out = r.root.results[0]
    return any(u.op in ("paged_attention", "attention") and u.operands[0] is out
               for u in g.users(out))


def _sole_cache_write(g: Graph, r: Rotation) -> Node | None:
    out = r.root.results[0]
    readers = g.users(out)
    if len(readers) == 1 and readers[0].op == "cache_write" and readers[0].operands[0] is out:
        return readers[0]
    return None


class _Fuser:
    def __init__(self, rw: Rewriter):
        self.rw, self.g, self.ctx = rw, rw.g, rw.ctx
        self.subst: dict = {}     # id(old value) -> the fused result that replaced it
        self.count = 0

    def resolve(self, v: Value) -> Value:
        while id(v) in self.subst:
            v = self.subst[id(v)]
        return v

    def fold(self, rs: list[Rotation]) -> bool:
        """Fold the rotations' QK-norms in? Both or neither, and with one eps."""
        norms = [r.norm for r in rs]
        if all(n is None for n in norms):
            return False
        if any(n is None for n in norms):
            self.ctx.refuse(rs[0].root, "QK-norm not folded into rope: only one of q, k is a "
                                        "single-use rms_norm (the norm weights come in pairs)")
            return False
        if len({bool(n.attrs.get("scale_f32")) for n in norms}) > 1:
            self.ctx.refuse(rs[0].root, "QK-norm not folded into rope: one of the q and k norms "
                                        "scales in f32 (Gemma) and the other does not")
            return False
        if len({repr(n.attrs["eps"]) for n in norms}) > 1:
            self.ctx.refuse(rs[0].root, "QK-norm not folded into rope: the q and k norms differ "
                                        f"in eps ({', '.join(repr(n.attrs['eps']) for n in norms)})")
            return False
        return True

    def emit(self, op: str, rs: list[Rotation], fold: bool, at: Node, results: list[Value],
             v: list = (), cache: list = (), dead_extra: tuple = ()) -> bool:
        """op(xs.., v, cos, sin, cache.., weights..) in place of `at`, if every operand is
        defined before `at` and every reader of `results` comes after it."""
        g = self.g
        xs = [self.resolve(r.norm.operands[0] if fold else r.x) for r in rs]
        ws = [self.resolve(r.norm.operands[1]) for r in rs] if fold else []
        operands = xs + [self.resolve(o) for o in (*v, rs[0].cos, rs[0].sin, *cache)] + ws
        dead = [n for r in rs for n in r.nodes] + [r.norm for r in rs if fold] + list(dead_extra)
        gone = set(map(id, dead))
        here = g.index(at)
        if any(o.producer is not None and (id(o.producer) in gone or g.index(o.producer) >= here)
               for o in operands):
            return False
        if any(id(u) not in gone and g.index(u) <= here for r in results for u in g.users(r)):
            return False
        attrs = {"style": rs[0].style, "eps": rs[0].norm.attrs["eps"] if fold else None}
        if rs[0].rotary_dim:
            attrs["rotary_dim"] = rs[0].rotary_dim
        if fold and rs[0].norm.attrs.get("scale_f32"):
            attrs["scale_f32"] = True
        node = self.rw.rebuild(at, dead, op, operands, attrs, replacing=results)
        for old, new in zip(results, node.results):
            self.subst[id(old)] = new
        self.count += len(rs) * (2 if fold else 1) + len(dead_extra)
        return True

    def pair(self, q: Rotation, k: Rotation, cw: Node | None) -> None:
        qv, kv = q.root.results[0], k.root.results[0]
        fold = self.fold([q, k])
        if cw is not None:
            if self.g.num_users(kv) != 1 or kv in self.g.outputs.values():
                self.ctx.refuse(cw, f"cache write not fused into rope: {kv.ref} has other users")
            elif self.emit("rope_cache_write", [q, k], fold, cw, [qv], v=cw.operands[1:2],
                           cache=cw.operands[2:], dead_extra=(cw,)):
                return
            else:
                self.ctx.refuse(cw, f"cache write not fused into rope: {qv.ref} is read before "
                                    f"the write, or an input is computed after it")
        first, second = sorted((q, k), key=lambda r: self.g.index(r.root))
        if not (self.emit("rope", [q, k], fold, first.root, [qv, kv])
                or self.emit("rope", [q, k], fold, second.root, [qv, kv])):
            self.ctx.refuse(q.root, f"RoPE of {qv.ref} and {kv.ref} not paired: no place where "
                                    f"both inputs exist before either result is read")
            self.single(q)
            self.single(k)

    def single(self, r: Rotation) -> None:
        self.emit("rope1", [r], self.fold([r]), r.root, [r.root.results[0]])


# after fuse-norm: a pair's single-use rms_norm inputs (the QK-norm) fold in
@register_pass("fuse-rope", after=("fuse-norm",))
def fuse_rope(g: Graph, ctx: PassContext) -> int:
    """x * cos + rotate(x) * sin on q and k -> rope / rope1 / rope_cache_write."""
    rw = Rewriter(g, ctx)
    rots = find_rotations(rw)
    pairs, singles = pair_rotations(g, rots)
    fuser = _Fuser(rw)
    for q, k, cw in pairs:
        fuser.pair(q, k, cw)
    for r in singles:
        fuser.single(r)
    return fuser.count
