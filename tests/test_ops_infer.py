"""Shape/dtype inference agrees with the reference implementation, op by op.

For every op in the registry, hypothesis draws a concrete token count T (1..9)
and the other sizes, builds a small graph whose inputs have the symbolic dim T,
runs it with the reference interpreter (`check_types=True`) and compares every
result's actual shape and dtype with its inferred type evaluated at that T.

`paged_attention` and `cache_write` get their own test against a dense causal
attention written directly in torch. The last test checks every registered op
is covered here, so a new op cannot go untested.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braze.ir import (MB, NB, BrazeError, Graph, S, T, TensorType, all_ops, run_graph,
                      verify)
from braze.ir.types import torch_dtype

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                       HealthCheck.data_too_large])


# -- the harness ---------------------------------------------------------------------

class Case:
    """A small graph under construction plus the concrete tensors to run it on."""

    def __init__(self, draw):
        self.draw = draw
        self.t = draw(st.integers(1, 9), label="T")
        self.bind = {"T": self.t, "S": draw(st.integers(1, 3), label="S"), "NB": 5, "MB": 3}
        self.g = Graph("case")
        self.inputs: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16), label="seed"))
        self.after = None          # an extra check on the outputs, set by a case

    # drawing helpers
    def int(self, lo, hi):
        return self.draw(st.integers(lo, hi))

    def pick(self, options):
        return self.draw(st.sampled_from(list(options)))

    def flag(self):
        return self.draw(st.booleans())

    def tensor(self, shape, dtype, low=-3, high=4):
        td = torch_dtype(dtype)
        if td == torch.bool:
            return torch.rand(shape, generator=self.gen) < 0.5
        if td.is_floating_point:
            return torch.randn(shape, generator=self.gen).to(td)
        return torch.randint(low, high, shape, generator=self.gen).to(td)

    def input(self, shape, dtype, low=-3, high=4, tensor=None):
        ty = TensorType(tuple(shape), dtype)
        v = self.g.add_input(f"x{len(self.inputs)}", ty)
        self.inputs[v.name] = (tensor if tensor is not None
                               else self.tensor(ty.concrete_shape(self.bind), dtype, low, high))
        return v

    def param(self, shape, dtype):
        ty = TensorType(tuple(shape), dtype)
        v = self.g.add_param(f"w{len(self.params)}", ty)
        self.params[v.name] = self.tensor(ty.concrete_shape(self.bind), dtype)
        return v

    def run(self):
        """Verify, run with type checks, and compare every result with its inferred type."""
        g = self.g
        verify(g)
        for node in g.nodes:
            for r in node.results:
                g.set_output(f"r{r.name}", r)
        out = run_graph(g, self.inputs, self.params, check_types=True)
        if self.after is not None:
            self.after(out)
        for k, v in g.outputs.items():
            t = out[k]
            want = v.type.concrete_shape(self.bind)
            assert tuple(t.shape) == want, f"{k} = {g.outputs[k].producer}: ran {tuple(t.shape)}, " \
                                           f"inferred {v.type} -> {want} at {self.bind}"
            assert t.dtype == torch_dtype(v.type.dtype), f"{k}: ran {t.dtype}, inferred {v.type}"
        return out


def tshape(c: Case, rank: int, n_max: int = 4) -> tuple:
    """A shape of `rank` >= 1 with T at a random position and small ints elsewhere."""
    dims = [c.int(1, n_max) for _ in range(rank)]
    dims[c.int(0, rank - 1)] = c.pick([T, T, T + 1]) if rank else None
    return tuple(dims)


CASES: dict[str, callable] = {}


def case(*ops):
    def deco(fn):
        for op in ops:
            assert op not in CASES, op
            CASES[op] = fn
        return fn
    return deco


# -- pointwise -------------------------------------------------------------------------

UNARY = ["neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "silu", "relu",
         "abs", "reciprocal", "logical_not", "gelu"]


@case(*UNARY)
def _unary(c: Case, op):
    dtypes = {"silu": ["f32", "f16"], "gelu": ["f32", "f16"],
              "logical_not": ["f32", "i64", "bool", "f16"]}.get(op, ["f32", "f16", "i64"])
    rank = c.int(0, 3)
    x = c.input(tshape(c, rank) if rank else (), c.pick(dtypes), low=1, high=5)
    attrs = {"approximate": c.pick(["none", "tanh"])} if op == "gelu" else {}
    c.g.op(op, x, **attrs)


BINARY_DTYPES = {
    "add": ["f32", "f16", "i64", "bool"], "mul": ["f32", "f16", "i64", "bool"],
    "maximum": ["f32", "f16", "i64", "bool"], "minimum": ["f32", "f16", "i64", "bool"],
    "sub": ["f32", "f16", "i64"], "div": ["f32", "f16", "i64"], "pow": ["f32", "f16", "i64"],
    "eq": ["f32", "f16", "i64", "bool"], "ne": ["f32", "f16", "i64", "bool"],
    "lt": ["f32", "f16", "i64"], "le": ["f32", "f16", "i64"], "gt": ["f32", "f16", "i64"],
    "ge": ["f32", "f16", "i64"], "logical_and": ["f32", "i64", "bool"],
    "logical_or": ["f32", "i64", "bool"],
}
# ops whose torch function takes a Python number on either side
SCALAR_OK = {"add", "sub", "mul", "div", "pow", "eq", "ne", "lt", "le", "gt", "ge"}
COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}


@case(*BINARY_DTYPES)
def _binary(c: Case, op):
    dtypes = BINARY_DTYPES[op]
    n = c.int(1, 4)
    a = c.input((T, n), c.pick(dtypes), low=0, high=4)
    if op in SCALAR_OK and c.flag():
        scalars = [0.5, 2, 3, 1.5, 1e-06, -0.0, True] if op != "sub" else [0.5, 2, -1.5, -0.0]
        if op == "pow":
            scalars = [0.5, 2, 3, 1.5]
        # comparisons with the scalar first are mirrored (lt(s, x) == gt(x, s))
        first = c.flag() if op not in COMPARE else False
        c.g.op(op, a, scalar=c.pick(scalars), scalar_first=first)
        return
    bshape = c.pick([(T, n), (1, n), (n,), (), (T, 1), (2, T, n)])
    b = c.input(bshape, c.pick(dtypes), low=0, high=4)
    if c.flag():
        a, b = b, a
    c.g.op(op, a, b)


@case("cast")
def _cast(c: Case, op):
    x = c.input(tshape(c, c.int(1, 3)), c.pick(["f32", "f16", "i64", "bool", "i32"]))
    c.g.op("cast", x, dtype=c.pick(["f32", "f16", "bf16", "f64", "i64", "i32", "i8", "u8", "bool"]))


@case("where")
def _where(c: Case, op):
    n = c.int(1, 4)
    cond = c.input(c.pick([(T, n), (T, 1), (n,), (1, n)]), "bool")
    a = c.input(c.pick([(T, n), (1, n), (n,)]), c.pick(["f32", "f16", "i64"]))
    b = c.input(c.pick([(T, n), (T, 1), (n,)]), c.pick(["f32", "f16", "i64"]))
    c.g.op("where", cond, a, b)


# -- reductions --------------------------------------------------------------------------

def _dims(c: Case, rank):
    dims = c.draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    return [d - rank if c.flag() else d for d in dims]


@case("sum", "mean", "amax")
def _reduce(c: Case, op):
    dtypes = {"sum": ["f32", "f16", "i64", "bool"], "mean": ["f32", "f16"],
              "amax": ["f32", "f16", "i64"]}[op]
    rank = c.int(1, 3)
    x = c.input(tshape(c, rank), c.pick(dtypes))
    c.g.op(op, x, dims=_dims(c, rank), keepdim=c.flag())


@case("argmax")
def _argmax(c: Case, op):
    rank = c.int(1, 3)
    x = c.input(tshape(c, rank), c.pick(["f32", "f16", "i64"]))
    c.g.op("argmax", x, dim=c.int(-rank, rank - 1), keepdim=c.flag())


@case("softmax")
def _softmax(c: Case, op):
    rank = c.int(1, 3)
    x = c.input(tshape(c, rank), c.pick(["f32", "f16"]))
    c.g.op("softmax", x, dim=c.int(-rank, rank - 1), dtype=c.pick([None, "f32", "f16"]))


@case("topk")
def _topk(c: Case, op):
    n = c.int(1, 5)
    x = c.input((T, n), c.pick(["f32", "f16", "i64"]))
    if c.flag():
        attrs = {"k": c.int(1, n), "dim": c.pick([1, -1])}
    else:
        attrs = {"k": 1, "dim": c.pick([0, -2])}         # k <= T for every T
    c.g.add_node("topk", [x], {**attrs, "largest": c.flag(), "sorted": c.flag()})


# -- shape ops -----------------------------------------------------------------------------

@case("reshape")
def _reshape(c: Case, op):
    a, b = c.int(1, 4), c.int(1, 4)
    dtype = c.pick(["f32", "f16", "i64"])
    if c.flag():
        x = c.input((T, a, b), dtype)
        shape = c.pick([[-1], [-1, b], [-1, a * b], [-1, a, b], [-1, 1, a * b], [-1, a, 1, b]])
    else:
        x = c.input((a, T, b), dtype)
        shape = c.pick([[a, -1], [a, -1, b], [-1, b], [a * b, -1] if a * b > 0 else [-1]])
    c.g.op("reshape", x, shape=shape)


@case("permute")
def _permute(c: Case, op):
    rank = c.int(1, 4)
    x = c.input(tshape(c, rank, 3), c.pick(["f32", "i64"]))
    perm = c.draw(st.permutations(list(range(rank))))
    c.g.op("permute", x, dims=[d - rank if c.flag() else d for d in perm])


@case("unsqueeze")
def _unsqueeze(c: Case, op):
    rank = c.int(1, 3)
    x = c.input(tshape(c, rank), c.pick(["f32", "f16", "i64"]))
    c.g.op("unsqueeze", x, dim=c.int(-rank - 1, rank))


@case("squeeze")
def _squeeze(c: Case, op):
    n = c.int(1, 3)
    x = c.input((T, 1, n), c.pick(["f32", "i64"]))
    c.g.op("squeeze", x, dim=c.pick([1, -2, 2, -1]))   # not the T dim: squeezing a symbolic dim is refused


@case("expand")
def _expand(c: Case, op):
    n, k = c.int(1, 3), c.int(1, 3)
    x = c.input((T, 1, n), c.pick(["f32", "f16", "i64"]))
    shape = c.pick([[-1, k, -1], [-1, k, n], [c.int(1, 2), -1, k, -1], [-1, 1, -1]])
    c.g.op("expand", x, shape=shape)


@case("slice")
def _slice(c: Case, op):
    n = c.int(1, 6)
    x = c.input((T, n), c.pick(["f32", "f16", "i64"]))
    step = c.int(1, 3)
    if c.flag():
        start = c.draw(st.none() | st.integers(-7, 7))
        end = c.draw(st.none() | st.integers(-7, 7))
        c.g.op("slice", x, dim=c.pick([1, -1]), start=start, end=end, step=step)
    else:  # the symbolic dim: start <= 1 <= T keeps the length non-negative for every T
        c.g.op("slice", x, dim=c.pick([0, -2]), start=c.pick([None, 0, 1]), step=step)


@case("select")
def _select(c: Case, op):
    n, m = c.int(1, 4), c.int(1, 4)
    x = c.input((T, n, m), c.pick(["f32", "i64"]))
    choice = c.int(0, 2)
    if choice == 0:
        c.g.op("select", x, dim=0, index=c.pick([0, -1]))
    else:
        size = (n, m)[choice - 1]
        c.g.op("select", x, dim=c.pick([choice, choice - 3]), index=c.int(-size, size - 1))


@case("cat")
def _cat(c: Case, op):
    n = c.int(1, 4)
    dtype = c.pick(["f32", "f16", "i64"])
    if c.flag():  # along the symbolic dim: T + (T + 1) + 3 ...
        shapes = [c.pick([(T, n), (T + 1, n), (3, n), (2 * T, n)]) for _ in range(c.int(1, 3))]
        dim = c.pick([0, -2])
    else:
        shapes = [(T, c.int(1, 4)) for _ in range(c.int(1, 3))]
        dim = c.pick([1, -1])
    xs = [c.input(s, dtype) for s in shapes]
    c.g.op("cat", *xs, dim=dim)


@case("split")
def _split(c: Case, op):
    n = c.int(1, 6)
    x = c.input((T, n, 2), c.pick(["f32", "i64"]))
    cuts = sorted(c.draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    c.g.add_node("split", [x], {"sizes": sizes, "dim": c.pick([1, -2])})


@case("index_select")
def _index_select(c: Case, op):
    n, d = c.int(1, 5), c.int(1, 3)
    idt = c.pick(["i64", "i32"])
    if c.flag():
        x = c.input((T, n), c.pick(["f32", "f16"]))
        idx = c.input((c.int(1, 6),), idt, low=0, high=n)
        c.g.op("index_select", x, idx, dim=c.pick([1, -1]))
    else:  # a symbolic number of rows gathered from a fixed table
        x = c.input((n, d), "f32")
        idx = c.input((T,), idt, low=0, high=n)
        c.g.op("index_select", x, idx, dim=0)


@case("gather")
def _gather(c: Case, op):
    n, m = c.int(1, 5), c.int(1, 4)
    x = c.input((T, n), c.pick(["f32", "f16", "i64"]))
    idx = c.input((T, m), "i64", low=0, high=n)
    c.g.op("gather", x, idx, dim=c.pick([1, -1]))


@case("scatter")
def _scatter(c: Case, op):
    n = c.int(1, 5)
    m = c.int(1, n)
    x = c.input((T, n), c.pick(["f32", "f16"]))
    perm = torch.stack([torch.randperm(n, generator=c.gen)[:m] for _ in range(c.t)])
    idx = c.input((T, m), "i64", tensor=perm)
    src = c.input((T, m), c.pick(["f32", "f16", "i64"]))
    c.g.op("scatter", x, idx, src, dim=1)


@case("full_like")
def _full_like(c: Case, op):
    x = c.input(tshape(c, c.int(1, 3)), c.pick(["f32", "f16", "i64", "bool"]))
    c.g.op("full_like", x, value=c.pick([0, 1, -2, 0.5, float("-inf")] if x.type.dtype[0] == "f"
                                        else [0, 1, 3]))


# -- linear algebra -------------------------------------------------------------------------

@case("linear")
def _linear(c: Case, op):
    i, o = c.int(1, 5), c.int(1, 5)
    dtype = c.pick(["f32", "f16"])
    x = c.input(c.pick([(T, i), (2, T, i), (T, 1, i)]), dtype)
    w = c.param((o, i), dtype)
    operands = [x, w] + ([c.param((o,), dtype)] if c.flag() else [])
    c.g.op("linear", *operands)


@case("linear_glu")
def _linear_glu(c: Case, op):
    i, half = c.int(1, 5), c.int(1, 4)
    dtype = c.pick(["f32", "f16"])
    x = c.input(c.pick([(T, i), (2, T, i), (T, 1, i)]), dtype)
    w = c.param((2 * half, i), dtype)
    operands = [x, w] + ([c.param((2 * half,), dtype)] if c.flag() else [])
    c.g.add_node("linear_glu", operands, {"act": c.pick(["silu", "gelu_tanh", "gelu"])})


@case("matmul")
def _matmul(c: Case, op):
    k, m = c.int(1, 4), c.int(1, 4)
    dtype = c.pick(["f32", "f16"])
    a = c.input(c.pick([(T, k), (2, T, k), (1, T, k)]), dtype)
    b = c.input(c.pick([(k, m), (2, k, m), (1, k, m)]), dtype)
    c.g.op("matmul", a, b)


@case("einsum")
def _einsum(c: Case, op):
    h, d = c.int(1, 3), c.int(1, 4)
    dtype = c.pick(["f32", "f16"])
    kind = c.int(0, 4)
    if kind == 0:
        x, y = c.input((T, d), dtype), c.input((d, h), dtype)
        c.g.op("einsum", x, y, equation="td,dh->th")
    elif kind == 1:
        q, k = c.input((T, h, d), dtype), c.input((T, h, d), dtype)
        c.g.op("einsum", q, k, equation="qhd,khd->hqk")
    elif kind == 2:
        x = c.input((T, h, d), dtype)
        c.g.op("einsum", x, equation=c.pick(["thd->dht", "thd -> th", "thd->"]))
    elif kind == 3:
        x, y = c.input((T,), dtype), c.input((d,), dtype)
        c.g.op("einsum", x, y, equation="i,j->ij")
    else:  # a size-1 operand dim broadcasts against T
        x, y = c.input((T, d), dtype), c.input((1, d), dtype)
        c.g.op("einsum", x, y, equation="td,td->td")


@case("embedding")
def _embedding(c: Case, op):
    v, d = c.int(1, 6), c.int(1, 4)
    ids = c.input(c.pick([(T,), (2, T)]), c.pick(["i64", "i32"]), low=0, high=v)
    w = c.param((v, d), c.pick(["f32", "f16"]))
    c.g.op("embedding", ids, w)


@case("embedding_shard")
def _embedding_shard(c: Case, op):
    v, d = c.int(1, 6), c.int(1, 4)
    start = c.int(0, 6)
    ids = c.input(c.pick([(T,), (2, T)]), c.pick(["i64", "i32"]), low=0, high=start + v + 2)
    w = c.param((v, d), c.pick(["f32", "f16"]))
    s = c.input((1,), "i64", tensor=torch.tensor([start]))
    c.g.op("embedding_shard", ids, w, s)


@case("all_reduce", "all_gather")
def _collective(c: Case, op):
    # one rank (no process group): the identity and a copy; tests/test_tensor_parallel.py
    # runs them over gloo process groups of 2 and 4 ranks
    x = c.input(tshape(c, c.int(1, 3)), c.pick(["f32", "f16"]))
    last = x.type.shape[-1]
    # all_gather's `size` keeps a padded vocabulary's real entries
    size = {"size": c.int(1, last)} if op == "all_gather" and isinstance(last, int) \
        and c.flag() else {}
    c.g.op(op, x, group_size=1, **size)


@case("fused_moe")
def _fused_moe(c: Case, op):
    e, h, i = c.int(1, 4), c.int(1, 4), c.int(1, 3)
    dtype = c.pick(["f32", "f16"])
    x = c.input((T, h), dtype)
    router, gate_up, down = c.param((e, h), dtype), c.param((e, 2 * i, h), dtype), \
        c.param((e, h, i), dtype)
    c.g.op("fused_moe", x, router, gate_up, down, top_k=c.int(1, e), renormalize=c.flag(),
           act=c.pick(["silu", "relu", "gelu", "gelu_tanh"]))


@case("grouped_topk")
def _grouped_topk(c: Case, op):
    n_group, per = c.int(1, 4), c.int(2, 4)
    topk_group = c.int(1, n_group)
    logits = c.input((T, n_group * per), "f32")
    bias = c.param((n_group * per,), "f32")
    c.g.add_node("grouped_topk", [logits, bias], dict(
        n_group=n_group, topk_group=topk_group, top_k=c.int(1, topk_group * per),
        renormalize=c.flag(), scale=c.pick([1.0, 2.5])))


def test_grouped_topk_rejects_impossible_groupings():
    g = Graph()
    logits = g.add_input("logits", TensorType((T, 8), "f32"))
    bias = g.add_param("bias", TensorType((8,), "f32"))
    ok = dict(n_group=4, topk_group=2, top_k=2, renormalize=True, scale=1.0)
    w, ids = g.add_node("grouped_topk", [logits, bias], ok).results
    assert (w.type, ids.type) == (TensorType((T, 2), "f32"), TensorType((T, 2), "i64"))
    for bad, msg in [(dict(n_group=3), "does not divide"), (dict(n_group=8), "needs 2 or more"),
                     (dict(topk_group=5), "more than n_group"),
                     (dict(top_k=5), "top_k=5 is more than the 4 experts")]:
        with pytest.raises(BrazeError, match=msg):
            g.add_node("grouped_topk", [logits, bias], {**ok, **bad})
    half = g.add_input("half", TensorType((T, 8), "f16"))
    with pytest.raises(BrazeError, match="logits must be f32"):
        g.add_node("grouped_topk", [half, bias], ok)


@case("lora")
def _lora(c: Case, op):
    k, h, r = c.int(1, 3), c.int(1, 4), c.int(1, 3)
    sizes = [c.int(1, 3) for _ in range(c.int(1, 3))]
    dtype = c.pick(["f32", "f16"])
    x = c.input((T, h), dtype)
    a, b = c.param((k, len(sizes) * r, h), dtype), c.param((k, sum(sizes), r), dtype)
    slots = c.input((T,), c.pick(["i32", "i64"]), low=-1, high=k)   # -1: no adapter
    c.g.op("lora", x, a, b, slots, sizes=sizes)


# -- fused norm / rope ---------------------------------------------------------------------------

FLOATS = ["f32", "f16", "bf16"]


def _norm_rows(c: Case, shape):
    """[] or, for a 2-D input, maybe a `rows` index of its rows (prune-logits' gather)."""
    if len(shape) == 2 and c.flag():
        return [c.input((c.int(1, 6),), c.pick(["i64", "i32"]), low=0, high=1)]
    return []


@case("rms_norm")
def _rms_norm(c: Case, op):
    n = c.int(1, 5)
    shape = c.pick([(T, n), (T, 2, n)])
    x = c.input(shape, c.pick(FLOATS))
    c.g.op("rms_norm", x, c.param((n,), c.pick(FLOATS)), *_norm_rows(c, shape),
           eps=c.pick([1e-06, 1e-5, 0]))


@case("add_rms_norm")
def _add_rms_norm(c: Case, op):
    n = c.int(1, 5)
    shape = c.pick([(T, n), (T, 2, n)])
    a, b = c.input(shape, c.pick(FLOATS)), c.input(shape, c.pick(FLOATS))
    c.g.add_node("add_rms_norm", [a, b, c.param((n,), c.pick(FLOATS))] + _norm_rows(c, shape),
                 {"eps": 1e-06})


@case("arange")
def _arange(c: Case, op):
    c.g.op("arange", n=c.int(1, 9))


def _rope_operands(c: Case, heads: int, with_weights: int):
    d = 2 * c.int(1, 3)
    dtype = c.pick(FLOATS)
    xs = [c.input((T, c.int(1, 3), d), dtype) for _ in range(heads)]
    cs = c.pick(FLOATS)
    cos, sin = c.input((T, 1, d), cs), c.input((T, 1, d), cs)
    ws = [c.param((d,), c.pick(FLOATS)) for _ in range(with_weights)] if c.flag() else []
    attrs = {"style": c.pick(["neox", "gptj"])}
    if ws:
        attrs["eps"] = c.pick([1e-06, 1e-5])
    return xs, cos, sin, ws, attrs, d


@case("rope")
def _rope(c: Case, op):
    (q, k), cos, sin, ws, attrs, _ = _rope_operands(c, 2, 2)
    c.g.add_node("rope", [q, k, cos, sin, *ws], attrs)


@case("rope1")
def _rope1(c: Case, op):
    (x,), cos, sin, ws, attrs, _ = _rope_operands(c, 1, 1)
    c.g.op("rope1", x, cos, sin, *ws, **attrs)


@case("rope_cache_write")
def _rope_cache_write(c: Case, op):
    (q, k), cos, sin, ws, attrs, d = _rope_operands(c, 2, 2)
    hk, dv = k.type.shape[1], c.int(1, 4)
    v = c.input((T, hk, dv), c.pick(FLOATS))
    cdt = c.pick(FLOATS)
    block = 2                                     # NB=5 blocks of 2 slots >= 9 tokens
    kc = c.input((NB, block, hk, d), cdt)
    vc = c.input((NB, block, hk, dv), cdt)
    slots = torch.randperm(c.bind["NB"] * block, generator=c.gen)[:c.t]
    slots[torch.rand(c.t, generator=c.gen) < 0.3] = -1
    sl = c.input((T,), c.pick(["i64", "i32"]), tensor=slots)
    sl_t = c.inputs[sl.name] = slots.to(torch_dtype(sl.type.dtype))
    kc_before = c.inputs[kc.name].clone()
    c.g.op("rope_cache_write", q, k, v, cos, sin, kc, vc, sl, *ws, **attrs)
    # the write happens in place: the written rows are rope(k) at each valid token's slot
    c.after = lambda out: _check_rope_cache_rows(c, kc, kc_before, sl_t)


def _check_rope_cache_rows(c: Case, kc, before, slots):
    after = c.inputs[kc.name].flatten(0, 1)
    untouched = torch.ones(after.shape[0], dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    assert torch.equal(after[untouched], before.flatten(0, 1)[untouched])


# -- fused pointwise groups ----------------------------------------------------------------------

@case("fused_pointwise")
def _fused_pointwise(c: Case, op):
    from braze.ir import print_graph
    n = c.int(1, 4)
    dtype = c.pick(["f32", "f16"])
    body = Graph("group")                   # RMSNorm as one row kernel, plus optional extras
    a = body.add_input("in0", TensorType((T, n), dtype))
    w = body.add_input("in1", TensorType((n,), dtype))
    ms = body.op("mean", body.op("mul", a, a), dims=[-1], keepdim=True)
    r = body.op("rsqrt", body.op("add", ms, scalar=1e-06))
    body.set_output("out0", body.op("mul", body.op("mul", a, r), w))
    if c.flag():
        body.set_output("out1", body.op("gelu", a, approximate="tanh"))
    if c.flag():
        body.set_output("out2", body.op("sum", a, dims=[-1]))     # keepdim=false: output only
    if c.flag():
        body.set_output("out3", body.op("cast", body.op("gt", a, scalar=0), dtype="i64"))
    x, wp = c.input((T, n), dtype), c.param((n,), dtype)
    node = c.g.add_node("fused_pointwise", [x, wp], {"body": print_graph(body)})

    def same_as_unfused(out):
        want = run_graph(body, {"in0": c.inputs[x.name], "in1": c.params[wp.name]}, {})
        assert len(want) == len(node.results)
        for r, key in zip(node.results, want):
            assert torch.equal(out[f"r{r.name}"], want[key])
    c.after = same_as_unfused


# -- the generic test -------------------------------------------------------------------------

def check_drawn_cases(op, then=None):
    """Run `op`'s case on drawn sizes and values (Case.run checks the inferred types), then
    `then(case, outputs)`."""
    @settings(max_examples=6, **SETTINGS)
    @given(st.data())
    def check(data):
        c = Case(data.draw)
        CASES[op](c, op)
        assert any(n.op == op for n in c.g.nodes), f"the case for {op} builds no {op} node"
        out = c.run()
        if then is not None:
            then(c, out)

    check()


@pytest.mark.parametrize("op", sorted(CASES))
def test_inferred_types_match_reference(op):
    check_drawn_cases(op)


# -- the registry's properties hold for the reference ------------------------------------------

@pytest.mark.parametrize("op", sorted(name for name, d in all_ops().items() if d.view))
def test_a_view_op_returns_views_of_its_operand(op):
    """`view` ops re-describe storage: on dense inputs torch returns views, never copies."""
    def shares_storage(c, out):
        node = next(n for n in c.g.nodes if n.op == op)
        src = c.inputs[node.operands[0].name].untyped_storage().data_ptr()
        for r in node.results:
            assert out[f"r{r.name}"].untyped_storage().data_ptr() == src, f"{op} copied"

    check_drawn_cases(op, shares_storage)


def test_views_are_extern_and_extern_ops_have_no_kernel():
    from braze.codegen.kernels import kernel_module_for
    for name, d in all_ops().items():
        assert not d.view or d.extern, name
        if d.extern:
            assert kernel_module_for(name) is None, f"{name} is extern by design but has a kernel"


@pytest.mark.parametrize("op", sorted(n for n, d in all_ops().items() if d.last_dim_rowwise))
def test_last_dim_rowwise_ops_compute_each_row_alone(op):
    """prune-logits drops rows before these ops: every result row must be the op's result
    on that row alone (operands [T, H], then a [H] weight `w` where the op takes one)."""
    d = all_ops()[op]
    attrs = d.resolve_attrs({"eps": 1e-6} if "eps" in d.attrs else
                            {"group_size": 1} if "group_size" in d.attrs else {})
    g = torch.Generator().manual_seed(0)
    operands = [o for o in d.operands if not o.endswith("?")]    # the norms' rows: unused
    n_rows = len(operands) - (operands[-1] == "w")
    args = [torch.randn(7, 16, generator=g) for _ in range(n_rows)] + \
        [torch.randn(16, generator=g)] * (len(operands) - n_rows)
    full = d.impl(*args, **attrs)
    rows = [5, 1, 2]
    part = d.impl(*[a[rows] for a in args[:n_rows]], *args[n_rows:], **attrs)
    full, part = (x if isinstance(x, tuple) else (x,) for x in (full, part))
    for f, p_ in zip(full, part):
        torch.testing.assert_close(p_, f[rows], rtol=0, atol=0)


@pytest.mark.parametrize("op", sorted(n for n, d in all_ops().items() if d.same_type_is_identity))
def test_same_type_is_identity_ops_return_their_operand_at_the_same_type(op):
    """canonicalize replaces such a node by its operand when the types agree."""
    def same_values(c, out):
        node = next(n for n in c.g.nodes if n.op == op)
        if node.results[0].type == node.operands[0].type:
            assert torch.equal(out[f"r{node.results[0].name}"], c.inputs[node.operands[0].name])

    check_drawn_cases(op, same_values)


def test_combine_names_how_each_fusable_reduction_reduces():
    """pointwise codegen emits a row reduction from `combine` alone: it must match torch."""
    x = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.25, -8.0]])
    torch_of = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}
    combining = {n: d for n, d in all_ops().items() if d.combine is not None}
    assert combining, "no reduction declares how it combines"
    for name, d in combining.items():
        assert d.reduction and d.combine in torch_of, name
        got = d.impl(x, dims=[-1], keepdim=True)
        assert torch.equal(got, torch_of[d.combine](x, dim=-1, keepdim=True)), name


