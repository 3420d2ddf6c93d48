"""merge-projections: linears on one input -> one linear over cat'd weights + split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir import Graph, TensorType, T, parse_graph, print_graph, verify
from braze.passes import PassContext, get_pass
from pass_helpers import (assert_model_pass_preserves, assert_pass_preserves, model_graph,
                          opt_text, refusal_reasons, run_passes, same_text)

QKV = """
graph @g(%x: f32[T, 8]) {
  param @a.q_proj.weight: f32[8, 8]
  param @a.k_proj.weight: f32[4, 8]
  param @a.v_proj.weight: f32[4, 8]
  %0: f32[T, 8] = neg(%x)
  %1: f32[T, 8] = linear(%0, @a.q_proj.weight)
  %2: f32[T, 8] = relu(%1)
  %3: f32[T, 4] = linear(%0, @a.k_proj.weight)
  %4: f32[T, 4] = linear(%0, @a.v_proj.weight)
  %5: f32[T, 4] = add(%3, %4)
  return q=%2, kv=%5, v=%4
}
"""


def test_qkv_merge_exact_text():
    out = opt_text(QKV, "merge-projections")
    assert same_text(out, """
graph @g(%x: f32[T, 8]) {
  param @a.q_proj.weight: f32[8, 8]
  param @a.k_proj.weight: f32[4, 8]
  param @a.v_proj.weight: f32[4, 8]
  param @a.qkv_proj.weight: f32[16, 8] = cat(@a.q_proj.weight, @a.k_proj.weight, @a.v_proj.weight) {dim=0}
  %0: f32[T, 8] = neg(%x)
  %6: f32[T, 16] = linear(%0, @a.qkv_proj.weight)
  %7: f32[T, 8], %8: f32[T, 4], %9: f32[T, 4] = split(%6) {sizes=[8, 4, 4], dim=-1}
  %2: f32[T, 8] = relu(%7)
  %5: f32[T, 4] = add(%8, %9)
  return q=%2, kv=%5, v=%9
}
"""), out
    # the printed text, derived param included, parses back to the same text
    assert print_graph(parse_graph(out)) == out


def test_gate_up_with_biases_exact_text():
    out = opt_text("""
graph @g(%x: f32[T, 4]) {
  param @m.mlp.gate_proj.weight: f32[6, 4]
  param @m.mlp.gate_proj.bias: f32[6]
  param @m.mlp.up_proj.weight: f32[6, 4]
  param @m.mlp.up_proj.bias: f32[6]
  %0: f32[T, 6] = linear(%x, @m.mlp.gate_proj.weight, @m.mlp.gate_proj.bias)
  %1: f32[T, 6] = silu(%0)
  %2: f32[T, 6] = linear(%x, @m.mlp.up_proj.weight, @m.mlp.up_proj.bias)
  %3: f32[T, 6] = mul(%1, %2)
  return y=%3
}
""", "merge-projections")
    assert same_text(out, """
graph @g(%x: f32[T, 4]) {
  param @m.mlp.gate_proj.weight: f32[6, 4]
  param @m.mlp.gate_proj.bias: f32[6]
  param @m.mlp.up_proj.weight: f32[6, 4]
  param @m.mlp.up_proj.bias: f32[6]
  param @m.mlp.gate_up_proj.weight: f32[12, 4] = cat(@m.mlp.gate_proj.weight, @m.mlp.up_proj.weight) {dim=0}
  param @m.mlp.gate_up_proj.bias: f32[12] = cat(@m.mlp.gate_proj.bias, @m.mlp.up_proj.bias) {dim=0}
  %4: f32[T, 12] = linear(%x, @m.mlp.gate_up_proj.weight, @m.mlp.gate_up_proj.bias)
  %5: f32[T, 6], %6: f32[T, 6] = split(%4) {sizes=[6, 6], dim=-1}
  %1: f32[T, 6] = silu(%5)
  %3: f32[T, 6] = mul(%1, %6)
  return y=%3
}
"""), out


def test_generic_name_keeps_schedule_order_and_3d_input():
    out = opt_text("""
graph @g(%x: f32[T, 2, 4]) {
  param @blk.up_proj.weight: f32[3, 4]
  param @blk.gate_proj.weight: f32[5, 4]
  param @blk.other.weight: f32[2, 4]
  %0: f32[T, 2, 3] = linear(%x, @blk.up_proj.weight)
  %1: f32[T, 2, 5] = linear(%x, @blk.gate_proj.weight)
  %2: f32[T, 2, 2] = linear(%x, @blk.other.weight)
  return a=%0, b=%1, c=%2
}
""", "merge-projections")
    assert same_text(out, """
graph @g(%x: f32[T, 2, 4]) {
  param @blk.up_proj.weight: f32[3, 4]
  param @blk.gate_proj.weight: f32[5, 4]
  param @blk.other.weight: f32[2, 4]
  param @blk.merged_up_proj_gate_proj_other.weight: f32[10, 4] = cat(@blk.up_proj.weight, @blk.gate_proj.weight, @blk.other.weight) {dim=0}
  %3: f32[T, 2, 10] = linear(%x, @blk.merged_up_proj_gate_proj_other.weight)
  %4: f32[T, 2, 3], %5: f32[T, 2, 5], %6: f32[T, 2, 2] = split(%3) {sizes=[3, 5, 2], dim=-1}
  return a=%4, b=%5, c=%6
}
"""), out


def test_merged_name_collision_gets_a_suffix():
    g = parse_graph("""
