"""shard: rewrite the traced graph into the graph one rank of a tensor-parallel group runs.

Every rank runs this same graph (SPMD) over its own weight shards; what differs per rank
is only data: which rows or columns of each weight it holds (recorded for the compiler
in `ctx.records["shards"]`) and `@tp.vocab_start`, where its slice of the vocabulary
begins. Megatron's layout, found from the graph's structure, not from names:

- column-parallel: the projections feeding attention (q, k, v: heads split), the GEMMs
  whose results meet only through pointwise ops before one more GEMM (gate and up,
  the experts' gate and up: intermediate split), and the LM head (vocabulary split);
- row-parallel: a GEMM whose input is split along what it contracts (o, down, the
  experts' down) computes a partial sum; an `all_reduce` follows where the sum is
  needed (after the MoE combine, which is linear, rather than on every expert's row);
- the embedding is vocab-parallel: `embedding_shard` looks up the ids in this rank's
  slice (zero elsewhere) and an `all_reduce` sums the slices;
- the logits come back whole through an `all_gather` of the vocabulary slices.

A vocabulary that the ranks do not divide (a fine-tune's one added pad token: 32001) is
padded, as vLLM does: each rank holds ceil(vocab / N) rows rounded up to VOCAB_ALIGN, the
last ranks' shards running past the vocabulary into zero rows (the shard spec's `size`
says where the real rows end). Ids are below the vocabulary, so `embedding_shard` never
looks a padding row up; the LM head's padding logits are dropped by the `all_gather`
itself (`size=vocab`), so the graph's `logits` output, and everything that reads it (the
sampler, logprobs, bitmasks, logit_bias, speculative verification), is the true vocab.

With `expert_parallel` (`--expert-parallel`) a mixture of experts is split by whole experts
instead of by their intermediate size: the expert weights along their expert dim (found
from the MoE combine, `einsum(routing [T, E], [T, E, H])`, which contracts it), the routing
weights narrowed to the rank's columns by `index_select(routing, @ep.experts)` (the rank's
expert ids: per-rank data, as `@tp.vocab_start` is), and the combine's partial sum reduced
by the one `all_reduce` TP has there too. The router stays replicated.

KV heads are split when there are at least as many as ranks; with fewer, each rank keeps
the one KV head its query heads read (replicated over tensor-parallel-size / kv_heads
ranks). Any other size that does not split evenly is refused, naming it. The fusion passes run
after this one and see the same patterns at the smaller sizes.

Before (one rank of one, heads 4, kv heads 2, head_dim 16):
    %20: f32[T, 64] = linear(%19, @model.layers.0.self_attn.q_proj.weight)
    %21: f32[T, 4, 16] = reshape(%20) {shape=[-1, 4, 16]}
    ...
    %57: f32[T, 64] = reshape(%56) {shape=[-1, 64]}
    %58: f32[T, 64] = linear(%57, @model.layers.0.self_attn.o_proj.weight)
    %59: f32[T, 64] = add(%0, %58)
After (--tensor-parallel-size 2; q_proj.weight holds 32 of its 64 rows, o_proj 32 of its
64 columns, the caches one of the two KV heads):
    %20: f32[T, 32] = linear(%19, @model.layers.0.self_attn.q_proj.weight)
    %21: f32[T, 2, 16] = reshape(%20) {shape=[-1, 2, 16]}
    ...
    %57: f32[T, 32] = reshape(%56) {shape=[-1, 32]}
    %58: f32[T, 64] = linear(%57, @model.layers.0.self_attn.o_proj.weight)
    %160: f32[T, 64] = all_reduce(%58) {group_size=2}
    %59: f32[T, 64] = add(%0, %160)
"""

from __future__ import annotations

from dataclasses import dataclass

from braze.ir import Graph, Node, Value
from braze.ir.errors import BrazeError
from braze.ir.types import TensorType

from .manager import PassContext, register_pass

