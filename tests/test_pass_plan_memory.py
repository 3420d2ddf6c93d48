"""plan-memory: one static arena, liveness-based reuse, views as aliases.

The strongest check is `run_in_arena`: a test-only executor that keeps every
planned intermediate at its planned offset inside one uint8 arena and every view
as a real torch view of its owner. If two values that are live at the same time
shared bytes, the later write would clobber the earlier value and the outputs
would differ from the plain interpreter's.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pass_helpers import (materialize_params, model_graph, model_step_feeds, opt_text, random_feeds,
                          run_passes, same_text)

from braze.ir import Graph, parse_graph, print_graph, run_graph
from braze.ir.errors import BrazeError
from braze.ir.layout import VIEW_OPS
from braze.ir.types import T, TensorType, torch_dtype
from braze.passes import PassContext
from braze.passes.manager import PIPELINES
from braze.passes.plan_memory import (ALIGN, place_by_size, place_in_order, plan,
                                      plan_memory)
from braze.tiny import FAMILIES

SMALL = dict(max_num_tokens=16, max_num_seqs=4, max_model_len=64, block_size=16)


# -- the independent checks -------------------------------------------------------------

def lifetimes(g: Graph, mem: dict) -> dict[str, tuple[int, int]]:
    """[first, last] node index of each buffer, its views' readers included."""
    last, start = {}, {}
    for i, node in enumerate(g.nodes):
        for v in node.operands:
            last[v.name if v.kind == "result" else v.ref] = i
        for r in node.results:
            start[r.name] = i
    spans = {}
    for name in mem["buffers"]:
        end = max(start[name], last.get(name, -1))
        for view, owner in mem["aliases"].items():
            if owner == "%" + name:
                end = max(end, last.get(view, -1))
        spans[name] = (start[name], end)
    return spans


