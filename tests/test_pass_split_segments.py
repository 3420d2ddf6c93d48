"""split-segments: graph / break / eager segments over the node list, per cudagraph_mode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pass_helpers import (assert_model_pass_preserves, model_graph, opt_text, run_passes,
                          same_text)

from braze.ir import Graph, parse_graph, print_graph
from braze.ir.errors import BrazeError
from braze.ir.types import MB, NB, S, T, TensorType
from braze.passes.manager import PIPELINES
from braze.tiny import FAMILIES, tiny_config

HEADER = ("graph @g(%q: f32[T, 2, 4], %k_cache.0: f32[NB, 16, 2, 4], %v_cache.0: f32[NB, 16, 2, 4], "
          "%query_start_loc: i32[S + 1], %seq_lens: i32[S], %block_tables: i32[S, MB]) {")
CACHE = "%k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables"
BODY = f"""
  %0: f32[T, 2, 4] = mul(%q) {{scalar=2.0}}
  %1: f32[T, 2, 4] = paged_attention(%0, {CACHE}) {{scale=0.5}}
  %2: f32[T, 2, 4] = add(%1, %q)
  %3: f32[T, 2, 4] = paged_attention(%2, {CACHE}) {{scale=0.5}}
  %4: f32[T, 2, 4] = neg(%3)
