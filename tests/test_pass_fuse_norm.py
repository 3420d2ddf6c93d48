"""fuse-norm: RMSNorm math -> rms_norm, residual add + rms_norm -> add_rms_norm.

The fused ops compute the model's own torch math op for op, so every
equivalence check here is bit-exact (atol=0), in float32 and in half.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir import Graph, T, TensorType, parse_graph, print_graph, verify
from pass_helpers import (assert_model_pass_preserves, assert_pass_preserves, model_graph,
                          opt_text, refusal_reasons, run_passes, same_text)

NORM = """
graph @g(%x: f32[T, 8]) {
  param @w: f32[8]
  %0: f32[T, 8] = cast(%x) {dtype="f32"}
  %1: f32[T, 8] = pow(%0) {scalar=2}
  %2: f32[T, 1] = mean(%1) {dims=[-1], keepdim=true}
  %3: f32[T, 1] = add(%2) {scalar=1e-06}
  %4: f32[T, 1] = rsqrt(%3)
  %5: f32[T, 8] = mul(%0, %4)
  %6: f32[T, 8] = cast(%5) {dtype="f32"}
  %7: f32[T, 8] = mul(@w, %6)
  return y=%7
}
"""

FUSED = """
graph @g(%x: f32[T, 8]) {
  param @w: f32[8]
  %7: f32[T, 8] = rms_norm(%x, @w) {eps=1e-06}
  return y=%7
}
"""


def test_norm_with_casts():
    assert same_text(opt_text(NORM, "fuse-norm"), FUSED)


def test_norm_without_casts_weight_on_the_right():
    """A float32 graph after canonicalize: no casts left; `n * w`."""
    text = """
    graph @g(%x: f32[T, 8]) {
      param @w: f32[8]
      %1: f32[T, 8] = pow(%x) {scalar=2}
      %2: f32[T, 1] = mean(%1) {dims=[1], keepdim=true}
      %3: f32[T, 1] = add(%2) {scalar=1e-05}
      %4: f32[T, 1] = rsqrt(%3)
      %5: f32[T, 8] = mul(%4, %x)
      %7: f32[T, 8] = mul(%5, @w)
      return y=%7
    }
    """
    assert same_text(opt_text(text, "fuse-norm"), """
    graph @g(%x: f32[T, 8]) {
      param @w: f32[8]
      %7: f32[T, 8] = rms_norm(%x, @w) {eps=1e-05}
      return y=%7
    }
    """)


def test_half_norm_and_promoting_weight():
    """bf16 x, f32 weight: the result is f32, as torch promotes `w * h.to(bf16)`."""
    text = NORM.replace("%x: f32[T, 8]", "%x: bf16[T, 8]").replace(
        '%6: f32[T, 8] = cast(%5) {dtype="f32"}', '%6: bf16[T, 8] = cast(%5) {dtype="bf16"}')
    out = opt_text(text, "fuse-norm")
    assert "%7: f32[T, 8] = rms_norm(%x, @w) {eps=1e-06}" in out and "rsqrt" not in out
    assert_pass_preserves(text, ["fuse-norm"], {"T": 5}, atol=0, rtol=0)


def test_per_head_qk_norm():
    text = NORM.replace("[T, 8]", "[T, 4, 16]").replace("[T, 1]", "[T, 4, 1]").replace(
        "f32[8]", "f32[16]")
    out = opt_text(text, "fuse-norm")
    assert "%7: f32[T, 4, 16] = rms_norm(%x, @w) {eps=1e-06}" in out


RESIDUAL = """
graph @g(%a: f32[T, 8], %b: f32[T, 8], %c: f32[T, 8]) {
  param @w0: f32[8]
  param @w1: f32[8]
  %n0: f32[T, 8] = rms_norm(%a, @w0) {eps=1e-06}
  %s: f32[T, 8] = add(%a, %b)
  %n: f32[T, 8] = rms_norm(%s, @w1) {eps=1e-06}
  %h: f32[T, 8] = mul(%n, %n0)
  %s2: f32[T, 8] = add(%s, %h)
  return y=%s2
}
"""


def test_residual_add_folds_and_first_norm_stays():
    assert same_text(opt_text(RESIDUAL, "fuse-norm"), """
    graph @g(%a: f32[T, 8], %b: f32[T, 8], %c: f32[T, 8]) {
      param @w0: f32[8]
      param @w1: f32[8]
      %n0: f32[T, 8] = rms_norm(%a, @w0) {eps=1e-06}
      %n: f32[T, 8], %s: f32[T, 8] = add_rms_norm(%a, %b, @w1) {eps=1e-06}
      %h: f32[T, 8] = mul(%n, %n0)
      %s2: f32[T, 8] = add(%s, %h)
      return y=%s2
    }
    """)
    assert_pass_preserves(RESIDUAL, ["fuse-norm"], {"T": 3}, atol=0, rtol=0)


def test_residual_add_without_other_users_folds_too():
    text = RESIDUAL.replace("%s2: f32[T, 8] = add(%s, %h)", "%s2: f32[T, 8] = add(%c, %h)")
    out = opt_text(text, "fuse-norm")
    assert "%n: f32[T, 8], %s: f32[T, 8] = add_rms_norm(%a, %b, @w1)" in out


def refusals(text, *passes):
    g = parse_graph(text)
    verify(g)
    before = print_graph(g)
    g, ctx = run_passes(g, list(passes))
    return print_graph(g) == before, [r.reason for r in ctx.refusals]


@pytest.mark.parametrize("edit, reason", [
    (('%6: f32[T, 8] = cast(%5) {dtype="f32"}\n  %7: f32[T, 8] = mul(@w, %6)',
      '%6: f16[T, 8] = cast(%5) {dtype="f16"}\n  %7: f32[T, 8] = mul(@w, %6)'),
     "cast to f16, not back to x's dtype f32"),
    (("%3: f32[T, 1] = add(%2) {scalar=1e-06}\n  %4: f32[T, 1] = rsqrt(%3)",
      "%3: f32[T, 1] = rsqrt(%2)\n  %4: f32[T, 1] = add(%3) {scalar=1e-06}"),
     "rsqrt is not of mean(x^2) + eps: %2 comes from mean, pattern wants add"),        # eps after the rsqrt
    (("return y=%7", "return y=%7, v=%2"), "also used by"),        # the variance is read too
    (("param @w: f32[8]", "param @w: f32[1]"), "weight @w is f32[1]"),
])
def test_near_misses_are_refused_and_left_alone(edit, reason):
    unchanged, why = refusals(NORM.replace(*edit), "fuse-norm")
    assert unchanged and any(reason in r for r in why), why


def test_mean_over_another_dim_is_refused():
    text = NORM.replace("[T, 8]", "[T, 4, 8]").replace("[T, 1]", "[T, 1, 8]").replace(
        "dims=[-1]", "dims=[1]")
    unchanged, why = refusals(text, "fuse-norm")
    assert unchanged and any("mean over dims [1]" in r for r in why), why


def test_broadcasting_add_is_not_a_residual():
    text = RESIDUAL.replace("%b: f32[T, 8]", "%b: f32[8]")
    unchanged, why = refusals(text, "fuse-norm")
    assert unchanged and any("broadcasts" in r for r in why), why


# -- hypothesis: random norms, matching or not, same outputs bit for bit ------------------

def build_norm(g: Graph, x, w, *, cast_in, cast_out, w_left, eps, dims, eps_first, extra,
               eps_late=False):
    h = g.op("cast", x, dtype="f32") if cast_in else x
    var = g.op("mean", g.op("pow", h, scalar=2), dims=dims, keepdim=True)
    if eps_late:       # rsqrt(var) + eps: a different function
        r = g.op("add", g.op("rsqrt", var), scalar=eps, scalar_first=eps_first)
    else:
        r = g.op("rsqrt", g.op("add", var, scalar=eps, scalar_first=eps_first))
    n = g.op("mul", h, r) if w_left else g.op("mul", r, h)
    n = g.op("cast", n, dtype=cast_out) if cast_out else n
    if extra:
        g.set_output("extra", var)
    return g.op("mul", w, n) if w_left else g.op("mul", n, w)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), d=st.integers(1, 12),
       xdt=st.sampled_from(["f32", "f16", "bf16"]), wdt=st.sampled_from(["f32", "f16", "bf16"]),
       cast_in=st.booleans(), cast_out=st.booleans(), w_left=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]), eps_first=st.booleans(),
       wrong=st.sampled_from([None, None, None, "dim", "dtype", "extra", "eps"]),
       residual=st.booleans(), t=st.integers(1, 5), seed=st.integers(0, 100))
def test_random_norms_equivalent(lead, d, xdt, wdt, cast_in, cast_out, w_left, eps, eps_first,
                                 wrong, residual, t, seed):
    if xdt != "f32":
        cast_in = cast_out = True       # half x is only normalised in f32 with casts
    if wrong == "dim" and not lead:
        wrong = None
    g = Graph("g")
    shape = (T, *lead, d)
    a = g.add_input("a", TensorType(shape, xdt))
    x = a
    if residual:
        x = g.op("add", a, g.add_input("b", TensorType(shape, xdt)))
        g.set_output("s", x)
    w = g.add_param("w", TensorType((d,), wdt))
    out_dt = {"f32": "f16", "f16": "bf16", "bf16": "f16"}[xdt] if wrong == "dtype" else \
        (xdt if cast_out else None)
    if wrong == "dtype" and not cast_in:
        cast_in = True
    y = build_norm(g, x, w, cast_in=cast_in, cast_out=out_dt, w_left=w_left, eps=eps,
                   dims=[1] if wrong == "dim" else [-1], eps_first=eps_first, extra=wrong == "extra",
                   eps_late=wrong == "eps")
    g.set_output("y", y)
    after = assert_pass_preserves(g, ["fuse-norm"], {"T": t}, seed=seed, atol=0, rtol=0)
    counts = after.op_counts()
    fused = counts.get("rms_norm", 0) + counts.get("add_rms_norm", 0)
    assert fused == (0 if wrong else 1), print_graph(after)
    if not wrong:
        assert counts.get("add_rms_norm", 0) == int(residual) and "rsqrt" not in counts


# -- real graphs -------------------------------------------------------------------------

FAMILIES = {"llama": (2, False), "mistral": (2, False), "qwen3": (2, True), "mixtral": (3, False),
            "qwen3_moe": (3, True)}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_graphs(family, tmp_path_factory):
    layers, qk_norm = FAMILIES[family]
    g, params = model_graph(family, tmp_path_factory.mktemp("m"))
    assert assert_model_pass_preserves(g, params, ["fuse-norm"], atol=0, rtol=0) is g
    counts = g.op_counts()
    # every norm but layer 0's input norm follows a residual add; qk norms on top
    assert counts.get("add_rms_norm") == 2 * layers
    assert counts.get("rms_norm") == 1 + (2 * layers if qk_norm else 0)
    assert "rsqrt" not in counts and "pow" not in counts


def test_real_graph_in_half(tmp_path):
    """bf16 and f16 checkpoints (qwen3: the QK norms too) fuse and stay bit-identical."""
    from braze.frontend import load_model
    from braze.tiny import make_checkpoint
    d = make_checkpoint("qwen3", tmp_path / "q", with_tokenizer=False)
    for dt in ("bfloat16", "float16"):
        loaded = load_model(d, dtype=dt)
        params = {n: loaded.load_param(n) for n in loaded.graph.params}
        g = assert_model_pass_preserves(loaded.graph, params, ["fuse-norm"], atol=0, rtol=0)
        assert g.op_counts().get("add_rms_norm") == 4 and g.op_counts().get("rms_norm") == 5


# -- Gemma: (1 + w) scaled in f32, one cast back ------------------------------------------

GEMMA_F16 = """
graph @g(%x: f16[T, 8]) {
  param @w: f32[8]
  %0: f32[T, 8] = cast(%x) {dtype="f32"}
  %1: f32[T, 8] = pow(%0) {scalar=2}
  %2: f32[T, 1] = mean(%1) {dims=[-1], keepdim=true}
  %3: f32[T, 1] = add(%2) {scalar=1e-06}
  %4: f32[T, 1] = rsqrt(%3)
  %5: f32[T, 8] = mul(%0, %4)
  %6: f32[T, 8] = mul(%5, @w)
  %7: f16[T, 8] = cast(%6) {dtype="f16"}
  return y=%7
}
"""


def test_gemma_norm_scaled_in_f32_fuses_with_its_rounding():
    """GemmaRMSNorm after canonicalize (@w is the derived 1 + w.float()): the weight scales
    the f32 normalised value and the product is cast once; `scale_f32` says so."""
    out = opt_text(GEMMA_F16, "fuse-norm")
    assert same_text(out, """
    graph @g(%x: f16[T, 8]) {
      param @w: f32[8]
      %7: f16[T, 8] = rms_norm(%x, @w) {eps=1e-06, scale_f32=true}
      return y=%7
    }
    """), out
    assert_pass_preserves(GEMMA_F16, ["fuse-norm"], {"T": 5}, atol=0, rtol=0)


def test_half_norm_scaled_in_f32_without_a_cast_back_is_refused():
    """The plain op would round the normalised value to f16 before the weight; this graph
    never rounds it, so it must not become that op."""
    text = GEMMA_F16.replace('  %7: f16[T, 8] = cast(%6) {dtype="f16"}\n', "").replace(
        "return y=%7", "return y=%6")
    reasons = refusal_reasons(text, "fuse-norm")
    assert any("without a cast back" in r for r in reasons), reasons


# (not float16: braze refuses Gemma 3 in it, models/registry.FLOAT16_UNSTABLE)
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_gemma3_sandwich_norms(dtype, tmp_path_factory):
    """Per layer: input, post-attention, pre- and post-feedforward norms and q/k norms.
    The pre-feedforward norm and the next layer's input norm take the residual add in
    (across the post-norm that feeds it); bit-identical in every dtype."""
    g, params = model_graph("gemma3", tmp_path_factory.mktemp("g"), dtype=dtype)
    run_passes(g, ["canonicalize"])          # folds 1 + w.float() into derived weights
    g = assert_model_pass_preserves(g, params, ["fuse-norm"], atol=0, rtol=0)
    counts, layers = g.op_counts(), 3
    assert counts.get("add_rms_norm") == 2 * layers
    assert counts.get("rms_norm") == 1 + 2 * layers + 2 * layers      # + post norms, q/k norms
    assert "rsqrt" not in counts
    half = dtype is not None
    assert all(bool(n.attrs.get("scale_f32")) == half for n in g.nodes
               if n.op in ("rms_norm", "add_rms_norm"))
