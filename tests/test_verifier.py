"""The verifier accepts well-formed graphs and names the problem in malformed ones.

Each test builds a good graph with the builder API, checks it verifies, then
corrupts one thing the way a buggy pass could (editing Values, Nodes and the
node list directly) and checks `verify` raises a BrazeError naming it.
"""

from __future__ import annotations

import pytest

from braze.ir import BrazeError, Graph, MB, NB, S, T, TensorType, parse_graph, print_graph, verify
from braze.ir.graph import Node, Value
from braze.ir.verifier import check


def _good() -> tuple[Graph, dict]:
    """A small decoder-layer-like graph; returns it and its interesting values by name."""
    g = Graph("layer")
    x = g.add_input("x", TensorType((T, 16), "f32"))
    kc = g.add_input("k_cache.0", TensorType((NB, 4, 2, 8), "f32"))
    vc = g.add_input("v_cache.0", TensorType((NB, 4, 2, 8), "f32"))
    slots = g.add_input("slot_mapping", TensorType((T,), "i64"))
    qsl = g.add_input("query_start_loc", TensorType((S + 1,), "i32"))
    lens = g.add_input("seq_lens", TensorType((S,), "i32"))
    bt = g.add_input("block_tables", TensorType((S, MB), "i32"))
    wq = g.add_param("attn.q.weight", TensorType((32, 16), "f32"))
    wkv = g.add_param("attn.kv.weight", TensorType((32, 16), "f32"))
    sq = g.op("mul", x, x)
    ms = g.op("mean", sq, dims=[-1], keepdim=True)
    eps = g.op("add", ms, scalar=1e-06)
    inv = g.op("rsqrt", eps)
    h = g.op("mul", x, inv)
    q = g.op("reshape", g.op("linear", h, wq), shape=[-1, 4, 8])
    kv = g.op("reshape", g.op("linear", h, wkv), shape=[-1, 4, 8])
    k, v = g.add_node("split", [kv], {"sizes": [2, 2], "dim": 1}).results
    write = g.add_node("cache_write", [k, v, kc, vc, slots])
    attn = g.op("paged_attention", q, kc, vc, qsl, lens, bt, scale=0.125)
    vals, idx = g.add_node("topk", [attn], {"k": 3}).results
    out = g.op("reshape", attn, shape=[-1, 32])
    g.set_output("out", out)
    g.set_output("top", vals)
    names = dict(x=x, kc=kc, slots=slots, sq=sq, ms=ms, eps=eps, inv=inv, h=h, q=q, kv=kv, k=k,
                 v=v, attn=attn, vals=vals, idx=idx, out=out, wq=wq)
    nodes = {"n_write": write, "n_topk": vals.producer, "n_mean": ms.producer,
             "n_inv": inv.producer, "n_eps": eps.producer, "n_h": h.producer,
             "n_attn": attn.producer}
    return g, {**names, **nodes}


def _rejects(g: Graph, *fragments: str) -> str:
    with pytest.raises(BrazeError) as e:
        verify(g)
    msg = str(e.value)
    assert msg.startswith(f"graph @{g.name} is malformed: "), msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def test_good_graph_verifies_and_roundtrips():
    g, _ = _good()
    verify(g)
    assert list(check(g)) == []
    g2 = parse_graph(print_graph(g))
    verify(g2)


def test_empty_and_inputs_only_graphs_verify():
    verify(Graph("empty"))
    g = Graph("id")
    x = g.add_input("x", TensorType((T,), "f32"))
    g.set_output("x", x)
    verify(g)


# -- result types -----------------------------------------------------------------

@pytest.mark.parametrize("which, new_type, shown", [
    ("inv", TensorType((T, 1), "f16"), "declared f16[T, 1] but the op gives f32[T, 1]"),
    ("inv", TensorType((T + 1, 1), "f32"), "declared f32[T + 1, 1] but the op gives f32[T, 1]"),
    ("inv", TensorType((T, 16), "f32"), "declared f32[T, 16]"),
    ("inv", TensorType((T,), "f32"), "declared f32[T]"),
    ("attn", TensorType((T, 4, 8), "f16"), "declared f16[T, 4, 8]"),
    ("idx", TensorType((T, 4, 3), "i32"), "declared i32[T, 4, 3] but the op gives i64[T, 4, 3]"),
    ("vals", TensorType((T, 4, 2), "f32"), "but the op gives f32[T, 4, 3]"),
])
def test_wrong_declared_result_type(which, new_type, shown):
    g, v = _good()
    v[which].type = new_type
    msg = _rejects(g, v[which].ref, shown)
    assert "node " in msg