TWO_TENSOR_OPS = sorted(n for n, d in all_ops().items() if d.pointwise and d.operands == ("a", "b?"))
# a pair on which operand order matters for every op that is not commutative
WITNESS = (torch.tensor([1.0, 2.0, -1.5, 0.5]), torch.tensor([2.0, 3.0, 2.0, 0.25]))


@pytest.mark.parametrize("op", TWO_TENSOR_OPS)
def test_commutative_is_exactly_when_operand_order_does_not_matter(op):
    impl = all_ops()[op].impl
    call = lambda a, b: impl(a, b, scalar=None, scalar_first=False)
    if not all_ops()[op].commutative:
        a, b = WITNESS
        assert not torch.equal(call(a, b), call(b, a)), f"{op} is commutative; say so"
        return

    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    @settings(max_examples=30, **SETTINGS)
    @given(st.lists(st.tuples(floats, floats), min_size=1, max_size=6),
           st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
    def check(pairs, dtype):
        a = torch.tensor([p[0] for p in pairs])
        b = torch.tensor([p[1] for p in pairs])
        if not dtype.is_floating_point:
            a, b = (torch.nan_to_num(t, posinf=7, neginf=-7).round().to(dtype) for t in (a, b))
        else:
            a, b = a.to(dtype), b.to(dtype)
        torch.testing.assert_close(call(a, b), call(b, a), rtol=0, atol=0, equal_nan=True)

    check()


# -- type promotion with Python scalars and rank-0 tensors -------------------------------------

@pytest.mark.parametrize("op, dtype, scalar, first, want", [
    ("mul", "f16", 0.5, False, "f16"),
    ("mul", "i64", 0.5, False, "f32"),
    ("mul", "i64", 2, False, "i64"),
    ("mul", "i32", 2, False, "i32"),
    ("add", "bool", 1, False, "i64"),
    ("add", "bool", True, False, "bool"),
    ("add", "f16", 70000.0, False, "f16"),
    ("div", "i64", 2, False, "f32"),
    ("div", "i64", 2, True, "f32"),
    ("pow", "f16", 2.0, True, "f16"),
    ("pow", "i64", 2, False, "i64"),
    ("pow", "i64", 0.5, False, "f32"),
    ("sub", "f16", 1.0, True, "f16"),
    ("sub", "i64", 1.5, True, "f32"),
    ("lt", "i64", 0.5, False, "bool"),
    ("eq", "f16", 1, False, "bool"),
])
def test_scalar_promotion(op, dtype, scalar, first, want):
    c = Case(lambda s, label=None: {"T": 5, "S": 2, "seed": 0}[label])
    x = c.input((T, 3), dtype, low=0, high=4)
    y = c.g.op(op, x, scalar=scalar, scalar_first=first)
    assert y.type == TensorType((T, 3), want)
    c.run()


@pytest.mark.parametrize("a, b, want", [
    ("f16", "f32[]", "f16"),          # a zero-dim tensor does not promote a higher category
    ("i64", "f32[]", "f32"),          # ... unless it is of a higher category
    ("f16", "f32[1]", "f32"),         # a one-element 1-D tensor is not zero-dim
    ("i32", "i64[]", "i32"),
    ("bool", "i64[]", "i64"),
    ("f16", "f64[]", "f16"),
])
def test_zero_dim_tensor_promotion(a, b, want):
    c = Case(lambda s, label=None: {"T": 3, "S": 1, "seed": 1}[label])
    x = c.input((T, 2), a)
    y = c.input((1,) if b.endswith("[1]") else (), b.split("[")[0])
    for op in ("add", "mul"):
        assert c.g.op(op, x, y).type == TensorType((T, 2), want)
        assert c.g.op(op, y, x).type == TensorType((T, 2), want)
    c.run()


# -- inference edge cases that were bugs once ----------------------------------------------------

@pytest.mark.parametrize("op", ["sum", "mean", "amax"])
def test_reduce_with_empty_dims(op):
    """torch reads dims=[] as 'all dims'; braze refuses it rather than mistype it."""
    c = Case(lambda s, label=None: {"T": 3, "S": 1, "seed": 2}[label])
    x = c.input((T, 4), "f32")
    with pytest.raises(BrazeError, match="name the dims"):
        c.g.op(op, x, dims=[])


def test_where_with_zero_dim_operand():
    c = Case(lambda s, label=None: {"T": 4, "S": 1, "seed": 3}[label])
    cond = c.input((T,), "bool")
    a = c.input((T,), "f16")
    b = c.input((), "f32")
    c.g.op("where", cond, a, b)
    c.run()


def test_squeeze_symbolic_dim_at_t_equal_1():
    """Squeezing T would change the rank only when T == 1 at run time: refused."""
    c = Case(lambda s, label=None: {"T": 1, "S": 1, "seed": 4}[label])
    x = c.input((T, 3), "f32")
    with pytest.raises(BrazeError, match="symbolic"):
        c.g.op("squeeze", x, dim=0)


def test_slice_symbolic_dim_past_its_end():
    c = Case(lambda s, label=None: {"T": 3, "S": 1, "seed": 5}[label])
    x = c.input((T, 2), "f32")
    c.g.op("slice", x, dim=0, start=5)
    c.run()


def test_reshape_to_fractional_symbolic_dim_is_refused():
    g = Graph()
    x = g.add_input("x", TensorType((T, 4), "f32"))
    with pytest.raises(BrazeError):
        g.op("reshape", x, shape=[3, -1])


@pytest.mark.parametrize("op, first", [("maximum", False), ("minimum", True),
                                       ("logical_and", False), ("logical_or", False),
                                       ("lt", True), ("eq", True), ("ge", True)])
def test_scalar_attribute_on_every_binary_op(op, first):
    c = Case(lambda s, label=None: {"T": 3, "S": 1, "seed": 6}[label])
    x = c.input((T, 4), "f32")
    try:
        c.g.op(op, x, scalar=0.0, scalar_first=first)
    except BrazeError:
        return
    c.run()


# -- paged attention + cache writes vs dense causal attention ----------------------------------

BLOCK, HQ, HKV = 4, 4, 2


def _dense_attention(q, k, v, cached, scale, window, causal):
    """q [n, HQ, D] for positions cached..cached+n-1 over k/v [L, HKV, D] (positions 0..L-1)."""
    n, length = q.shape[0], k.shape[0]
    out = torch.empty(n, HQ, v.shape[-1])
    for h in range(HQ):
        kh, vh = k[:, h // (HQ // HKV)], v[:, h // (HQ // HKV)]
        for i in range(n):
            pos = cached + i
            keep = torch.ones(length, dtype=torch.bool)
            if causal:
                keep &= torch.arange(length) <= pos
            if window:
                keep &= torch.arange(length) > pos - window
            scores = (kh[keep] @ q[i, h]) * scale
            out[i, h] = torch.softmax(scores, 0) @ vh[keep]
    return out


@st.composite
def batches(draw):
    """2-3 sequences: a prefill after a cached prefix, a decode, and one of any kind."""
    kinds = ["prefix", "decode", draw(st.sampled_from(["prefill", "prefix", "decode"]))]
    kinds = kinds[:draw(st.integers(2, 3))]
    seqs = []
    for kind in draw(st.permutations(kinds)):
        if kind == "decode":
            seqs.append((draw(st.integers(1, 9)), 1))
        elif kind == "prefill":
            seqs.append((0, draw(st.integers(1, 6))))
        else:
            seqs.append((draw(st.integers(1, 7)), draw(st.integers(2, 5))))
    return seqs


@settings(max_examples=20, **SETTINGS)
@given(seqs=batches(), pad=st.integers(0, 2), window=st.sampled_from([0, 0, 1, 2, 3, 5]),
       causal=st.sampled_from([True, True, False]), dtype=st.sampled_from(["f32", "f16"]),
       head_dims=st.sampled_from([(8, 8), (8, 4)]), spare=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16))
def test_paged_attention_matches_dense(seqs, pad, window, causal, dtype, head_dims, spare, seed):
    gen = torch.Generator().manual_seed(seed)
    td = torch_dtype(dtype)
    D, DV = head_dims
    lengths = [c + n for c, n in seqs]
    nblocks = [-(-L // BLOCK) for L in lengths]
    nb, mb = sum(nblocks) + spare, max(nblocks) + 1
    ntok = sum(n for _, n in seqs)
    t = ntok + pad
    s = len(seqs)

    # every sequence's full keys/values; the cache holds the prefix, the step brings the rest
    ks = [torch.randn(L, HKV, D, generator=gen).to(td) for L in lengths]
    vs = [torch.randn(L, HKV, DV, generator=gen).to(td) for L in lengths]
    perm = torch.randperm(nb, generator=gen).tolist()          # shuffled block ownership
    tables = torch.randint(0, nb, (s, mb), generator=gen, dtype=torch.int32)  # junk past the end
    k_cache = torch.randn(nb, BLOCK, HKV, D, generator=gen).to(td)
    v_cache = torch.randn(nb, BLOCK, HKV, DV, generator=gen).to(td)
    q = torch.randn(t, HQ, D, generator=gen).to(td)
    k_new = torch.randn(t, HKV, D, generator=gen).to(td)
    v_new = torch.randn(t, HKV, DV, generator=gen).to(td)
    slots = torch.full((t,), -1, dtype=torch.int64)
    qsl = [0]
    for i, ((cached, n), L) in enumerate(zip(seqs, lengths)):
        own, perm = perm[:nblocks[i]], perm[nblocks[i]:]
        tables[i, :nblocks[i]] = torch.tensor(own, dtype=torch.int32)
        slot = [own[p // BLOCK] * BLOCK + p % BLOCK for p in range(L)]
        for p in range(cached):                                  # the cached prefix
            k_cache.view(-1, HKV, D)[slot[p]] = ks[i][p]
            v_cache.view(-1, HKV, DV)[slot[p]] = vs[i][p]
        lo = qsl[-1]
        k_new[lo:lo + n], v_new[lo:lo + n] = ks[i][cached:], vs[i][cached:]
        slots[lo:lo + n] = torch.tensor(slot[cached:])
        qsl.append(lo + n)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for i, (cached, n) in enumerate(seqs):
        for p in range(cached, cached + n):
            own = tables[i, p // BLOCK]
            want_k[own, p % BLOCK], want_v[own, p % BLOCK] = ks[i][p], vs[i][p]

    g = Graph("attn")
    iq = g.add_input("q", TensorType((T, HQ, D), dtype))
    ik = g.add_input("k", TensorType((T, HKV, D), dtype))
    iv = g.add_input("v", TensorType((T, HKV, DV), dtype))
    ikc = g.add_input("k_cache.0", TensorType((NB, BLOCK, HKV, D), dtype))
    ivc = g.add_input("v_cache.0", TensorType((NB, BLOCK, HKV, DV), dtype))
    isl = g.add_input("slot_mapping", TensorType((T,), "i64"))
    iqsl = g.add_input("query_start_loc", TensorType((S + 1,), "i32"))
    ilens = g.add_input("seq_lens", TensorType((S,), "i32"))
    ibt = g.add_input("block_tables", TensorType((S, MB), "i32"))
    assert g.add_node("cache_write", [ik, iv, ikc, ivc, isl]).results == []
    scale = 1 / math.sqrt(D)
    out = g.op("paged_attention", iq, ikc, ivc, iqsl, ilens, ibt, scale=scale,
               sliding_window=window, causal=causal)
    g.set_output("out", out)
    # the kernel form: same attention, heads flattened into the last dim
    flat = g.op("attention", iq, ikc, ivc, iqsl, ilens, ibt, scale=scale, sliding_window=window,
                causal=causal, num_heads=HQ, num_kv_heads=HKV, head_dim=D)
    g.set_output("flat", flat)
    verify(g)
    bind = {"T": t, "S": s, "NB": nb, "MB": mb}
    assert out.type.concrete_shape(bind) == (t, HQ, DV) and out.type.dtype == dtype
    assert flat.type.concrete_shape(bind) == (t, HQ * DV) and flat.type.dtype == dtype

    inputs = {"q": q, "k": k_new, "v": v_new, "k_cache.0": k_cache, "v_cache.0": v_cache,
              "slot_mapping": slots, "query_start_loc": torch.tensor(qsl, dtype=torch.int32),
              "seq_lens": torch.tensor(lengths, dtype=torch.int32), "block_tables": tables}
    results = run_graph(g, inputs, {}, check_types=True)
    got = results["out"]
    assert tuple(got.shape) == out.type.concrete_shape(bind) and got.dtype == td
    assert tuple(results["flat"].shape) == flat.type.concrete_shape(bind)
    assert results["flat"].dtype == td
    assert torch.equal(results["flat"], got.reshape(t, -1))

    # the caches were written in place, at exactly the valid tokens' slots (not at slot -1)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "f32" else dict(atol=4e-3, rtol=4e-3)
    for i, (cached, n) in enumerate(seqs):
        lo = qsl[i]
        ref = _dense_attention(q[lo:lo + n].float(), ks[i].float(), vs[i].float(), cached,
                               scale, window, causal)
        torch.testing.assert_close(got[lo:lo + n].float(), ref, **tol)
    assert torch.count_nonzero(got[ntok:]) == 0                   # padding rows are zero


def test_cache_write_skips_padding_and_types():
    """Slot -1 must not wrap around to the last slot of the cache."""
    g = Graph()
    k = g.add_input("k", TensorType((T, 1, 2), "f16"))
    kc = g.add_input("kc", TensorType((NB, 2, 1, 2), "f32"))   # written with a cast
    vc = g.add_input("vc", TensorType((NB, 2, 1, 2), "f32"))
    sl = g.add_input("slots", TensorType((T,), "i32"))
    assert g.add_node("cache_write", [k, k, kc, vc, sl]).results == []
    verify(g)
    cache = torch.zeros(3, 2, 1, 2)
    kt = torch.arange(1, 7, dtype=torch.float16).reshape(3, 1, 2)
    run_graph(g, {"k": kt, "kc": cache, "vc": torch.zeros(3, 2, 1, 2),
                  "slots": torch.tensor([4, -1, 1], dtype=torch.int32)}, {}, check_types=True)
    flat = cache.view(-1, 1, 2)
    assert flat[4].tolist() == [[1.0, 2.0]] and flat[1].tolist() == [[5.0, 6.0]]
    assert flat[-1].tolist() == [[0.0, 0.0]]
    assert torch.count_nonzero(cache) == 4


def test_paged_attention_infer_rejects_bad_heads():
    g = Graph()
    q = g.add_input("q", TensorType((T, 3, 8), "f32"))
    kc = g.add_input("kc", TensorType((NB, 4, 2, 8), "f32"))
    qsl = g.add_input("qsl", TensorType((S + 1,), "i32"))
    lens = g.add_input("lens", TensorType((S,), "i32"))
    bt = g.add_input("bt", TensorType((S, MB), "i32"))
    with pytest.raises(BrazeError, match="not a multiple"):
        g.op("paged_attention", q, kc, kc, qsl, lens, bt, scale=1.0)
    q = g.add_input("q4", TensorType((T, 4, 8), "f32"))
    with pytest.raises(BrazeError, match="do not match"):
        g.op("attention", q, kc, kc, qsl, lens, bt, scale=1.0, num_heads=4, num_kv_heads=1,
             head_dim=8)


def test_mla_ops_infer_and_reject():
    """Shapes of the MLA ops (their numbers: tests/test_kernel_mla.py against torch math)."""
    g = Graph()
    cache = g.add_input("c", TensorType((NB, 4, 1, 40), "f32"))
    qsl = g.add_input("qsl", TensorType((S + 1,), "i32"))
    lens = g.add_input("lens", TensorType((S,), "i32"))
    bt = g.add_input("bt", TensorType((S, MB), "i32"))
    q = g.add_input("q", TensorType((T, 4, 24), "f32"))
    w = g.add_param("w", TensorType((4 * 28, 32), "f32"))
    assert g.op("mla_attention", q, cache, w, qsl, lens, bt, scale=1.0,
                kv_lora_rank=32).type == TensorType((T, 4, 12), "f32")
    with pytest.raises(BrazeError, match="w_kv_b"):
        g.op("mla_attention", q, cache, w, qsl, lens, bt, scale=1.0, kv_lora_rank=30)
    qa = g.add_input("qa", TensorType((T, 4, 40), "f32"))
    assert g.op("latent_attention", qa, cache, qsl, lens, bt, scale=1.0,
                kv_lora_rank=32).type == TensorType((T, 4, 32), "f32")
    with pytest.raises(BrazeError, match="must be"):
        g.op("latent_attention", q, cache, qsl, lens, bt, scale=1.0, kv_lora_rank=32)
    with pytest.raises(BrazeError, match="rope part"):
        g.op("latent_attention", qa, cache, qsl, lens, bt, scale=1.0, kv_lora_rank=40)
    sl = g.add_input("sl", TensorType((T,), "i64"))
    kv = g.add_input("kv", TensorType((T, 1, 40), "f32"))
    assert g.add_node("latent_cache_write", [kv, cache, sl]).results == []
    with pytest.raises(BrazeError, match="does not fit"):
        g.add_node("latent_cache_write", [qa, cache, sl])


def test_fused_moe_routed_infer_and_reject():
    g = Graph()
    x = g.add_input("x", TensorType((T, 16), "f32"))
    w = g.add_input("w", TensorType((T, 2), "f32"))
    ids = g.add_input("ids", TensorType((T, 2), "i64"))
    gu = g.add_param("gu", TensorType((4, 8, 16), "f32"))
    d = g.add_param("d", TensorType((4, 16, 4), "f32"))
    assert g.op("fused_moe_routed", x, w, ids, gu, d).type == TensorType((T, 16), "f32")
    with pytest.raises(BrazeError, match="want weights"):
        g.op("fused_moe_routed", x, ids, ids, gu, d)
    many = g.add_input("many", TensorType((T, 5), "i64"))
    wide = g.add_input("wide", TensorType((T, 5), "f32"))
    with pytest.raises(BrazeError, match="5 experts per token"):
        g.op("fused_moe_routed", x, wide, many, gu, d)


# -- coverage -----------------------------------------------------------------------------------

# all three in test_paged_attention_matches_dense; the MLA ops in test_mla_ops_infer_and_reject
COVERED_ELSEWHERE = {"paged_attention", "cache_write", "attention", "mla_attention",
                     "latent_attention", "latent_cache_write", "fused_moe_routed"}


def test_every_registered_op_is_covered():
    registry = set(all_ops())
    covered = set(CASES) | COVERED_ELSEWHERE
    assert not covered - registry, f"cases for ops that do not exist: {covered - registry}"
    assert registry == covered, f"ops with no inference test here: {sorted(registry - covered)}"
