"""tabulate-positions: what a step computes from its positions alone becomes a table lookup.

RoPE's cos and sin are functions of each token's position and of constants (inv_freq,
the attention scaling; any other op on positions alone, a comparison included). A step computed them every
time: cast, mul by inv_freq, cat, cos, sin, casts -- four or five launches before the
first layer. The pass evaluates that subgraph once, at compile time, for every position
a sequence can reach (0 .. MB * block_size - 1), as derived parameters, and a step reads
its rows with one `index_select` per group of tables of one shape.

Before (a bf16 Llama after canonicalize):
    %2: f32[T] = cast(%positions) {dtype="f32"}
    %3: f32[T, 1] = unsqueeze(%2) {dim=1}
    %4: f32[T, 32] = mul(%3, @model.rotary_emb.inv_freq.unsqueeze0)
    %5: f32[T, 64] = cat(%4, %4) {dim=-1}
    %6: f32[T, 64] = cos(%5)
    %7: bf16[T, 64] = cast(%6) {dtype="bf16"}
    %8: bf16[T, 1, 64] = unsqueeze(%7) {dim=1}
    ... the same from %5 through sin to %11 ...
After:
    param @positions.table: i64[4096] = arange() {n=4096}
    param @positions.table.cast_f32 ... the same ops on the parameters, ending in
    param @positions.table.cat: bf16[4096, 1, 128] = cat(@...cos..., @...sin...) {dim=-1}
    %20: bf16[T, 1, 128] = index_select(@positions.table.cat, %positions) {dim=0}
    %8: bf16[T, 1, 64], %11: bf16[T, 1, 64] = split(%20) {sizes=[64, 64], dim=-1}

Which nodes: those reading a value computed from %positions (and nothing but parameters
besides), whose every result row t depends on row t of those values only: pointwise ops,
and unsqueeze, cat, slice and split on a dim other than the token dim 0. Their values
read by any other node (or returned) are the frontier the tables replace; each table is
the same chain of ops with `arange` in place of %positions (ir/op_shape.py), computed
with the reference implementations when the artifact is written (braze/compiler.py
`materialize`), so a step's values equal the traced graph's exactly. Frontier values of
one shape (but the last dim) and dtype share one table, concatenated on the last dim,
and one gather; `split` (a view) gives each its columns, each part padded to a multiple
of 16 bytes so that its view starts aligned (Llama: cos and sin [T, 1, 64] side by side).

Refused, with a reason for --explain: no max_model_len in the options (braze opt without
--set max_model_len=N), or tables over MAX_TABLE_BYTES (a 10M-token context: the step keeps computing them).
"""

from __future__ import annotations

from braze.ir import Graph, Node, Value
from braze.ir.op_reduce import norm_dim
from braze.ir.types import T, TensorType, torch_dtype

from .manager import PassContext, register_pass

MAX_TABLE_BYTES = 256 << 20
_DIM_OPS = ("unsqueeze", "cat", "slice", "split")      # row-wise unless along dim 0


def _rowwise(node: Node, derived: set) -> bool:
    """Whether each result row t of `node` depends only on row t of its derived operands
    (the others being parameters), so evaluating it on all positions gives a table."""
    op = node.opdef
    if op.writes or op.graph_break:
        return False
    if not all(v in derived or v.kind == "param" for v in node.operands):
        return False
    if not all(v.type.rank >= 1 and v.type.shape[0] == T for v in node.operands if v in derived):
        return False
    if not all(r.type.rank >= 1 and r.type.shape[0] == T for r in node.results):
        return False
    if op.pointwise:
        return True
    if node.op in _DIM_OPS:
        rank = node.results[0].type.rank if node.op == "unsqueeze" else node.operands[0].type.rank
        return norm_dim(node.attrs["dim"], rank, node.op) != 0
    return False


def _rows(t: TensorType) -> int:
    n = torch_dtype(t.dtype).itemsize
    for d in t.shape[1:]:
        n *= d
    return n