def check_plan(g: Graph, mem: dict) -> int:
    """Assert the plan is sound; return the largest live set (bytes), the arena's lower bound."""
    bufs, aliases, returned = mem["buffers"], mem["aliases"], set(mem["returned"])
    owner_of = lambda v: aliases.get(v.name, v.ref) if v.kind == "result" else v.ref
    for node in g.nodes:
        for r in node.results:
            assert (r.name in bufs) + (r.name in returned) + (r.name in aliases and
                                                               r.name not in returned) == 1, r
            if r.name in aliases:          # a view of a view is a view of the same owner
                assert node.op in VIEW_OPS and aliases[r.name] == owner_of(node.operands[0])
            if r.name in bufs:
                t = r.type.concrete_shape(mem["bindings"])
                assert bufs[r.name][1] == torch.Size(t).numel() * torch_dtype(r.type.dtype).itemsize
    results = {r.name for n in g.nodes for r in n.results}
    for v in g.outputs.values():
        if v.kind == "result":           # an output, and the node result it views, are the caller's
            owner = aliases.get(v.name, "@")
            assert v.name in returned and (owner[1:] not in results or owner[1:] in returned)
    spans = lifetimes(g, mem)
    items = sorted(bufs.items(), key=lambda kv: kv[1][0])
    for name, (off, n) in items:
        assert off % ALIGN == 0 and off + n <= mem["arena_bytes"]
    for i, (a, (oa, na)) in enumerate(items):
        for b, (ob, nb) in items[i + 1:]:
            if ob >= oa + na:
                break
            sa, sb = spans[a], spans[b]
            if na and nb:
                assert sa[1] < sb[0] or sb[1] < sa[0], f"%{a} {sa} and %{b} {sb} share bytes"
    live = [0] * (len(g.nodes) + 1)
    for name, (s, e) in spans.items():
        for i in range(s, e + 1):
            live[i] += bufs[name][1]
    aligned = sum(-(-n // ALIGN) * ALIGN for _, n in bufs.values())
    assert max(live) <= mem["arena_bytes"] <= aligned
    return max(live)


def run_in_arena(g: Graph, mem: dict, inputs: dict, params: dict) -> dict:
    """Run g with every planned value at its offset in one arena (see the module docstring)."""
    arena = torch.full((mem["arena_bytes"],), 0xFF, dtype=torch.uint8)   # NaN where unwritten
    base = arena.untyped_storage().data_ptr()
    in_arena = lambda owner: owner[0] == "%" and owner[1:] in mem["buffers"]
    env = {v: inputs[v.name] for v in g.inputs}
    env.update({v: params[n] for n, v in g.params.items()})
    for node in g.nodes:
        out = node.opdef.impl(*[env[v] for v in node.operands], **node.attrs)
        out = (out,) if isinstance(out, torch.Tensor) else out
        for r, t in zip(node.results, out):
            if r.name in mem["buffers"]:
                off, planned = mem["buffers"][r.name]
                n = t.numel() * t.element_size()
                assert n <= planned, f"%{r.name} needs {n} bytes, planned {planned}"
                slot = arena[off:off + n].view(t.dtype).view(t.shape)
                slot.copy_(t)
                env[r] = slot
            elif r.name in mem["aliases"] and in_arena(mem["aliases"][r.name]):
                assert t.untyped_storage().data_ptr() == base, f"%{r.name} is not a view"
                env[r] = t
            else:
                env[r] = t if r.name in mem["aliases"] else t.clone()
    return {k: env[v] for k, v in g.outputs.items()}


def plan_of(g: Graph, **options) -> dict:
    run_passes(g, ["plan-memory"], **options)
    return g.meta["memory"]


# -- IR text ----------------------------------------------------------------------------

def test_text_reuse_and_aliases():
    src = """
    graph @g(%x: f32[T, 64]) {
      %0: f32[T, 64] = neg(%x)
      %1: f32[T, 64] = exp(%0)
      %2: f32[T, 64] = neg(%1)
      %3: f32[64*T] = reshape(%1) {shape=[-1]}
      %4: f32[64*T] = exp(%3)
      %5: f32[64*T] = reshape(%2) {shape=[-1]}
      %6: f32[64*T] = add(%4, %5)
      return out=%6
    }
    """
    out = opt_text(src, "plan-memory", max_num_tokens=4)
    meta = ('meta {memory={"arena_bytes": 3072, "alignment": 256, "bindings": {"T": 4, "S": 256, '
            '"MB": 128, "R": 256}, "buffers": {"0": [0, 1024], "1": [1024, 1024], "2": [0, 1024], '
            '"4": [2048, 1024]}, "aliases": {"3": "%1", "5": "%2"}, "returned": ["6"]}}')
    lines = src.strip().splitlines()
    assert same_text(out, "\n".join(lines[:-2] + [meta] + lines[-2:]))
    import braze.passes.plan_memory as pm
    assert meta.split(" {", 1)[1].replace(" ", "") in pm.__doc__.replace(" ", "").replace("\n", "")


def test_text_copies_views_of_params_outputs_and_bindings():
    src = """
    graph @g(%x: f32[T, 4], %ids: i64[S]) {
      param @w: f32[4]
      %0: f32[1, 4] = unsqueeze(@w) {dim=0}
      %1: f32[T, 4] = mul(%x, %0)
      %2: f32[4, T] = permute(%1) {dims=[1, 0]}
      %3: f32[4*T] = reshape(%2) {shape=[-1]}
      %4: f32[T, 1] = sum(%1) {dims=[-1], keepdim=true}
      %5: f32[T, 1], %6: i64[T, 1] = topk(%1) {k=1}
      %7: f32[S, 4] = index_select(%1, %ids) {dim=0}
      %8: f32[4*S] = reshape(%7) {shape=[-1]}
      %9: f32[4*T] = neg(%3)
      return a=%8, b=%9, c=%4, d=%6
    }
    """
    g = parse_graph(src.replace("    ", ""))
    mem = plan_of(g, max_num_tokens=8, max_num_seqs=2)
    assert mem["bindings"] == {"T": 8, "S": 2, "MB": 128, "R": 2}
    # the unsqueeze of a param and the permute are views; a reshape of a permuted value is a copy
    assert mem["aliases"] == {"0": "@w", "2": "%1", "8": "%7"}
    assert mem["buffers"] == {"1": [0, 128], "3": [256, 128], "5": [512, 32]}
    # outputs, and the value an output is a view of, belong to the caller
    assert mem["returned"] == ["4", "6", "7", "8", "9"]
    check_plan(g, mem)


@pytest.mark.parametrize("view, ty, copies", [
    ("slice(%0) {dim=2, start=1}", "f32[T, 1, 3]", True),         # strided
    ("slice(%0) {dim=0, start=1}", "f32[T - 1, 1, 4]", False),    # leading rows
    ("select(%0) {dim=1, index=0}", "f32[T, 4]", False),          # a size-1 dim
    ("select(%0) {dim=2, index=0}", "f32[T, 1]", False),          # strided, but flattens
    ("permute(%0) {dims=[0, 2, 1]}", "f32[T, 4, 1]", False),      # moves only a size-1 dim
    ("permute(%0) {dims=[2, 1, 0]}", "f32[4, 1, T]", True),       # transposes
    ("expand(%1) {shape=[-1, 1, 4]}", "f32[T, 1, 4]", True),      # broadcasts
    ("unsqueeze(%0) {dim=0}", "f32[1, T, 1, 4]", False),
])
def test_reshape_is_a_view_only_where_torch_can_view_it(view, ty, copies):
    flat = "f32[" + "*".join(f"({d})" for d in ty[4:-1].split(", ")) + "]"
    g = parse_graph(f"""graph @g(%x: f32[T, 1, 4], %y: f32[T, 1, 1]) {{
      %0: f32[T, 1, 4] = neg(%x)
      %1: f32[T, 1, 1] = neg(%y)
      %2: {ty} = {view}
      %3: {flat} = reshape(%2) {{shape=[-1]}}
      %4: {flat} = neg(%3)
      return out=%4
    }}""".replace("    ", ""))
    mem = plan_of(g, max_num_tokens=4)
    check_plan(g, mem)
    assert mem["aliases"]["2"] in ("%0", "%1")
    assert ("3" in mem["buffers"]) == copies
    feeds, params = random_feeds(g, {"T": 3})
    torch.testing.assert_close(run_in_arena(g, mem, feeds, params), run_graph(g, feeds, params))


def test_heads_of_a_merged_projection_are_views():
    """What merge-projections leaves: split columns of one GEMM, reshaped to heads. The
    split results are strided (row stride 128), yet each reshape is still a view."""
    src = """
    graph @g(%x: f32[T, 64]) {
      param @w: f32[128, 64]
      %0: f32[T, 128] = linear(%x, @w)
      %1: f32[T, 64], %2: f32[T, 32], %3: f32[T, 32] = split(%0) {sizes=[64, 32, 32], dim=-1}
      %4: f32[T, 4, 16] = reshape(%1) {shape=[-1, 4, 16]}
      %5: f32[T, 2, 16] = reshape(%2) {shape=[-1, 2, 16]}
      %6: f32[T, 32] = reshape(%5) {shape=[-1, 32]}
      %7: f32[32*T] = reshape(%3) {shape=[-1]}
      %8: f32[T, 4, 16] = neg(%4)
      %9: f32[T, 32] = add(%6, %2)
      %10: f32[32*T] = neg(%7)
      return a=%8, b=%9, c=%10
    }
    """
    g = parse_graph(src.replace("    ", ""))
    mem = plan_of(g, max_num_tokens=2)
    assert mem["aliases"] == {n: "%0" for n in "123456"}
    assert mem["buffers"] == {"0": [0, 1024], "7": [1024, 256]}       # the flatten is a copy
    feeds, params = random_feeds(g, {"T": 2})
    got, want = run_in_arena(g, mem, feeds, params), run_graph(g, feeds, params)
    torch.testing.assert_close(got, want)


def test_unbounded_symbol_is_an_error():
    src = """
    graph @g(%c: f32[NB, 4]) {
      %0: f32[NB, 4] = neg(%c)
      %1: f32[NB, 4] = neg(%0)
      return out=%1
    }
    """
    with pytest.raises(BrazeError, match="NB has no upper bound"):
        opt_text(src, "plan-memory")


def test_defaults_and_meta_round_trip():
    g = parse_graph("graph @g(%x: f32[T, 2]) {\n  %0: f32[T, 2] = neg(%x)\n  %1: f32[T, 2] = neg(%0)\n"
                    "  return out=%1\n}\n")
    mem = plan_of(g)
    assert mem["bindings"] == {"T": 8192, "S": 256, "MB": 128, "R": 256}
    assert mem["buffers"] == {"0": [0, 8192 * 2 * 4]}
    assert parse_graph(print_graph(g)).meta == g.meta


# -- random DAGs --------------------------------------------------------------------------

def random_dag(data) -> Graph:
    g = Graph("dag")
    pool = [g.add_input("x", TensorType((T, 6), "f32"))]
    if data.draw(st.booleans(), label="second input"):
        pool.append(g.add_input("y", TensorType((T, 3), "f16")))
    draw = lambda s, label=None: data.draw(s, label=label)
    for _ in range(draw(st.integers(1, 28), "nodes")):
        v = draw(st.sampled_from(pool), "operand")
        last = v.type.shape[-1] if v.type.rank else None
        wide = isinstance(last, int) and last >= 2
        kind = draw(st.sampled_from(["unary", "scale", "add", "cat", "sum", "cast", "topk",
                                     "flatten", "unsqueeze", "permute", "slice", "select",
                                     "split", "expand"]), "op")
        floaty = v.type.dtype in ("f32", "f16")
        if kind == "unary" or not floaty:
            new = [g.op(draw(st.sampled_from(["neg", "tanh", "sigmoid"])) if floaty else "neg", v)]
        elif kind == "scale":
            new = [g.op("mul", v, scalar=0.5)]
        elif kind == "add":
            same = [w for w in pool if w.type == v.type]
            new = [g.op("add", v, draw(st.sampled_from(same)))]
        elif kind == "cat":
            fits = [w for w in pool if w.type.dtype == v.type.dtype and w.type.rank == v.type.rank
                    and w.type.shape[:-1] == v.type.shape[:-1] and v.type.rank]
            new = [g.op("cat", v, draw(st.sampled_from(fits)), dim=-1)] if fits else [g.op("neg", v)]
        elif kind == "sum" and v.type.rank:
            new = [g.op("sum", v, dims=[-1], keepdim=True)]
        elif kind == "cast":
            new = [g.op("cast", v, dtype="f16" if v.type.dtype == "f32" else "f32")]
        elif kind == "topk" and wide:
            new = g.add_node("topk", [v], {"k": 2}).results
        elif kind == "flatten":
            new = [g.op("reshape", v, shape=[-1])]
        elif kind == "unsqueeze":
            new = [g.op("unsqueeze", v, dim=0)]
        elif kind == "permute" and v.type.rank >= 2:
            new = [g.op("permute", v, dims=list(range(v.type.rank))[::-1])]
        elif kind == "slice" and wide:
            new = [g.op("slice", v, dim=-1, start=1)]
        elif kind == "select" and wide and v.type.rank >= 2:
            new = [g.op("select", v, dim=-1, index=0)]
        elif kind == "split" and wide:
            new = g.add_node("split", [v], {"sizes": [1, last - 1], "dim": -1}).results
        elif kind == "expand" and last == 1:
            new = [g.op("expand", v, shape=[-1] * (v.type.rank - 1) + [3])]
        else:
            new = [g.op("mul", v, scalar=2.0)]
        pool.extend(new)
    results = [v for v in pool if v.kind == "result"]
    g.set_output("out", results[-1])
    for i, v in enumerate(draw(st.lists(st.sampled_from(results), max_size=2), "outputs")):
        g.set_output(f"extra{i}", v)
    return g


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_random_dags(data):
    g = random_dag(data)
    bound = data.draw(st.integers(1, 12), label="max_num_tokens")
    tokens = data.draw(st.integers(1, bound), label="T at run time")
    mem = plan_of(g, max_num_tokens=bound)
    feeds, params = random_feeds(g, {"T": tokens}, seed=data.draw(st.integers(0, 99)))
    want = run_graph(g, feeds, params)
    for placers in (None, [place_in_order], [place_by_size]):
        if placers:
            mem = plan(g, mem["bindings"], placers)
        check_plan(g, mem)
        got = run_in_arena(g, mem, feeds, params)
        for k in want:
            torch.testing.assert_close(got[k], want[k])


# -- real model graphs ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp_models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def arena_vs_interpreter(g: Graph, params: dict, mem: dict) -> None:
    params = materialize_params(g, params)
    feeds = model_step_feeds(g, cached=(0, 2))                 # T=8 tokens, S=2, MB=4
    want_feeds = {k: v.clone() for k, v in feeds.items()}
    want = run_graph(g, want_feeds, params)
    got = run_in_arena(g, mem, feeds, params)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    for k in feeds:
        torch.testing.assert_close(feeds[k], want_feeds[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pipeline", [["split-segments", "plan-memory"], PIPELINES[2]],
                         ids=["traced", "O2"])
def test_real_graphs_run_in_the_arena(family, pipeline, tmp_models):
    g, params = model_graph(family, tmp_models)
    run_passes(g, pipeline, **SMALL)
    mem = g.meta["memory"]
    assert mem["bindings"] == {"T": 16, "S": 4, "MB": 4, "R": 4}
    check_plan(g, mem)
    assert len(mem["buffers"]) > 10 and mem["returned"] == [g.outputs["logits"].name]
    assert mem["arena_bytes"] < sum(n for _, n in mem["buffers"].values()) / 3   # real reuse
    arena_vs_interpreter(g, params, mem)
    for placer in (place_in_order, place_by_size):      # each heuristic is sound on its own
        alone = plan(g, mem["bindings"], [placer])
        assert check_plan(g, alone) <= mem["arena_bytes"] <= alone["arena_bytes"]


def test_a_broken_plan_is_caught(tmp_models):
    """Move one buffer onto another that is still live: both checks must fail."""
    g, params = model_graph("llama", tmp_models)
    mem = plan_of(g, **SMALL)
    spans = lifetimes(g, mem)
    victim = max(spans, key=lambda n: spans[n][1] - spans[n][0])        # the longest-lived value
    s, e = spans[victim]
    size = mem["buffers"][victim][1]
    intruder = next(n for n, (_, nb) in mem["buffers"].items()     # written while it lives
                    if s < spans[n][0] < e and nb <= size)
    broken = copy.deepcopy(mem)
    broken["buffers"][intruder][0] = mem["buffers"][victim][0]
    with pytest.raises(AssertionError, match="share bytes"):
        check_plan(g, broken)
    with pytest.raises(AssertionError, match="not close"):   # the victim was clobbered
        arena_vs_interpreter(g, params, broken)
    arena_vs_interpreter(g, params, mem)


def test_greedy_by_size_is_skipped_past_its_budget(tmp_models, monkeypatch):
    import braze.passes.plan_memory as pm
    g, _ = model_graph("llama", tmp_models)
    monkeypatch.setattr(pm, "BY_SIZE_BUDGET", 0)
    assert plan_of(g, **SMALL) == plan(g, plan_of(g, **SMALL)["bindings"], [place_in_order])


def test_arena_size_llama_at_8192(tmp_models):
    g, _ = model_graph("llama", tmp_models)
    mem = plan_of(g, max_num_tokens=8192)
    lower_bound = check_plan(g, mem)
    assert mem["arena_bytes"] == lower_bound == 15 * 2**20       # 7.5 live [T, 64] f32 tensors


def _chain_graph(blocks: int):
    """A synthetic graph: a residual stream of `blocks` 8-op blocks with views."""
    lines = ["graph @big(%x: f32[T, 64]) {", "  param @w: f32[128, 64]", "  param @v: f32[64, 64]"]
    res, n = "%x", 0
    for _ in range(blocks):
        body = [f"f32[T, 128] = linear({res}, @w)", "f32[T, 2, 64] = reshape(%{p}) {{shape=[-1, 2, 64]}}",
                "f32[T, 2, 32] = slice(%{p}) {{dim=2, start=32}}", "f32[T, 2, 32] = silu(%{p})",
                "f32[T, 64] = reshape(%{p}) {{shape=[-1, 64]}}", "f32[T, 64] = linear(%{p}, @v)",
                "f32[T, 64] = mul(%{p}) {{scalar=0.5}}", f"f32[T, 64] = add({res}, %{{p}})"]
        for k, rhs in enumerate(body):
            lines.append(f"  %{n}: " + (rhs.format(p=n - 1) if k else rhs))
            n += 1
        res = f"%{n - 1}"
    lines += [f"  return out={res}", "}"]
    return parse_graph("\n".join(lines))


def _calls(fn) -> int:
    """Python and C function calls fn() makes: work counted, not timed."""
    n = 0

    def count(frame, event, arg):
        nonlocal n
        if event in ("call", "c_call"):
            n += 1
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def test_linear_work_on_4000_nodes():
    """plan-memory's work grows linearly with the graph (a quadratic pass was once minutes
    on a real model): 4x the nodes may cost at most 5x the calls (quadratic: 16x)."""
    warm, small, g = _chain_graph(125), _chain_graph(125), _chain_graph(500)
    assert len(g.nodes) == 4000
    plan_memory(warm, PassContext())             # warm caches (sympy) before counting
    work_small = _calls(lambda: plan_memory(small, PassContext()))
    work_big = _calls(lambda: plan_memory(g, PassContext()))
    assert work_big < 5 * work_small, f"{work_big} calls vs {work_small} at a quarter the size"
    mem = g.meta["memory"]
    assert len(mem["buffers"]) == 500 * 5 - 1 and len(mem["aliases"]) == 1500
