"""Helpers for pass tests: IR text in -> text out, and before/after equivalence on the interpreter."""

from __future__ import annotations

import textwrap

import torch
from hypothesis import strategies as st

from braze.ir import Graph, T, TensorType, parse_graph, print_graph, run_graph, verify
from braze.ir.types import torch_dtype
from braze.passes import PassContext, PassManager


def run_passes(g: Graph, names: list[str], **options) -> tuple[Graph, PassContext]:
    ctx = PassContext(options=options)
    PassManager(names, ctx, verify_each=True).run(g)
    return g, ctx


def opt_text(text: str, *names: str, **options) -> str:
    """Parse IR text, run passes (verifying after each), print the result."""
    g = parse_graph(textwrap.dedent(text))
    verify(g)
    run_passes(g, list(names), **options)
    return print_graph(g)


def refusal_reasons(text: str, *names: str, **options) -> list[str]:
    """Run passes on IR text they must leave alone: assert the graph is unchanged and
    return the refusal reasons, sorted."""
    g, ctx = run_passes(parse_graph(text), list(names), **options)
    assert print_graph(g) == print_graph(parse_graph(text)), "a refused graph must be unchanged"
    return sorted(r.reason for r in ctx.refusals)


def same_text(a: str, b: str) -> bool:
    norm = lambda s: "\n".join(ln.strip() for ln in textwrap.dedent(s).strip().splitlines())
    return norm(a) == norm(b)