"""
SRC = HEADER + BODY + "  return out=%4\n}\n"


def expect(meta: str) -> str:
    return HEADER + BODY + f"  meta {{{meta}}}\n  return out=%4\n}}\n"


def test_piecewise_text():
    out = opt_text(SRC, "split-segments", cudagraph_mode="piecewise")
    assert same_text(out, expect(
        'segments=[["graph", 0, 0], ["break", 1, 1], ["graph", 2, 2], ["break", 3, 3], '
        '["graph", 4, 4]], graph_breaks=2, cudagraph_mode="piecewise"'))
    assert same_text(opt_text(SRC, "split-segments"), out)      # piecewise is the default


def test_full_text():
    out = opt_text(SRC, "split-segments", cudagraph_mode="full")
    # one segment, attention included: which batches it serves is the runtime's call, once
    # it has bound the plans (a break op bound as a host-reading torch call refuses it)
    assert same_text(out, expect('segments=[["graph", 0, 4]], graph_breaks=0, '
                                 'cudagraph_mode="full"'))


def test_none_text():
    out = opt_text(SRC, "split-segments", cudagraph_mode="none")
    assert same_text(out, expect('segments=[["eager", 0, 4]], graph_breaks=0, cudagraph_mode="none"'))


def test_adjacent_and_edge_breaks_emit_no_empty_graph_segments():
    src = HEADER + f"""
  %0: f32[T, 2, 4] = paged_attention(%q, {CACHE}) {{scale=0.5}}
  %1: f32[T, 2, 4] = paged_attention(%0, {CACHE}) {{scale=0.5}}
  %2: f32[T, 2, 4] = neg(%1)
  %3: f32[T, 2, 4] = paged_attention(%2, {CACHE}) {{scale=0.5}}
  return out=%3
}}
"""
    out = opt_text(src, "split-segments")
    assert 'meta {segments=[["break", 0, 0], ["break", 1, 1], ["graph", 2, 2], ["break", 3, 3]], ' \
           'graph_breaks=3, cudagraph_mode="piecewise"}' in out


def test_meta_round_trips_and_rerun_replaces_it():
    g = parse_graph(SRC)
    g.meta["full_capture"] = "decode-only"          # what earlier versions recorded
    run_passes(g, ["split-segments"], cudagraph_mode="full")
    assert g.meta["cudagraph_mode"] == "full" and "full_capture" not in g.meta
    run_passes(g, ["split-segments"], cudagraph_mode="piecewise")
    assert g.meta["cudagraph_mode"] == "piecewise"
    assert print_graph(parse_graph(print_graph(g))) == print_graph(g)


def test_empty_graph_and_unknown_mode():
    g = parse_graph("graph @g(%x: f32[T]) {\n  return out=%x\n}\n")
    _, ctx = run_passes(g, ["split-segments"])
    assert g.meta["segments"] == [] and g.meta["graph_breaks"] == 0
    with pytest.raises(BrazeError, match="cudagraph_mode must be one of"):
        opt_text(SRC, "split-segments", cudagraph_mode="sometimes")


def chain_graph(kinds: list[bool]) -> Graph:
    """A chain of ops; True = paged_attention (a graph break), False = neg."""
    g = Graph("chain")
    x = g.add_input("q", TensorType((T, 2, 4), "f32"))
    kc = g.add_input("k_cache.0", TensorType((NB, 16, 2, 4), "f32"))
    vc = g.add_input("v_cache.0", TensorType((NB, 16, 2, 4), "f32"))
    meta = [g.add_input("query_start_loc", TensorType((S + 1,), "i32")),
            g.add_input("seq_lens", TensorType((S,), "i32")),
            g.add_input("block_tables", TensorType((S, MB), "i32"))]
    for brk in kinds:
        x = g.op("paged_attention", x, kc, vc, *meta, scale=0.5) if brk else g.op("neg", x)
    g.set_output("out", x)
    return g


def check_segments(g: Graph, mode: str) -> None:
    segs = g.meta["segments"]
    covered = [i for _, a, b in segs for i in range(a, b + 1)]
    assert covered == list(range(len(g.nodes)))                  # every node once, in order
    assert all(a <= b for _, a, b in segs)                         # no empty segment
    breaks = [i for i, n in enumerate(g.nodes) if n.opdef.graph_break]
    if mode == "piecewise":
        assert [a for k, a, b in segs if k == "break"] == breaks
        assert all(a == b for k, a, b in segs if k == "break")
        assert {k for k, _, _ in segs} <= {"graph", "break"}
        for x, y in zip(segs, segs[1:]):                           # graph runs are maximal
            assert not (x[0] == y[0] == "graph")
        assert g.meta["graph_breaks"] == len(breaks)
    else:
        assert [k for k, _, _ in segs] == ([{"full": "graph", "none": "eager"}[mode]]
                                           if g.nodes else [])
        assert g.meta["graph_breaks"] == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=24),
       st.sampled_from(["piecewise", "full", "none"]))
def test_segments_cover_every_node_once(kinds, mode):
    g = chain_graph(kinds)
    before = print_graph(g)
    _, ctx = run_passes(g, ["split-segments"], cudagraph_mode=mode)
    check_segments(g, mode)
    after = print_graph(g)
    assert [ln for ln in after.splitlines() if not ln.strip().startswith("meta")] == \
        before.splitlines()                                        # nodes untouched
    assert parse_graph(after).meta == g.meta                       # printable and parseable


@pytest.fixture(scope="module")
def tmp_models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["piecewise", "full", "none"])
def test_real_graphs(family, mode, tmp_models):
    g, params = model_graph(family, tmp_models)
    layers = tiny_config(family).num_hidden_layers
    if mode == "piecewise":       # the pass only records meta; running one mode is enough
        assert_model_pass_preserves(g, params, ["split-segments"], cudagraph_mode=mode)
    else:
        before = print_graph(g)
        run_passes(g, ["split-segments"], cudagraph_mode=mode)
        assert print_graph(g).startswith(before.rsplit("  return", 1)[0])
    check_segments(g, mode)
    if mode == "piecewise":
        assert g.meta["graph_breaks"] == layers
        assert len(g.meta["segments"]) == 2 * layers + 1           # graph, (break, graph) * layers


@pytest.mark.parametrize("family", FAMILIES)
def test_real_graphs_at_O2(family, tmp_models):
    """After the whole -O2 pipeline the breaks are the kernel-form `attention` ops
    (graph_break in their registry entry), one per layer."""
    g, params = model_graph(family, tmp_models)
    layers = tiny_config(family).num_hidden_layers
    assert_model_pass_preserves(g, params, PIPELINES[2])
    check_segments(g, "piecewise")
    assert g.meta["graph_breaks"] == layers
    # MLA families (DeepSeek-V3) break at their absorbed latent kernel instead
    kernel = "latent_attention" if tiny_config(family).model_type == "deepseek_v3" else "attention"
    assert [g.nodes[a].op for k, a, _ in g.meta["segments"] if k == "break"] == [kernel] * layers
