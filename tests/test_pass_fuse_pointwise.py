"""fuse-pointwise: connected pointwise ops and row reductions -> one `fused_pointwise` op."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from braze.ir import BrazeError, Graph, T, TensorType, parse_graph, print_graph, run_graph, verify
from braze.ir.op_pointwise_group import parse_body
from pass_helpers import (assert_model_pass_preserves, materialize_params, model_graph, opt_text,
                          pointwise_graphs, random_feeds, run_passes, same_text)


def fuse(text: str):
    """Run the pass on IR text: (text after, refusal reasons)."""
    g = parse_graph(textwrap.dedent(text))
    verify(g)
    g, ctx = run_passes(g, ["fuse-pointwise"])
    return print_graph(g), [r.reason for r in ctx.refusals]


def bodies(text: str) -> list[str]:
    return [n.attrs["body"] for n in parse_graph(text).nodes if n.op == "fused_pointwise"]


# -- IR text in, IR text out ----------------------------------------------------------------------

def test_chain_of_three_becomes_one_op():
    out = opt_text("""
        graph @g(%x: f32[T, 8], %y: f32[T, 8]) {
          %0: f32[T, 8] = add(%x, %y)
          %1: f32[T, 8] = silu(%0)
          %2: f32[T, 8] = mul(%1) {scalar=0.5}
          return out=%2
        }
        """, "fuse-pointwise")
    assert same_text(out, r"""
        graph @g(%x: f32[T, 8], %y: f32[T, 8]) {
          %2: f32[T, 8] = fused_pointwise(%x, %y) {body="graph @group(%in0: f32[T, 8], %in1: f32[T, 8]) {\n  %0: f32[T, 8] = add(%in0, %in1)\n  %1: f32[T, 8] = silu(%0)\n  %2: f32[T, 8] = mul(%1) {scalar=0.5}\n  return out0=%2\n}\n"}
          return out=%2
        }
        """), out
    assert bodies(out)[0] == textwrap.dedent("""\
        graph @group(%in0: f32[T, 8], %in1: f32[T, 8]) {
          %0: f32[T, 8] = add(%in0, %in1)
          %1: f32[T, 8] = silu(%0)
          %2: f32[T, 8] = mul(%1) {scalar=0.5}
          return out0=%2
        }
        """)


RESIDUAL_NORM = """
graph @g(%h: f32[T, 64], %attn: f32[T, 64]) {
  param @w: f32[64]
  param @gate: f32[128, 64]
  %43: f32[T, 64] = add(%h, %attn)
  %44: f32[T, 64] = cast(%43) {dtype="f32"}
  %45: f32[T, 64] = pow(%44) {scalar=2}
  %46: f32[T, 1] = mean(%45) {dims=[-1], keepdim=true}
  %47: f32[T, 1] = add(%46) {scalar=1e-06}
  %48: f32[T, 1] = rsqrt(%47)
  %49: f32[T, 64] = mul(%44, %48)
  %50: f32[T, 64] = cast(%49) {dtype="f32"}
  %51: f32[T, 64] = mul(@w, %50)
  %52: f32[T, 128] = linear(%51, @gate)
  return y=%52, residual=%43
}
"""


def test_residual_add_and_rmsnorm_are_one_row_kernel():
    """The mean sits in the middle of the group; the residual is a second output; the weight
    (a param) becomes an operand; results keep their names."""
    out = opt_text(RESIDUAL_NORM, "fuse-pointwise")
    body = ("graph @group(%in0: f32[T, 64], %in1: f32[T, 64], %in2: f32[64]) {\\n"
            "  %0: f32[T, 64] = add(%in0, %in1)\\n"
            "  %1: f32[T, 64] = cast(%0) {dtype=\\\"f32\\\"}\\n"
            "  %2: f32[T, 64] = pow(%1) {scalar=2}\\n"
            "  %3: f32[T, 1] = mean(%2) {dims=[-1], keepdim=true}\\n"
            "  %4: f32[T, 1] = add(%3) {scalar=1e-06}\\n"
            "  %5: f32[T, 1] = rsqrt(%4)\\n"
            "  %6: f32[T, 64] = mul(%1, %5)\\n"
            "  %7: f32[T, 64] = cast(%6) {dtype=\\\"f32\\\"}\\n"
            "  %8: f32[T, 64] = mul(%in2, %7)\\n"
            "  return out0=%0, out1=%8\\n}\\n")
    assert same_text(out, f"""
        graph @g(%h: f32[T, 64], %attn: f32[T, 64]) {{
          param @w: f32[64]
          param @gate: f32[128, 64]
          %43: f32[T, 64], %51: f32[T, 64] = fused_pointwise(%h, %attn, @w) {{body="{body}"}}
          %52: f32[T, 128] = linear(%51, @gate)
          return y=%52, residual=%43
        }}
        """), out


def test_swiglu_after_merged_projection():
    out, why = fuse("""
        graph @g(%x: f32[T, 64]) {
          param @gate_up: f32[256, 64]
          %0: f32[T, 256] = linear(%x, @gate_up)
          %1: f32[T, 128], %2: f32[T, 128] = split(%0) {sizes=[128, 128], dim=-1}
          %3: f32[T, 128] = silu(%1)
          %4: f32[T, 128] = mul(%3, %2)
          return y=%4
        }
        """)
    assert "%4: f32[T, 128] = fused_pointwise(%1, %2)" in out and why == []
    assert "silu(%in0)" in bodies(out)[0] and "mul(%0, %in1)" in bodies(out)[0]


def test_path_out_of_the_group_and_back_in_cuts_it():
    """exp -> linear -> add and exp -> add: exp and add in one op would need the linear inside."""
    out, why = fuse("""
        graph @g(%x: f32[T, 8]) {
          param @w: f32[8, 8]
          %0: f32[T, 8] = exp(%x)
          %1: f32[T, 8] = linear(%0, @w)
          %2: f32[T, 8] = add(%0, %1)
          %3: f32[T, 8] = mul(%2, %x)
          return y=%3
        }
        """)
    assert same_text(out, r"""
        graph @g(%x: f32[T, 8]) {
          param @w: f32[8, 8]
          %0: f32[T, 8] = exp(%x)
          %1: f32[T, 8] = linear(%0, @w)
          %3: f32[T, 8] = fused_pointwise(%0, %1, %x) {body="graph @group(%in0: f32[T, 8], %in1: f32[T, 8], %in2: f32[T, 8]) {\n  %0: f32[T, 8] = add(%in0, %in1)\n  %1: f32[T, 8] = mul(%0, %in2)\n  return out0=%1\n}\n"}
          return y=%3
        }
        """), out
    assert why == ["not joined with the group of %0 (exp): %0 is read by linear (%1) before %2, "
                   "and the fused op would sit after that reader"]


def test_reader_between_members_cuts_the_group():
    """A reader of a member that runs before the last member would see an undefined value."""
    out, why = fuse("""
        graph @g(%x: f32[T, 8]) {
          %0: f32[T, 8] = exp(%x)
          %1: f32[T, 2, 4] = reshape(%0) {shape=[-1, 2, 4]}
          %2: f32[T, 8] = neg(%0)
          %3: f32[T, 8] = tanh(%2)
          return a=%1, b=%3
        }
        """)
    assert "%0: f32[T, 8] = exp(%x)" in out
    assert "%3: f32[T, 8] = fused_pointwise(%0)" in out and "reshape(%0)" in out
    assert "reshape (%1) before %2" in why[0]


def test_shapes_without_a_common_space_split_the_group():
    out, why = fuse("""
        graph @g(%x: f32[T, 1], %y: f32[T, 8], %z: f32[T, 4]) {
          %0: f32[T, 1] = exp(%x)
          %1: f32[T, 8] = mul(%0, %y)
          %2: f32[T, 4] = mul(%0, %z)
          %3: f32[T, 4] = neg(%2)
          return a=%1, b=%3
        }
        """)
    assert "%0: f32[T, 1], %1: f32[T, 8] = fused_pointwise(%x, %y)" in out
    assert "%3: f32[T, 4] = fused_pointwise(%0, %z)" in out
    assert why == ["not joined with the group of %1 (mul): shapes [T, 4] and [T, 8] have no "
                   "common iteration space"]


def test_softmax_math_is_one_row_kernel_in_float16():
    out, why = fuse("""
        graph @g(%x: f16[T, 8]) {
          %0: f16[T, 1] = amax(%x) {dims=[-1], keepdim=true}
          %1: f16[T, 8] = sub(%x, %0)
          %2: f16[T, 8] = exp(%1)
          %3: f16[T, 1] = sum(%2) {dims=[-1], keepdim=true}
          %4: f16[T, 8] = div(%2, %3)
          return p=%4
        }
        """)
    assert [n.op for n in parse_graph(out).nodes] == ["fused_pointwise"] and why == []
    assert parse_body(bodies(out)[0]).space.row


@pytest.mark.parametrize("text, reason", [
    # a reduction over another dim is not a row reduction
    ("""graph @g(%x: f32[T, 8]) {
          %0: f32[T, 8] = exp(%x)
          %1: f32[1, 8] = sum(%0) {dims=[0], keepdim=true}
          return y=%1
        }""", "only a reduction over the last dim fuses"),
    # a row of symbolic length has no fixed block
    ("""graph @g(%x: f32[4, T]) {
          %0: f32[4, T] = exp(%x)
          %1: f32[4, 1] = sum(%0) {dims=[-1], keepdim=true}
          return y=%1
        }""", "symbolic length"),
    # the reduced value would broadcast along columns: keepdim=false results are outputs only
    ("""graph @g(%x: f32[8, 8]) {
          %0: f32[8] = sum(%x) {dims=[1]}
          %1: f32[8, 8] = mul(%0, %x)
          return y=%1
        }""", "keepdim=false"),
    # a row reduction and a wider value cannot share a row kernel
    ("""graph @g(%x: f32[T, 8], %y: f32[4, T, 8]) {
          %0: f32[T, 1] = mean(%x) {dims=[-1], keepdim=true}
          %1: f32[4, T, 8] = mul(%0, %y)
          return y=%1
        }""", "a reduction over rows of [T, 8] cannot share a kernel with values of shape [4, T, 8]"),
    # no computation moves across a node that writes state
    ("""graph @g(%x: f32[T, 2, 4], %v: f32[T, 2, 4], %k_cache.0: f32[NB, 4, 2, 4], %v_cache.0: f32[NB, 4, 2, 4], %slot_mapping: i64[T]) {
          %0: f32[T, 2, 4] = neg(%x)
          cache_write(%x, %v, %k_cache.0, %v_cache.0, %slot_mapping)
          %1: f32[T, 2, 4] = exp(%0)
          return y=%1
        }""", "cache_write runs in between and writes state"),
])
def test_near_misses_are_left_alone_and_explained(text, reason):
    out, why = fuse(text)
    assert "fused_pointwise" not in out
    assert same_text(out, text)
    assert any(reason in w for w in why), why


def test_keepdim_false_reduction_may_end_a_group():
    out, why = fuse("""
        graph @g(%x: f32[T, 8]) {
          %0: f32[T, 8] = mul(%x, %x)
          %1: f32[T] = sum(%0) {dims=[-1]}
          return y=%1
        }
        """)
    assert "%1: f32[T] = fused_pointwise(%x)" in out and why == []


@pytest.mark.parametrize("text", [
    "graph @g(%x: f32[T, 4]) {\n  %0: f32[T, 4] = neg(%x)\n  return y=%0\n}\n",      # one op
    "graph @g(%x: f32[T, 4]) {\n  %0: f32[T, 4] = neg(%x)\n  %1: f32[T, 4] = exp(%0)\n"
    "  return y=%x\n}\n",                                                               # dead
    "graph @g(%x: f32[T, 4]) {\n  %0: f32[T, 4] = neg(%x)\n  %1: f32[T, 4] = exp(%x)\n"
    "  return a=%0, b=%1\n}\n",                                         # siblings only share an input
])
def test_nothing_to_fuse_leaves_the_text_unchanged(text):
    assert fuse(text) == (text, [])


def test_same_group_prints_the_same_body_and_a_second_run_changes_nothing():
    two = """
        graph @g(%a: f32[T, 8], %b: f32[T, 8], %c: f32[T, 8], %d: f32[T, 8]) {
          %0: f32[T, 8] = add(%a, %b)
          %1: f32[T, 8] = tanh(%0)
          %2: f32[T, 8] = add(%c, %d)
          %3: f32[T, 8] = tanh(%2)
          return y=%1, z=%3
        }
        """
    out = opt_text(two, "fuse-pointwise")
    assert len(set(bodies(out))) == 1 and len(bodies(out)) == 2
    assert opt_text(out, "fuse-pointwise") == out
    assert opt_text(RESIDUAL_NORM, "fuse-pointwise") == opt_text(RESIDUAL_NORM, "fuse-pointwise")


# -- the op --------------------------------------------------------------------------------------

BODY = ("graph @group(%in0: f32[T, 4], %in1: f32[4]) {\n"
        "  %0: f32[T, 4] = mul(%in0, %in1)\n  %1: f32[T, 1] = mean(%0) {dims=[-1], keepdim=true}\n"
        "  return out0=%0, out1=%1\n}\n")


def test_fused_op_infers_checks_and_runs_its_body():
    g = Graph("g")
    x, w = g.add_input("x", TensorType((T, 4), "f32")), g.add_param("w", TensorType((4,), "f32"))
    node = g.add_node("fused_pointwise", [x, w], {"body": BODY})
    assert [r.type for r in node.results] == [TensorType((T, 4), "f32"), TensorType((T, 1), "f32")]
    g.set_output("a", node.results[0])
    g.set_output("b", node.results[1])
    verify(g)
    hits = parse_body.cache_info().hits
    verify(g)
    assert parse_body.cache_info().hits > hits          # parsed once per text
    xv, wv = torch.randn(3, 4), torch.randn(4)
    out = run_graph(g, {"x": xv}, {"w": wv})
    assert torch.equal(out["a"], xv * wv) and torch.equal(out["b"], (xv * wv).mean(-1, keepdim=True))
    with pytest.raises(BrazeError, match="operand 1 is f16"):
        g.add_node("fused_pointwise", [x, g.add_param("h", TensorType((4,), "f16"))], {"body": BODY})
    with pytest.raises(BrazeError, match="3 operands, its body takes 2"):
        g.add_node("fused_pointwise", [x, w, x], {"body": BODY})


@pytest.mark.parametrize("body, match", [
    (BODY.replace("mul(%in0, %in1)", "linear(%in0, %in1)").replace("%in1: f32[4]", "%in1: f32[4, 4]"),
     "neither pointwise nor a row reduction"),
    (BODY.replace("graph @group(%in0: f32[T, 4], %in1: f32[4]) {\n",
                  "graph @group(%in0: f32[T, 4]) {\n  param @in1: f32[4]\n").replace("%in1", "@in1"),
     "weights must be operands"),
    (BODY.replace("f32[T, 1] = mean", "f32[T, 4] = mean"), "declared"),
])
def test_bad_bodies_are_refused(body, match):
    g = Graph("g")
    x = g.add_input("x", TensorType((T, 4), "f32"))
    with pytest.raises(BrazeError, match=match):
        g.add_node("fused_pointwise", [x, x], {"body": body})


# -- equivalence on random pointwise DAGs ---------------------------------------------------------

UNARY = ["neg", "tanh", "sigmoid", "silu", "abs", "relu", "sin", "cos", "exp"]
BINARY = ["add", "sub", "mul", "maximum", "minimum", "div"]


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pointwise_graphs(UNARY, BINARY, ["add", "sub", "mul", "div", "pow"],
                       [2, 0.5, -1.5, 1e-06, 3], ["gt"], max_n=4, max_t=5))
def test_random_pointwise_graphs_compute_the_same(case):
    g, t = case
    if not g.outputs:
        return
    verify(g)
    before = parse_graph(print_graph(g))
    feeds, params = random_feeds(before, {"T": t})
    want = run_graph(before, {k: v.clone() for k, v in feeds.items()}, params)
    after, _ = run_passes(parse_graph(print_graph(g)), ["fuse-pointwise"])
    text = print_graph(after)
    assert print_graph(parse_graph(text)) == text
    got = run_graph(after, feeds, materialize_params(after, params))
    for k in want:      # the body runs the same torch ops in the same order: bit for bit
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, equal_nan=True)
    for node in after.nodes:
        if node.op == "fused_pointwise":
            assert len(parse_body(node.attrs["body"]).graph.nodes) >= 2


# -- real model graphs ---------------------------------------------------------------------------

# groups per decoder layer: input norm (+ the residual add before it), q RoPE, k RoPE, residual
# add + post-attention norm, SwiGLU; Qwen3 adds its per-head q and k norms; a MoE layer adds
# the router's top-k renormalisation (sum -> div). Plus cos, sin and the final norm.
PER_LAYER = {"llama": 5, "mistral": 5, "qwen3": 7, "mixtral": 5, "qwen3_moe": 7}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "mixtral", "qwen3_moe"])
def test_real_graphs(family, tmp_path_factory):
    g, params = model_graph(family, tmp_path_factory.mktemp("m"))
    layers = sum(1 for n in g.nodes if n.op == "paged_attention")
    moe_layers = sum(1 for n in g.nodes if n.op == "topk")
    g = assert_model_pass_preserves(g, params, ["fuse-pointwise"], atol=0, rtol=0)
    counts = g.op_counts()
    assert counts["fused_pointwise"] == 3 + PER_LAYER[family] * layers + moe_layers
    # what stays unfused: rotate-half's neg, the positions cast, freqs' mul (each between
    # non-pointwise ops), and the MoE routing weights' cast after scatter
    left = {op for op in counts if op in ("neg", "cast", "mul", "add", "exp", "pow", "mean",
                                         "rsqrt", "silu", "sin", "cos", "sum", "div")}
    assert left <= {"neg", "cast", "mul"}, counts
    text = print_graph(g)
    again = parse_graph(text)
    verify(again)
    assert print_graph(again) == text


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_real_graph_in_half_precision(dtype):
    """Norms compute in f32 between casts: the casts fuse with them."""
    from braze.frontend.trace import trace_to_ir
    from braze.models.registry import build_model, build_spec
    from braze.tiny import tiny_config
    from braze.ir.types import torch_dtype
    spec = build_spec(tiny_config("llama"))
    g = trace_to_ir(build_model(spec, torch_dtype(dtype)), "m", 16, dtype)
    _, params = random_feeds(g, {"T": 1, "S": 1, "NB": 1, "MB": 1, "R": 1})
    params = {k: v * 0.1 for k, v in params.items()}
    layers = sum(1 for n in g.nodes if n.op == "paged_attention")
    g = assert_model_pass_preserves(g, params, ["fuse-pointwise"], atol=0, rtol=0)
    assert g.op_counts()["fused_pointwise"] == 3 + 5 * layers