def materialize_params(g: Graph, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Compute derived params (recipes) from the given source params, as the compiler does."""
    out = dict(params)
    for name, p in g.params.items():
        if p.recipe is not None and name not in out:
            args = [out[s.name] for s in p.recipe.operands]
            res = p.recipe.opdef.impl(*args, **p.recipe.attrs)
            out[name] = res[0] if isinstance(res, (tuple, list)) else res
    return out


def random_feeds(g: Graph, bindings: dict[str, int], seed: int = 0, int_high: int = 8):
    """Random values for every input and (non-derived) param; floats ~N(0,1), ints in [0, int_high)."""
    gen = torch.Generator().manual_seed(seed)
    feeds, params = {}, {}
    for v in list(g.inputs) + [p for p in g.params.values() if p.recipe is None]:
        shape = v.type.concrete_shape(bindings)
        dt = torch_dtype(v.type.dtype)
        if dt.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dt)
        elif dt == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            t = torch.randint(0, int_high, shape, generator=gen).to(dt)
        (params if v.kind == "param" else feeds)[v.name] = t
    return feeds, params


def assert_pass_preserves(text_or_graph, names: list[str], bindings: dict[str, int], seed: int = 0,
                          atol: float = 1e-5, rtol: float = 1e-5, feeds=None, params=None, **options):
    """Run the graph before and after the passes on the same random values; outputs must agree.
    Returns the graph after the passes."""
    before = parse_graph(textwrap.dedent(text_or_graph)) if isinstance(text_or_graph, str) \
        else parse_graph(print_graph(text_or_graph))
    after = parse_graph(print_graph(before))
    if feeds is None:
        feeds, params = random_feeds(before, bindings, seed)
    clone = lambda d: {k: v.clone() for k, v in d.items()}
    want = run_graph(before, clone(feeds), materialize_params(before, params))
    run_passes(after, names, **options)
    got = run_graph(after, clone(feeds), materialize_params(after, params))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol)
    return after


# -- real model graphs -------------------------------------------------------------------

_MODEL_CACHE: dict = {}


def traced_file(tmp_dir):
    """The tiny Llama traced to IR text, in `tmp_dir`/traced.bir (the `braze opt` input the
    command-line tests feed)."""
    from braze.ir import print_graph
    g, _ = model_graph("llama", tmp_dir)
    f = tmp_dir / "traced.bir"
    f.write_text(print_graph(g))
    return f


def model_graph(family: str, tmp_dir, seed: int = 1, dtype: str | None = None, **overrides):
    """A tiny random checkpoint of `family` traced to IR (in `dtype`, default the
    checkpoint's), with its real weights. Returns (graph, params). Cached per
    (family, seed, dtype, overrides) within a test session."""
    import contextlib
    import io
    from pathlib import Path

    from braze.frontend import load_model
    from braze.tiny import make_checkpoint

    key = (family, seed, dtype, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    if key not in _MODEL_CACHE:
        d = Path(tmp_dir) / f"{family}-{abs(hash(key))}"
        with contextlib.redirect_stderr(io.StringIO()):
            make_checkpoint(family, d, seed=seed, with_tokenizer=False, **overrides)
        loaded = load_model(d) if dtype is None else load_model(d, dtype=dtype)
        params = {n: loaded.load_param(n) for n in loaded.graph.params}
        _MODEL_CACHE[key] = (print_graph(loaded.graph), params)
    text, params = _MODEL_CACHE[key]
    return parse_graph(text), dict(params)


O2_SERVING = dict(max_num_tokens=64, max_num_seqs=4, max_model_len=64, block_size=16)


def o2_model_graph(family: str, tmp_dir, seed: int = 1, dtype: str | None = None, **overrides):
    """`model_graph` through the -O2 pipeline at small serving sizes: (graph, params with
    the derived ones materialised)."""
    from braze.passes import PIPELINES
    g, params = model_graph(family, tmp_dir, seed, dtype, **overrides)
    run_passes(g, PIPELINES[2], **O2_SERVING)
    return g, materialize_params(g, params)


def step_sizes(feeds: dict) -> dict[str, int]:
    """The T, S and R (logits rows, when the feeds have them) a step's feeds bind."""
    sizes = {"T": feeds["input_ids"].shape[0], "S": feeds["seq_lens"].shape[0]}
    if "logits_indices" in feeds:
        sizes["R"] = feeds["logits_indices"].shape[0]
    return sizes


def model_step_feeds(g: Graph, prompts=((1, 17, 93, 4, 250, 66, 7), (5, 9, 33)), num_blocks: int = 8,
                     cached=(0, 0)):
    """Inputs for one mixed step: sequence i runs prompts[i][cached[i]:] after cached[i] tokens
    already in the cache (the cache holds random values there, standing in for earlier steps)."""
    from braze.ir.contract import SeqChunk, build_step
    from braze.ir.contract import CACHE_PREFIXES
    block_size = next(v for v in g.inputs if v.name.startswith(CACHE_PREFIXES)).type.shape[1]
    chunks, next_block = [], 0
    for p, c in zip(prompts, cached):
        n = -(-len(p) // block_size)
        chunks.append(SeqChunk(list(p[c:]), c, list(range(next_block, next_block + n))))
        next_block += n
    feeds = build_step(chunks, block_size, max_blocks=4)
    gen = torch.Generator().manual_seed(0)
    for v in g.inputs:
        if v.name.startswith(CACHE_PREFIXES):
            shape = (num_blocks,) + tuple(v.type.shape[1:])
            feeds[v.name] = torch.randn(shape, generator=gen).to(torch_dtype(v.type.dtype))
    return feeds


def assert_model_pass_preserves(g: Graph, params, names: list[str], atol=1e-5, rtol=1e-5,
                                **options) -> Graph:
    """Run a model graph before/after `names` on a mixed prefill+decode step (cache included)."""
    feeds = model_step_feeds(g, cached=(0, 2))
    before = parse_graph(print_graph(g))
    want_feeds = {k: v.clone() for k, v in feeds.items()}
    want = run_graph(before, want_feeds, materialize_params(before, params))
    run_passes(g, names, **options)
    got_feeds = {k: v.clone() for k, v in feeds.items()}
    got = run_graph(g, got_feeds, materialize_params(g, params))
    for k in want:
        w, o = want[k], got[k]
        if w.shape != o.shape and k == "logits":   # prune-logits keeps only the sampled rows
            w = w.index_select(0, feeds["logits_indices"])
        torch.testing.assert_close(o, w, atol=atol, rtol=rtol)
    for k in feeds:
        if k.startswith(("k_cache.", "v_cache.", "kv_latent.")):
            torch.testing.assert_close(got_feeds[k], want_feeds[k], atol=atol, rtol=rtol)
    return g


# -- random pointwise graphs (fuse-pointwise and its kernels) ---------------------------

@st.composite
def pointwise_graphs(draw, unary, binary, scalar_ops, scalars, compares, max_n, max_t):
    """Random DAGs of pointwise ops over broadcastable shapes, with scalars, casts, where, row
    reductions (and reductions over other dims, left standing), non-pointwise nodes between
    (softmax). Returns (graph, T). The op lists and sizes are the caller's."""
    n = draw(st.integers(1, max_n), label="N")
    dtype = draw(st.sampled_from(["f32", "f16"]), label="dtype")
    other = {"f32": "f16", "f16": "f32"}[dtype]
    shapes = [(T, n), (T, 1), (n,), (1, n), ()]
    g = Graph("g")
    pool = [g.add_input(f"x{i}", TensorType(draw(st.sampled_from(shapes)), dtype))
            for i in range(draw(st.integers(1, 3)))]
    pool.append(g.add_input("full", TensorType((T, n), dtype)))
    if draw(st.booleans()):
        pool.append(g.add_param("w", TensorType((n,), dtype)))
    ends = []
    pick = lambda: draw(st.sampled_from(pool[-4:] if draw(st.booleans()) else pool))
    for _ in range(draw(st.integers(2, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "scalar", "cast", "where",
                                     "reduce", "softmax"]))
        a = pick()
        if kind == "unary":
            v = g.op(draw(st.sampled_from(unary)), a)
        elif kind == "binary":
            v = g.op(draw(st.sampled_from(binary)), a, pick())
        elif kind == "scalar":
            v = g.op(draw(st.sampled_from(scalar_ops)), a,
                     scalar=draw(st.sampled_from(scalars)),
                     scalar_first=draw(st.booleans()))
        elif kind == "cast":
            v = g.op("cast", a, dtype=draw(st.sampled_from([other, a.type.dtype])))
        elif kind == "where":
            v = g.op("where", g.op(draw(st.sampled_from(compares)), a, pick()), a, pick())
        elif kind == "softmax" and a.type.rank:
            v = g.op("softmax", a, dim=-1)
        elif kind == "reduce" and a.type.rank:
            op = draw(st.sampled_from(["sum", "mean", "amax"]))
            dims = draw(st.sampled_from([[-1], [-1], [a.type.rank - 1], [0]]))
            keep = draw(st.booleans())
            v = g.op(op, a, dims=dims, keepdim=keep)
            if not keep:
                ends.append(v)
                continue
        else:
            continue
        pool.append(v)
    results = [v for v in pool if v.kind == "result"]
    outs = ends + draw(st.lists(st.sampled_from(results), max_size=3)) if results else ends
    for i, v in enumerate(outs + ([results[-1]] if results else [])):
        g.set_output(f"y{i}", v)
    return g, draw(st.integers(1, max_t), label="T")