def test_equal_but_differently_written_symbolic_dims_are_accepted():
    g = Graph("g")
    x = g.add_input("x", TensorType((T + 1, 4), "f32"))
    y = g.op("cat", x, x, dim=0)
    assert y.type.shape[0] == 2 * T + 2
    y.type = TensorType((2 * (T + 1), 4), "f32")
    verify(g)


def test_wrong_type_in_parsed_text():
    text = print_graph(_good()[0]).replace("f32[T, 1] = rsqrt", "f32[T, 2] = rsqrt")
    g = parse_graph(text)  # the parser trusts declared types ...
    _rejects(g, "(rsqrt)", "declared f32[T, 2] but the op gives f32[T, 1]")  # ... the verifier not


# -- SSA structure -------------------------------------------------------------------

def test_use_before_def_by_reordering():
    g, v = _good()
    nodes = list(g.nodes)
    i, j = nodes.index(v["n_eps"]), nodes.index(v["n_inv"])
    nodes[i], nodes[j] = nodes[j], nodes[i]
    g.nodes = nodes
    _rejects(g, f"node {i} (rsqrt)", f"operand {v['eps'].ref} is used before it is defined")


def test_use_before_def_node_moved_to_front():
    g, v = _good()
    g.nodes = [v["n_attn"]] + [n for n in g.nodes if n is not v["n_attn"]]
    _rejects(g, "node 0 (paged_attention)", f"{v['q'].ref} is used before it is defined")


def test_operand_from_another_graph():
    g, v = _good()
    other = Graph("other").add_input("x", TensorType((T, 16), "f32"))
    v["n_h"].operands = (other, *v["n_h"].operands[1:])
    _rejects(g, "(mul)", "%x is used before it is defined")


def test_duplicated_result_name():
    g, v = _good()
    v["inv"].name = v["eps"].name
    _rejects(g, "(rsqrt)", f"{v['eps'].ref} is defined twice")


def test_result_named_like_an_input():
    g, v = _good()
    v["sq"].name = "x"
    _rejects(g, "%x is defined twice")


def test_duplicated_input_name():
    g, v = _good()
    g.inputs[1].name = "x"
    _rejects(g, "%x is defined twice")


def test_same_node_twice_in_the_list():
    g, v = _good()
    g.nodes = [*g.nodes, v["n_inv"]]
    _rejects(g, f"{v['inv'].ref} is defined twice")


def test_result_not_pointing_back_at_its_node():
    g, v = _good()
    v["inv"].producer = v["n_eps"]
    _rejects(g, f"result {v['inv'].ref} does not point back at its node")


def test_output_refers_to_undefined_value():
    g, v = _good()
    g.set_output("ghost", Value("999", TensorType((T,), "f32")))
    _rejects(g, "output ghost refers to %999, which is not defined in the graph")


def test_output_refers_to_removed_node():
    g, v = _good()
    g.nodes = [n for n in g.nodes if n is not v["n_topk"]]
    _rejects(g, "output top refers to", "not defined")


# -- writes ----------------------------------------------------------------------------

def test_cache_write_to_a_node_result():
    g = Graph("w")
    k = g.add_input("k", TensorType((T, 2, 8), "f32"))
    kc = g.add_input("k_cache", TensorType((NB, 4, 2, 8), "f32"))
    vc = g.add_input("v_cache", TensorType((NB, 4, 2, 8), "f32"))
    slots = g.add_input("slots", TensorType((T,), "i64"))
    kc2 = g.op("mul", kc, scalar=1.0)
    g.add_node("cache_write", [k, k, kc2, vc, slots])
    _rejects(g, "(cache_write)", f"writes {kc2.ref}, which is not a graph input")