graph @g(%x: f32[T, 4]) {
  param @p.q_proj.weight: f32[2, 4]
  param @p.k_proj.weight: f32[2, 4]
  param @p.v_proj.weight: f32[2, 4]
  param @p.qkv_proj.weight: f32[6, 4]
  %0: f32[T, 2] = linear(%x, @p.q_proj.weight)
  %1: f32[T, 2] = linear(%x, @p.k_proj.weight)
  %2: f32[T, 2] = linear(%x, @p.v_proj.weight)
  %3: f32[T, 6] = linear(%x, @p.qkv_proj.weight)
  return a=%0, b=%1, c=%2, d=%3
}
""")
    run_passes(g, ["merge-projections"])
    assert "p.merged_q_proj_k_proj_v_proj_qkv_proj.weight" in g.params
    assert g.op_counts() == {"linear": 1, "split": 1}


def test_different_inputs_never_merge():
    text = """
graph @g(%x: f32[T, 4], %y: f32[T, 4]) {
  param @a.q_proj.weight: f32[2, 4]
  param @a.k_proj.weight: f32[2, 4]
  %0: f32[T, 2] = linear(%x, @a.q_proj.weight)
  %1: f32[T, 2] = linear(%y, @a.k_proj.weight)
  return a=%0, b=%1
}
"""
    assert refusal_reasons(text, "merge-projections") == []


def test_lone_linear_is_left_alone_silently():
    text = "graph @g(%x: f32[T, 4]) {\n  param @r.gate.weight: f32[2, 4]\n" \
           "  %0: f32[T, 2] = linear(%x, @r.gate.weight)\n  return y=%0\n}\n"
    g, ctx = run_passes(parse_graph(text), ["merge-projections"])
    assert print_graph(g) == text and not ctx.refusals


def test_computed_weight_is_refused_and_the_rest_merge():
    g, ctx = run_passes(parse_graph("""
graph @g(%x: f32[T, 4]) {
  param @a.q_proj.weight: f32[2, 4]
  param @a.k_proj.weight: f32[2, 4]
  param @a.v_proj.weight: f32[2, 4]
  %w: f32[2, 4] = neg(@a.k_proj.weight)
  %0: f32[T, 2] = linear(%x, @a.q_proj.weight)
  %1: f32[T, 2] = linear(%x, %w)
  %2: f32[T, 2] = linear(%x, @a.v_proj.weight)
  return a=%0, b=%1, c=%2
}
"""), ["merge-projections"])
    assert g.op_counts() == {"linear": 2, "neg": 1, "split": 1}
    assert "a.merged_q_proj_v_proj.weight" in g.params
    (r,) = ctx.refusals
    assert r.pass_name == "merge-projections" and "%w is computed" in r.reason


def test_only_one_param_weight_is_refused():
    text = """
graph @g(%x: f32[T, 4]) {
  param @a.q_proj.weight: f32[2, 4]
  %w: f32[2, 4] = neg(@a.q_proj.weight)
  %0: f32[T, 2] = linear(%x, @a.q_proj.weight)
  %1: f32[T, 2] = linear(%x, %w)
  return a=%0, b=%1
}
"""
    reasons = refusal_reasons(text, "merge-projections")
    assert len(reasons) == 2
    assert "weight %w is computed in the graph" in reasons[0]
    assert "the only linear on %x with param weights; nothing to merge it with" in reasons[1]


def test_bias_mismatch_is_refused():
    text = """
graph @g(%x: f32[T, 4]) {
  param @a.q_proj.weight: f32[2, 4]
  param @a.q_proj.bias: f32[2]
  param @a.k_proj.weight: f32[2, 4]
  %0: f32[T, 2] = linear(%x, @a.q_proj.weight, @a.q_proj.bias)
  %1: f32[T, 2] = linear(%x, @a.k_proj.weight)
  return a=%0, b=%1
}
"""
    reasons = refusal_reasons(text, "merge-projections")
    assert len(reasons) == 2
    assert "has a bias and the other linears on %x do not" in reasons[0]
    assert "has no bias and the other linears on %x do" in reasons[1]


def test_computed_bias_is_refused():
    text = """