def _concat(g: Graph, parts: list[Value]) -> tuple[Value, list[int], list[int]]:
    """One table of `parts` side by side on the last dim, the split sizes that cut it, and
    which split results are the parts. With several, each part's columns are padded to a
    16-byte multiple (unused columns after it), so that every part's view starts 16-byte
    aligned, as codegen/specialize.py assumes of a kernel's pointers."""
    if len(parts) == 1:
        return parts[0], [parts[0].type.shape[-1]], [0]
    per = 16 // torch_dtype(parts[0].type.dtype).itemsize
    cols, sizes, picks = [], [], []
    for p in parts:
        d = p.type.shape[-1]
        pad = -d % per
        picks.append(len(sizes))
        cols.append(p)
        sizes.append(d)
        if pad:
            sizes.append(pad)
            one = g.add_derived_param(g.unique_param_name("positions.table.pad"), "slice", [p],
                                      {"dim": -1, "start": 0, "end": 1})
            zero = g.add_derived_param(g.unique_param_name("positions.table.pad"), "full_like",
                                       [one], {"value": 0})
            cols.append(g.add_derived_param(g.unique_param_name("positions.table.pad"), "expand",
                                            [zero], {"shape": list(p.type.shape[:-1]) + [pad]}))
    whole = g.add_derived_param(g.unique_param_name("positions.table.cat"), "cat", cols,
                                {"dim": -1})
    return whole, sizes, picks


@register_pass("tabulate-positions", stage="fuse", before=("fuse-rope",),
               options=("max_model_len", "block_size"))
def tabulate_positions(g: Graph, ctx: PassContext) -> int:
    pos = next((v for v in g.inputs if v.name == "positions"), None)
    if pos is None:
        return 0
    derived = {pos}
    members: list[Node] = []
    for node in g.nodes:
        if any(v in derived for v in node.operands) and _rowwise(node, derived):
            members.append(node)
            derived.update(node.results)
    inside = set(members)
    frontier = [r for node in members for r in node.results
                if r in g.outputs.values() or any(u not in inside for u in g.users(r))]
    if not frontier:
        return 0
    max_len, block = ctx.option("max_model_len"), ctx.option("block_size", 16)
    if not max_len:
        ctx.refuse("%positions", "tabulate-positions: no max_model_len in the options, so "
                                 "the positions a table must cover are unknown "
                                 "(braze opt: --set max_model_len=N)")
        return 0
    n = -(-int(max_len) // int(block)) * int(block)       # every position a block table holds
    size = n * sum(_rows(v.type) for v in frontier)
    if size > MAX_TABLE_BYTES:
        ctx.refuse("%positions", f"tabulate-positions: tables over {n} positions would take "
                                 f"{size / 2**20:.0f} MiB (more than "
                                 f"{MAX_TABLE_BYTES >> 20} MiB); computed every step instead")
        return 0
    # the same chain on parameters: positions -> arange
    table = {pos: g.add_derived_param(g.unique_param_name("positions.table"), "arange", [],
                                      {"n": n})}
    for node in members:
        srcs = [table.get(v, v) for v in node.operands]
        if len(node.results) == 1:
            r = node.results[0]
            table[r] = g.add_derived_param(g.unique_param_name(f"positions.table.{node.op}"),
                                           node.op, srcs, node.attrs)
        else:              # split: one derived slice per result
            start = 0
            d = norm_dim(node.attrs["dim"], node.operands[0].type.rank, "split")
            for r, size_d in zip(node.results, node.attrs["sizes"]):
                table[r] = g.add_derived_param(
                    g.unique_param_name("positions.table.slice"), "slice", srcs[:1],
                    {"dim": d, "start": start, "end": start + size_d})
                start += size_d
    # one table and one gather per (shape but the last dim, dtype) of the frontier
    groups: dict[tuple, list[Value]] = {}
    for v in frontier:
        key = (v.type.shape[1:-1], v.type.dtype) if v.type.rank >= 2 else (v,)
        groups.setdefault(key, []).append(v)
    first_user = min((g.index(u) for v in frontier for u in g.users(v)), default=None)
    anchor = None if first_user is None else g.nodes[first_user]
    for vs in groups.values():
        whole, sizes, picks = _concat(g, [table[v] for v in vs])
        with g.inserting_before(anchor):
            rows = g.op("index_select", whole, pos, dim=0)
            outs = [rows] if len(sizes) == 1 else g.add_node(
                "split", [rows], {"sizes": sizes, "dim": -1}).results
        for v, k in zip(vs, picks):
            g.replace_all_uses(v, outs[k])
    g.remove_dead()
    return len(members)