VOCAB_START = "tp.vocab_start"
# a padded vocabulary shard is a multiple of this many rows. The LM head is a GEMM
# (torch.mm: cuBLAS on GPUs) with the shard as its N: tensor-core paths want N a multiple
# of 8 (fp16/bf16) or 16 (fp8), and each rank's slice of a gathered logits row then starts
# 32-byte aligned; the Triton kernels mask their tiles, so more (vLLM's 64) buys nothing
# here and costs up to N x 63 dead rows.
VOCAB_ALIGN = 16


@dataclass(frozen=True)
class Split:
    """A value holds `local` of the `full` entries of axis `axis` on each rank: the rank's
    contiguous share (even) or, for replicated KV heads, the one head it keeps."""
    axis: int
    local: int
    full: int
    even: bool = True
    experts: bool = False        # the split axis is the MoE's experts (expert parallelism)

    def at(self, axis: int) -> "Split":
        return Split(axis, self.local, self.full, self.even, self.experts)


PARTIAL = "partial"          # each rank holds a summand; all_reduce gives the value


def _ranges(full: int, n: int) -> list[list[int]]:
    """Each rank's [start, stop) of a dim of `full` entries: equal shares. Where n does not
    divide `full` (only the vocabulary gets here: every other split is checked first) the
    shares are padded to a multiple of VOCAB_ALIGN, the last ones running past `full`."""
    if full % n == 0:
        k = full // n
    else:
        k = -(-full // n)
        k = -(-k // VOCAB_ALIGN) * VOCAB_ALIGN
    return [[r * k, (r + 1) * k] for r in range(n)]


class _Sharder:
    def __init__(self, g: Graph, n: int, expert_parallel: bool = False):
        self.g, self.n = g, n
        self.expert_parallel = expert_parallel
        self.expert_ids: dict[int, Value] = {}   # number of experts -> @ep.experts param
        self.state: dict[Value, object] = {}
        self.shards: dict[str, dict] = {}        # param -> {"dim", "ranges"} (per rank)
        self.reduced: dict[Value, Value] = {}    # a partial value -> its all_reduce
        self.collectives = 0
        self.cache_heads: dict[str, int] = {}    # cache input -> local kv heads
        self.vocab_starts: dict[str, Value] = {}  # str(vocab ranges) -> its start param

    # -- weights ------------------------------------------------------------------------
    def split_param(self, p: Value, dim: int, ranges: list[list[int]], what: str,
                    experts: bool = False) -> Split:
        full = p.type.shape[dim]
        local = ranges[0][1] - ranges[0][0]
        spec = {"dim": dim, "ranges": ranges}
        if ranges[-1][1] > full:
            spec["size"] = full            # rows past it are zero padding
        if experts:
            spec["experts"] = True
        old = self.shards.get(p.name)
        if old is not None and old != spec:
            raise BrazeError(f"@{p.name} would be split two ways ({old} and {spec}); "
                             f"tensor parallelism cannot shard this model")
        self.shards[p.name] = spec
        even = ranges == _ranges(full, self.n)
        s = Split(dim, local, full, even, experts)
        self.state[p] = s
        return s

    def split_vocab(self, p: Value) -> Split:
        """The rows of an embedding table or LM head, padded where N does not divide them."""
        full = p.type.shape[0]
        if not isinstance(full, int):
            raise BrazeError(f"vocab_size ({full}, dim 0 of @{p.name}) is not a fixed size; "
                             f"tensor parallelism cannot split it")
        return self.split_param(p, 0, _ranges(full, self.n), "vocab_size")

    def split_even(self, p: Value, dim: int, what: str, experts: bool = False) -> Split:
        full = p.type.shape[dim]
        if not isinstance(full, int) or full % self.n:
            raise BrazeError(f"{what} ({full}, dim {dim} of @{p.name}) is not divisible by "
                             f"--tensor-parallel-size {self.n}; choose a size that divides it")
        return self.split_param(p, dim, _ranges(full, self.n), what, experts)

    # -- expert parallelism -----------------------------------------------------------------
    def seed_experts(self) -> None:
        """Whole experts per rank: every expert weight of a MoE is split along its experts.
        The MoE's combine `einsum(routing [T, E], per-expert [T, E, H]) -> [T, H]` names the
        expert index (the one it contracts); walking back from its per-expert operand through
        pointwise ops and the expert GEMMs (einsums with a weight) finds each weight's
        expert dim."""
        for node in self.g.nodes:
            if not (node.op == "einsum" and len(node.operands) == 2
                    and node.results[0].type.rank == 2
                    and sorted(v.type.rank for v in node.operands) == [2, 3]):
                continue
            subs, out = _einsum_subs(node)
            k = 0 if node.operands[0].type.rank == 3 else 1
            letters = [c for c in subs[k] if c in subs[1 - k] and c not in out]
            if len(letters) != 1:
                continue
            todo = [(node.operands[k], subs[k].index(letters[0]))]
            seen = set()
            while todo:
                v, axis = todo.pop()
                if v in seen or v.producer is None:
                    continue
                seen.add(v)
                prod = v.producer
                if prod.op == "einsum" and _gemm_weight(prod) is not None:
                    psubs, pout = _einsum_subs(prod)
                    letter = pout[axis]
                    for opnd, sub in zip(prod.operands, psubs):
                        if letter not in sub:
                            continue
                        if opnd.kind == "param":
                            self.split_even(opnd, sub.index(letter), "num_experts",
                                            experts=True)
                        else:
                            todo.append((opnd, sub.index(letter)))
                elif prod.opdef.pointwise:
                    rank = v.type.rank
                    for opnd in prod.operands:
                        a = axis - (rank - opnd.type.rank)
                        if opnd.kind != "param" and a >= 0 and opnd.type.shape[a] != 1:
                            todo.append((opnd, a))

    def local_experts(self, v: Value, axis: int, before: Node, s: Split) -> Value:
        """`v` (whole along the experts, e.g. the routing weights [T, E]) narrowed to this
        rank's experts: index_select by `@ep.experts`, the rank's expert ids (per-rank data,
        so the graph stays the same on every rank)."""
        g = self.g
        ids = self.expert_ids.get(s.full)
        if ids is None:
            name = g.unique_param_name("ep.experts")
            ids = g.add_param(name, TensorType((s.local,), "i64"))
            self.shards[name] = {"values": [list(range(a, b))
                                            for a, b in _ranges(s.full, self.n)]}
            self.expert_ids[s.full] = ids
        with g.inserting_before(before):
            out = g.op("index_select", v, ids, dim=axis)
        self.state[out] = s.at(axis)
        return out

    # -- finding the column-parallel GEMMs ------------------------------------------------
    def producers_back(self, v: Value, through) -> tuple[list[Node], bool]:
        """The GEMM nodes (linear / einsum with a param) reached walking back from `v`
        through nodes `through(node)` accepts; False if anything else is reached."""
        found, ok, seen, todo = [], True, set(), [v]
        while todo:
            x = todo.pop()
            if x in seen or x.kind == "param":
                continue
            seen.add(x)
            node = x.producer
            if node is None:
                ok = False
                continue
            if _gemm_weight(node) is not None:
                if node not in found:
                    found.append(node)
                continue
            if not through(node):
                ok = False
                continue
            todo.extend(node.operands)
        return found, ok

    def seed_attention(self) -> None:
        n = self.n
        for node in self.g.nodes:
            if node.op == "cache_write":
                kvh = node.operands[2].type.shape[2]
                if kvh >= n and kvh % n:
                    raise BrazeError(f"num_key_value_heads ({kvh}) is not divisible by "
                                     f"--tensor-parallel-size {n}")
                if kvh < n and n % kvh:
                    raise BrazeError(f"num_key_value_heads ({kvh}) is fewer than "
                                     f"--tensor-parallel-size {n} and does not divide it, so the "
                                     f"KV heads cannot be replicated evenly")
                for which, cache in ((0, node.operands[2]), (1, node.operands[3])):
                    lin = self._one_gemm(node.operands[which], "keys" if which == 0 else "values")
                    w = lin.operands[1]
                    dv = cache.type.shape[3]
                    if kvh >= n:
                        ranges = _ranges(kvh * dv, n)
                        self.cache_heads[cache.name] = kvh // n
                    else:
                        ranges = [[(r * kvh // n) * dv, (r * kvh // n + 1) * dv] for r in range(n)]
                        self.cache_heads[cache.name] = 1
                    if w.type.shape[0] != kvh * dv:
                        raise BrazeError(f"@{w.name} has {w.type.shape[0]} rows, not "
                                         f"{kvh} kv heads x {dv}; cannot split its heads")
                    self._seed_column(lin, 0, ranges, "num_key_value_heads")
            elif node.op == "paged_attention":
                q = node.operands[0]
                heads = q.type.shape[1]
                if heads % n:
                    raise BrazeError(f"num_attention_heads ({heads}) is not divisible by "
                                     f"--tensor-parallel-size {n}")
                for cache in node.operands[1:3]:
                    # a cache this graph only reads (another graph's: Gemma 4's assistant
                    # reads its target's) holds the heads the target's rank keeps
                    if cache.kind == "input" and cache.name not in self.cache_heads:
                        kvh = cache.type.shape[2]
                        self.cache_heads[cache.name] = kvh // n if kvh >= n else 1
                lin = self._one_gemm(q, "queries")
                self._seed_column(lin, 0, _ranges(lin.operands[1].type.shape[0], n),
                                  "num_attention_heads")

    def _one_gemm(self, v: Value, what: str) -> Node:
        found, _ = self.producers_back(v, lambda node: node.op not in ("paged_attention",))
        if len(found) != 1 or found[0].op != "linear":
            raise BrazeError(f"the attention {what} {v.ref} do not come from one projection "
                             f"(found {[f.results[0].ref for f in found]}); tensor parallelism "
                             f"supports separate q, k and v projections")
        return found[0]

    def _seed_column(self, node: Node, dim: int, ranges, what: str) -> None:
        w = node.operands[1] if node.op == "linear" else _gemm_weight(node)
        full = w.type.shape[dim]
        if ranges == _ranges(full, self.n) and full % self.n:
            raise BrazeError(f"{what} ({full}, dim {dim} of @{w.name}) is not divisible by "
                             f"--tensor-parallel-size {self.n}")
        self.split_param(w, dim, ranges, what)
        if node.op == "linear" and len(node.operands) == 3:
            self.split_param(node.operands[2], 0, ranges, what)

    def seed_mlps(self) -> None:
        """GEMMs that meet only through pointwise ops before one more GEMM: gate and up."""
        for node in self.g.nodes:
            w = _gemm_weight(node)
            if w is None:
                continue
            data = [v for v in node.operands if v.kind != "param"]
            if len(data) != 1:
                continue
            cols, ok = self.producers_back(data[0], lambda m: m.opdef.pointwise)
            if not ok or not cols:
                continue
            for c in cols:
                if c.results[0].type.rank != data[0].type.rank:
                    break
                cw = _gemm_weight(c)
                if c.op == "linear":
                    dim = 0
                else:
                    subs, out = _einsum_subs(c)
                    letter = out[-1]
                    wsub = subs[list(c.operands).index(cw)]
                    if letter not in wsub:
                        break
                    dim = wsub.index(letter)
                if cw.name in self.shards:
                    continue
                what = "intermediate_size" if c.op == "linear" else "moe_intermediate_size"
                self.split_even(cw, dim, what)
                if c.op == "linear" and len(c.operands) == 3:
                    self.split_even(c.operands[2], 0, what)

    def seed_vocab(self) -> None:
        g = self.g
        for node in g.nodes:
            if node.op == "embedding" and node.operands[1].kind == "param":
                self.split_vocab(node.operands[1])
        out = g.outputs.get("logits")
        node = out.producer if out is not None else None
        while node is not None and node.op != "linear" and node.opdef.pointwise:
            data = [v for v in node.operands if v.kind != "param" and v.type.rank == out.type.rank]
            node = data[0].producer if len(data) == 1 else None
        if node is not None and node.op == "linear" and node.operands[1].kind == "param":
            self.split_vocab(node.operands[1])
            if len(node.operands) == 3:
                self.split_vocab(node.operands[2])

    # -- propagating ----------------------------------------------------------------------
    def reduce(self, v: Value) -> Value:
        """The summed value of a partial `v` (one all_reduce, right after its producer)."""
        if v not in self.reduced:
            g = self.g
            i = g.index(v.producer) + 1
            after = g.nodes[i] if i < len(g.nodes) else None
            with g.inserting_before(after):
                red = g.op("all_reduce", v, group_size=self.n)
            self.collectives += 1
            self.reduced[v] = red
        return self.reduced[v]

    def visit(self, node: Node) -> None:
        g = self.g
        states = [self.state.get(v) for v in node.operands]
        if node.op == "embedding" and node.operands[1].name in self.shards:
            ids, w = node.operands
            ranges = self.shards[w.name]["ranges"]
            start = self.vocab_starts.get(str(ranges))
            if start is None:       # one per vocabulary size (Gemma 4's PLE table has its own)
                name = VOCAB_START if not self.vocab_starts else g.unique_param_name(VOCAB_START)
                start = g.add_param(name, TensorType((1,), "i64"))
                self.shards[name] = {"values": [[r[0]] for r in ranges]}
                self.vocab_starts[str(ranges)] = start
            with g.inserting_before(node):
                new = g.op("embedding_shard", ids, w, start)
            g.replace_all_uses(node.results[0], new)
            g.erase_node(node)
            self.state[new] = PARTIAL
            return
        if all(s is None for s in states):
            return
        if PARTIAL in states and not self._partial_safe(node, states):
            node.operands = tuple(self.reduce(v) if s is PARTIAL else v
                                  for v, s in zip(node.operands, states))
            states = [None if s is PARTIAL else s for s in states]
            if all(s is None for s in states):
                return
        rule = _RULES.get(node.op)
        if rule is None:
            if node.opdef.pointwise:
                rule = _pointwise
            elif node.opdef.reduction:
                rule = _reduction
            else:
                raise BrazeError(f"tensor parallelism cannot shard through {node.op} "
                                 f"({_where(node)}): its operand is split across ranks")
        out = rule(self, node, states)
        for r, s in zip(node.results, out if isinstance(out, list) else [out] * len(node.results)):
            if s is not None:
                self.state[r] = s

    def _partial_safe(self, node: Node, states) -> bool:
        """A sum over ranks passes through ops linear in that operand (the MoE combine)."""
        if node.op not in ("einsum", "reshape"):
            return False
        parts = [s for s in states if s is PARTIAL]
        return len(parts) == 1 and all(s is None or s is PARTIAL for s in states)

    def finish(self) -> None:
        g = self.g
        for name, v in list(g.outputs.items()):
            s = self.state.get(v)
            if s is PARTIAL:
                g.outputs[name] = self.reduce(v)
            elif isinstance(s, Split):
                if s.axis != v.type.rank - 1 or not s.even:
                    raise BrazeError(f"output {name} is split across ranks along dim {s.axis}; "
                                     f"only a last-dim split can be gathered")
                # a padded vocabulary: the gather keeps the real entries only
                size = {"size": s.full} if s.local * self.n != s.full else {}
                with g.inserting_before(None):
                    g.outputs[name] = g.op("all_gather", v, group_size=self.n, **size)
                self.collectives += 1
        # sizes: params and caches now, then every result again in schedule order
        for name, spec in self.shards.items():
            if "ranges" not in spec:          # per-rank values (@ep.experts), not a split
                continue
            p = g.params[name]
            r0 = spec["ranges"][0]
            p.type = p.type.with_shape(tuple(r0[1] - r0[0] if i == spec["dim"] else d
                                             for i, d in enumerate(p.type.shape)))
        for v in g.inputs:
            if v.name in self.cache_heads:
                sh = list(v.type.shape)
                sh[2] = self.cache_heads[v.name]
                v.type = v.type.with_shape(sh)
        for node in g.nodes:
            types = node.opdef.infer([v.type for v in node.operands], node.attrs)
            for r, t in zip(node.results, types):
                r.type = t


def _gemm_weight(node: Node) -> Value | None:
    if node.op == "linear" and node.operands[1].kind == "param":
        return node.operands[1]
    if node.op == "einsum" and len(node.operands) == 2:
        params = [v for v in node.operands if v.kind == "param"]
        if len(params) == 1:
            return params[0]
    return None


def _einsum_subs(node: Node) -> tuple[list[str], str]:
    lhs, out = node.attrs["equation"].replace(" ", "").split("->")
    return lhs.split(","), out


def _where(node: Node) -> str:
    return ", ".join(r.ref for r in node.results) or node.op


# -- rules: the split of a node's results from its operands' ------------------------------

def _linear(sh: _Sharder, node: Node, states):
    x, w = node.operands[0], node.operands[1]
    sx, sw = states[0], states[1]
    rank = node.results[0].type.rank
    if sx is None and isinstance(sw, Split) and sw.axis == 0:
        return Split(rank - 1, sw.local, sw.full, sw.even)
    if isinstance(sx, Split) and sx.axis == x.type.rank - 1 and sw is None and w.kind == "param":
        if not sx.even:
            raise BrazeError(f"{_where(node)}: a row-parallel projection needs an even split")
        if w.type.shape[1] != sx.full:
            raise BrazeError(f"@{w.name} does not match its split input {x.ref}")
        sh.split_param(w, 1, _ranges(sx.full, sh.n), "row-parallel input")
        if len(node.operands) == 3:
            _bias_after_sum(sh, node)
        return PARTIAL
    raise BrazeError(f"tensor parallelism cannot shard linear {_where(node)} "
                     f"(input {sx}, weight {sw})")


def _bias_after_sum(sh: _Sharder, node: Node) -> None:
    """A row-parallel linear's bias is added once, to the sum of the ranks' partial
    products: the linear loses it, and its readers get all_reduce(partial) + bias."""
    g = sh.g
    x, w, b = node.operands
    node.operands = (x, w)
    out = node.results[0]
    red = sh.reduce(out)
    i = g.index(red.producer) + 1
    with g.inserting_before(g.nodes[i] if i < len(g.nodes) else None):
        added = g.op("add", red, b)
    g.replace_all_uses(out, added)
    red.producer.operands = (out,)


def _einsum(sh: _Sharder, node: Node, states):
    subs, out = _einsum_subs(node)
    if any(s is PARTIAL for s in states):
        return PARTIAL                      # _partial_safe: one summand, the rest replicated
    letters = {}
    for sub, s in zip(subs, states):
        if isinstance(s, Split):
            letters[sub[s.axis]] = s
    if len(letters) != 1:
        raise BrazeError(f"einsum {_where(node)}: operands split along several indices {letters}")
    (letter, s), = letters.items()
    for i, (v, sub, st) in enumerate(zip(node.operands, subs, states)):
        if st is None and letter in sub and v.type.shape[sub.index(letter)] != 1:
            if v.kind != "param" and s.experts:     # the routing weights: this rank's columns
                local = sh.local_experts(v, sub.index(letter), node, s)
                node.operands = node.operands[:i] + (local,) + node.operands[i + 1:]
                continue
            if v.kind != "param":
                raise BrazeError(f"einsum {_where(node)}: {v.ref} is whole along the split "
                                 f"index {letter!r}")
            sh.split_param(v, sub.index(letter), _ranges(s.full, sh.n), "row-parallel input")
    if letter in out:
        return s.at(out.index(letter))
    return PARTIAL


def _pointwise(sh: _Sharder, node: Node, states):
    rank = node.results[0].type.rank
    split = None
    for v, s in zip(node.operands, states):
        if isinstance(s, Split):
            t = s.at(s.axis + rank - v.type.rank)
            if split is not None and split != t:
                raise BrazeError(f"{node.op} {_where(node)}: operands split differently")
            split = t
    for v, s in zip(node.operands, states):
        if s is None:
            k = split.axis - (rank - v.type.rank)
            if k >= 0 and v.type.shape[k] != 1:
                if v.kind == "param" and split.even:
                    sh.split_param(v, k, _ranges(split.full, sh.n), "pointwise operand")
                else:
                    raise BrazeError(f"{node.op} {_where(node)}: {v.ref} is whole along the "
                                     f"dim its other operand splits across ranks")
    return split


def _reduction(sh: _Sharder, node: Node, states):
    (s,) = [st for st in states if st is not None]
    x = node.operands[0]
    if "dims" in node.attrs:
        dims = [d % x.type.rank for d in node.attrs["dims"]]
        if s.axis in dims:
            raise BrazeError(f"{node.op} {_where(node)} reduces over the dim split across ranks")
        if node.attrs.get("keepdim"):
            return s
        return s.at(s.axis - sum(d < s.axis for d in dims))
    if node.attrs["dim"] % x.type.rank == s.axis:
        raise BrazeError(f"{node.op} {_where(node)} works along the dim split across ranks")
    return s


def _reshape(sh: _Sharder, node: Node, states):
    (s,) = states
    x, y = node.operands[0], node.results[0]
    ins, outs = list(x.type.shape), list(y.type.shape)
    tail = 1
    for d in ins[s.axis:]:
        tail *= d
    # the output dims whose trailing product is the split dim's: the split lands on the
    # outermost of them that takes it whole-number (so [T, 32] -> [T, 1, 32] keeps one
    # replicated KV head split by head, not inside it)
    acc, fits = 1, []
    for b in range(len(outs) - 1, -1, -1):
        if not isinstance(outs[b], int):
            break
        acc *= outs[b]
        if acc == tail and (outs[b] * s.local) % s.full == 0:
            fits.append(b)
        elif acc > tail:
            break
    if not fits:
        raise BrazeError(f"reshape {_where(node)} mixes the dim split across ranks with others")
    b = fits[-1]
    shape = list(node.attrs["shape"])
    if shape[b] != -1:
        shape[b] = outs[b] * s.local // s.full
    node.attrs = {**node.attrs, "shape": shape}
    return Split(b, outs[b] * s.local // s.full, outs[b], s.even)


def _unsqueeze(sh, node, states):
    (s,) = states
    d = node.attrs["dim"] % node.results[0].type.rank
    return s.at(s.axis + (d <= s.axis))


def _on_other_dim(sh, node, states):
    s = next(st for st in states if st is not None)
    x = node.operands[0]
    d = node.attrs["dim"] % x.type.rank
    if d == s.axis or any(st != s for st in states):
        raise BrazeError(f"{node.op} {_where(node)} works along the dim split across ranks")
    if node.op == "select":
        return s.at(s.axis - (d < s.axis))
    return s


def _paged_attention(sh, node, states):
    s = states[0]
    if not isinstance(s, Split) or s.axis != 1:
        raise BrazeError(f"paged_attention {_where(node)}: queries must be split by head")
    return s


def _cache_write(sh, node, states):
    for v, s in zip(node.operands[:2], states[:2]):
        if not isinstance(s, Split) or s.axis != 1:
            raise BrazeError(f"cache_write: {v.ref} must be split by head")
    return None


_RULES = {"linear": _linear, "einsum": _einsum, "reshape": _reshape, "unsqueeze": _unsqueeze,
          "slice": _on_other_dim, "cat": _on_other_dim, "select": _on_other_dim,
          "paged_attention": _paged_attention, "cache_write": _cache_write}


@register_pass("shard", stage="simplify", level=None,
               options=("tensor_parallel_size", "expert_parallel"))
def shard(g: Graph, ctx: PassContext) -> int:
    """The graph of one tensor-parallel rank: weights split, collectives inserted."""
    n = int(ctx.option("tensor_parallel_size", 1))
    ep = bool(ctx.option("expert_parallel", False))
    if ep and n == 1:
        raise BrazeError("--expert-parallel needs --tensor-parallel-size > 1: the experts are "
                         "placed on the ranks of the tensor-parallel group")
    if n == 1 or g.meta.get("tensor_parallel_size"):
        return 0
    if any(node.op == "lora" for node in g.nodes):
        raise BrazeError("shard: the graph already has LoRA deltas (add-lora ran before it); "
                         "run add-lora after shard, as braze compile does, so the adapter "
                         "pools take each rank's sizes")
    sh = _Sharder(g, n, ep)
    if ep:
        sh.seed_experts()
        if not any(spec.get("experts") for spec in sh.shards.values()):
            raise BrazeError("--expert-parallel: the model has no mixture-of-experts layer "
                             "(no experts to place on ranks); drop the flag")
    sh.seed_attention()
    sh.seed_mlps()
    sh.seed_vocab()
    for node in list(g.nodes):
        if g.contains(node):
            sh.visit(node)
    sh.finish()
    g.meta["tensor_parallel_size"] = n
    if ep:
        g.meta["expert_parallel"] = True
    ctx.records["shards"] = sh.shards
    return sh.collectives + len(sh.shards)


def rank_loader(load, shards: dict, rank: int, load_part=None):
    """`load(name)` of the whole weight -> the same for rank `rank`'s shard of it.
    `load_part(name, dim, start, stop)`, where given, reads only the shard (a rank's
    experts of per-expert checkpoint tensors), rather than the whole weight. A padded
    shard (spec `size`: a vocabulary N does not divide) is its real rows then zeros."""
    import torch

    def get(name: str):
        spec = shards.get(name)
        if spec is None:
            return load(name)
        if "values" in spec:
            return torch.tensor(spec["values"][rank], dtype=torch.int64)
        a, b = spec["ranges"][rank]
        dim = spec["dim"]
        stop = min(b, spec.get("size", b))
        if load_part is not None and stop > a:
            part = load_part(name, dim, a, stop)
        else:
            part = load(name).narrow(dim, min(a, stop), max(stop - a, 0))
        if stop >= b:
            return part.contiguous()
        shape = list(part.shape)
        shape[dim] = b - a
        out = part.new_zeros(shape)          # the shard's size only, padding rows zero
        out.narrow(dim, 0, part.shape[dim]).copy_(part)
        return out
    return get


def parallel_manifest(g: Graph, shards: dict, n: int, expert_parallel: bool = False) -> dict:
    """The manifest's `parallel` entry: the group size, how each shipped weight is split
    (params the fusions derived from split ones, e.g. merged QKV, say which), and every
    collective in the final graph; with expert parallelism, which experts each rank holds."""
    collectives = [{"node": i, "op": node.op, "result": node.results[0].ref,
                    "type": str(node.results[0].type)}
                   for i, node in enumerate(g.nodes) if node.op in ("all_reduce", "all_gather")]
    out = {"tensor_parallel_size": n, "expert_parallel": bool(expert_parallel),
           "shards": shards, "collectives": collectives}
    if expert_parallel:
        ranges = next((spec["ranges"] for spec in shards.values() if spec.get("experts")), None)
        if ranges is not None:
            out["experts"] = {"num_experts": ranges[-1][1], "ranges": ranges}
    return out