graph @g(%x: f32[T, 4]) {
  param @a.q_proj.weight: f32[2, 4]
  param @a.k_proj.weight: f32[2, 4]
  param @a.b: f32[2]
  %b: f32[2] = neg(@a.b)
  %0: f32[T, 2] = linear(%x, @a.q_proj.weight, %b)
  %1: f32[T, 2] = linear(%x, @a.k_proj.weight, @a.b)
  return a=%0, b=%1
}
"""
    assert any("bias %b is computed" in r for r in refusal_reasons(text, "merge-projections"))


def test_dtype_mismatch_is_refused():
    # A verified graph cannot hold it (linear wants one dtype), so build it unverified:
    # the pass must still refuse rather than concatenate f16 with f32.
    g = Graph("g")
    x = g.add_input("x", TensorType((T, 4), "f32"))
    w1 = g.add_param("a.q_proj.weight", TensorType((2, 4), "f32"))
    w2 = g.add_param("a.k_proj.weight", TensorType((2, 4), "f16"))
    g.set_output("a", g.add_node("linear", [x, w1], types=[TensorType((T, 2), "f32")]).results[0])
    g.set_output("b", g.add_node("linear", [x, w2], types=[TensorType((T, 2), "f32")]).results[0])
    before = print_graph(g)
    ctx = PassContext()
    assert get_pass("merge-projections").fn(g, ctx) == 0
    assert print_graph(g) == before
    assert any("weight is f16, the other linears on %x are f32" in r.reason for r in ctx.refusals)


def test_rerun_is_a_no_op():
    once = opt_text(QKV, "merge-projections")
    assert opt_text(once, "merge-projections") == once


@settings(max_examples=40, deadline=None)
@given(outs=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       bias=st.lists(st.booleans(), min_size=4, max_size=4),
       computed=st.lists(st.booleans(), min_size=4, max_size=4),
       other_input=st.lists(st.booleans(), min_size=4, max_size=4),
       use_as_output=st.booleans(), t=st.integers(1, 5), seed=st.integers(0, 10))
def test_equivalent_on_random_values(outs, bias, computed, other_input, use_as_output, t, seed):
    d = 6
    params, lines, rets = [], [], []
    for i, o in enumerate(outs):
        params.append(f"  param @b.p{i}.weight: f32[{o}, {d}]")
        w = f"@b.p{i}.weight"
        if computed[i]:
            lines.append(f"  %w{i}: f32[{o}, {d}] = mul(@b.p{i}.weight) {{scalar=0.5}}")
            w = f"%w{i}"
        args = ["%y" if other_input[i] else "%h", w]
        if bias[i]:
            params.append(f"  param @b.p{i}.bias: f32[{o}]")
            args.append(f"@b.p{i}.bias")
        lines.append(f"  %l{i}: f32[T, {o}] = linear({', '.join(args)})")
        lines.append(f"  %r{i}: f32[T, {o}] = tanh(%l{i})")
        rets.append(f"r{i}=%r{i}")
        if use_as_output and i == 0:
            rets.append(f"raw{i}=%l{i}")
    text = (f"graph @g(%x: f32[T, {d}], %y: f32[T, {d}]) {{\n" + "\n".join(params) +
            f"\n  %h: f32[T, {d}] = neg(%x)\n" + "\n".join(lines) +
            f"\n  return {', '.join(rets)}\n}}\n")
    after = assert_pass_preserves(text, ["merge-projections"], {"T": t}, seed=seed)
    # nothing reads the old linears any more: each input keeps one linear per mergeable class
    classes = {(other_input[i], bias[i]) for i in range(len(outs)) if not computed[i]}
    n_computed = sum(computed[:len(outs)])
    assert after.op_counts()["linear"] == len(classes) + n_computed


@pytest.mark.parametrize("family,overrides,merges_per_layer", [
    ("llama", {}, [2, 2]),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}, [2, 2]),
    ("mistral", {}, [2, 2]),
    ("qwen3", {}, [2, 2]),
    ("mixtral", {}, [1, 1, 1]),           # the router is alone on its input; experts are einsums
    ("qwen3_moe", {}, [1, 2, 1]),         # mlp_only_layers=[1]: a dense middle layer
])
def test_real_graphs(family, overrides, merges_per_layer, tmp_path_factory):
    g, params = model_graph(family, tmp_path_factory.mktemp("m"), **overrides)
    linears = g.op_counts()["linear"]
    n = get_pass("merge-projections").fn(parse_graph(print_graph(g)), PassContext())
    assert n == sum(merges_per_layer)
    g = assert_model_pass_preserves(g, params, ["merge-projections"])
    counts = g.op_counts()
    merged = sum(merges_per_layer)
    dense = sum(1 for m in merges_per_layer if m == 2)
    # qkv: 3 linears -> 1, gate/up: 2 -> 1
    assert counts["linear"] == linears - 2 * len(merges_per_layer) - dense
    assert counts["split"] == merged
    for i, m in enumerate(merges_per_layer):
        assert f"model.layers.{i}.self_attn.qkv_proj.weight" in g.params
        assert (f"model.layers.{i}.mlp.gate_up_proj.weight" in g.params) == (m == 2)
        if overrides.get("attention_bias"):
            assert f"model.layers.{i}.self_attn.qkv_proj.bias" in g.params
    # the routers stay single linears on their own
    assert all(f"model.layers.{i}.mlp.gate.weight" in g.params
               for i, m in enumerate(merges_per_layer) if m == 1)
    text = print_graph(g)
    back = parse_graph(text)
    verify(back)
    assert print_graph(back) == text
    assert sum(p.recipe is not None for p in back.params.values()) == \
        merged + (len(merges_per_layer) * 2 if overrides.get("attention_bias") else 0)