def test_cache_write_to_a_param():
    g = Graph("w")
    k = g.add_input("k", TensorType((T, 2, 8), "f32"))
    kc = g.add_param("cache", TensorType((NB, 4, 2, 8), "f32"))
    vc = g.add_input("v_cache", TensorType((NB, 4, 2, 8), "f32"))
    slots = g.add_input("slots", TensorType((T,), "i64"))
    g.add_node("cache_write", [k, k, vc, kc, slots])
    _rejects(g, "writes @cache, which is not a graph input")


def test_two_nodes_writing_one_cache():
    g, v = _good()
    nodes = list(g.nodes)
    nodes.insert(nodes.index(v["n_attn"]),
                 Node("cache_write", list(v["n_write"].operands), dict(v["n_write"].attrs)))
    g.nodes = nodes
    _rejects(g, "k_cache.0")


def test_cache_read_before_it_is_written():
    g, v = _good()
    nodes = [n for n in g.nodes if n is not v["n_write"]]
    nodes.insert(nodes.index(v["n_attn"]) + 1, v["n_write"])
    g.nodes = nodes
    _rejects(g, "k_cache.0")


# -- arity and attributes ----------------------------------------------------------------

def test_too_many_operands():
    g, v = _good()
    v["n_inv"].operands += (v["eps"],)
    _rejects(g, "(rsqrt)", "op 'rsqrt' takes operands (x), got 2")


def test_too_few_operands():
    g, v = _good()
    v["n_attn"].operands = v["n_attn"].operands[:-1]
    _rejects(g, "(paged_attention)", "takes operands", "got 5")


def test_binary_with_scalar_and_two_operands():
    g, v = _good()
    v["n_eps"].operands += (v["ms"],)
    _rejects(g, "(add)", "takes one tensor operand")


def test_unknown_attribute():
    g, v = _good()
    v["n_inv"].attrs["bogus"] = 1
    _rejects(g, "(rsqrt)", "op 'rsqrt' has no attribute(s) ['bogus']")


def test_missing_required_attribute():
    g, v = _good()
    del v["n_mean"].attrs["dims"]
    _rejects(g, "(mean)", "op 'mean' needs attribute 'dims'")


def test_attribute_that_breaks_inference():
    g, v = _good()
    v["n_mean"].attrs["dims"] = [5]
    _rejects(g, "(mean)", "dim 5 out of range for rank 2")


def test_unknown_op():
    g, v = _good()
    v["n_inv"].op = "frobnicate"
    _rejects(g, "(frobnicate)", "unknown op 'frobnicate'")


def test_wrong_number_of_results():
    g, v = _good()
    del v["n_topk"].results[1]
    _rejects(g, "(topk)", "has 1 results, op gives 2")


def test_operand_types_that_do_not_fit():
    g, v = _good()
    v["n_attn"].operands = (v["x"], *v["n_attn"].operands[1:])   # a 2-D query
    _rejects(g, "(paged_attention)", "does not match cache")


def test_all_problems_are_counted():
    g, v = _good()
    v["n_inv"].attrs["bogus"] = 1
    v["sq"].type = TensorType((T,), "f32")
    g.set_output("ghost", Value("999", TensorType((T,), "f32")))
    problems = list(check(g))
    assert len(problems) >= 3
    _rejects(g, f"(and {len(problems) - 1} more)")


@pytest.mark.parametrize("corrupt", ["gelu", "dup_dims"])
def test_bad_attribute_value_is_a_braze_error(corrupt):
    g, v = _good()
    if corrupt == "gelu":
        v["n_inv"].op = "gelu"
        v["n_inv"].attrs = {"approximate": "bogus"}
    else:
        v["n_mean"].attrs["dims"] = [0, -2]
    _rejects(g)


def test_building_a_node_whose_operands_do_not_fit_names_the_op_and_operands():
    """A pass that builds add(x, y) of [T, 64] and [T, 32] got "shapes [('T', '64'), ('T',
    '32')] do not broadcast", naming neither the op nor the values."""
    from braze.ir import T, TensorType
    g = Graph()
    x = g.add_input("x", TensorType((T, 64), "f32"))
    y = g.add_input("y", TensorType((T, 32), "f32"))
    with pytest.raises(BrazeError) as e:
        g.op("add", x, y)
    msg = str(e.value)
    assert "add(" in msg and "%x: f32[T, 64]" in msg and "%y: f32[T, 32]" in msg, msg
    assert "('T'" not in msg
