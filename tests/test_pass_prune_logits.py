"""prune-logits: gather the sampled rows (%logits_indices) before the LM head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.ir import BrazeError, parse_graph, print_graph, run_graph, verify
from braze.ir.ops import all_ops
from pass_helpers import (assert_model_pass_preserves, materialize_params, model_graph, opt_text,
                          random_feeds, refusal_reasons, run_passes, same_text)

HEADER = "graph @g(%h: f32[T, 8], %r: f32[T, 8], %logits_indices: i64[S]) {"

NORM = HEADER + """
  param @norm.weight: f32[8]
  param @lm_head.weight: f32[16, 8]
  %0: f32[T, 8] = add(%r, %h)
  %1: f32[T, 8] = cast(%0) {dtype="f32"}
  %2: f32[T, 8] = pow(%1) {scalar=2}
  %3: f32[T, 1] = mean(%2) {dims=[-1], keepdim=true}
  %4: f32[T, 1] = add(%3) {scalar=1e-06}
  %5: f32[T, 1] = rsqrt(%4)
  %6: f32[T, 8] = mul(%1, %5)
  %7: f32[T, 8] = mul(@norm.weight, %6)
  %8: f32[T, 16] = linear(%7, @lm_head.weight)
  return logits=%8
}
"""


def check_pruned(text: str, t: int, s: int, seed: int = 0, **options):
    """Before vs after on random values: the pruned logits are the sampled rows of the old ones."""
    before = parse_graph(text)
    verify(before)
    feeds, params = random_feeds(before, {"T": t, "S": s}, seed, int_high=t)
    want = run_graph(before, dict(feeds), materialize_params(before, params))
    after, ctx = run_passes(parse_graph(text), ["prune-logits"], **options)
    got = run_graph(after, dict(feeds), materialize_params(after, params))
    assert set(got) == set(want)
    for k in want:
        w = want[k].index_select(0, feeds["logits_indices"]) if k == "logits" else want[k]
        torch.testing.assert_close(got[k], w, atol=1e-5, rtol=1e-5)
    return after, ctx


def test_plain_head_exact_text():
    out = opt_text(HEADER + """
  param @lm_head.weight: f32[16, 8]
  param @lm_head.bias: f32[16]
  %0: f32[T, 16] = linear(%h, @lm_head.weight, @lm_head.bias)
  return logits=%0, h=%h
}
""", "prune-logits")
    assert same_text(out, HEADER + """
  param @lm_head.weight: f32[16, 8]
  param @lm_head.bias: f32[16]
  %1: f32[S, 8] = index_select(%h, %logits_indices) {dim=0}
  %2: f32[S, 16] = linear(%1, @lm_head.weight, @lm_head.bias)
  meta {logits="pruned"}
  return logits=%2, h=%h
}
"""), out
    assert print_graph(parse_graph(out)) == out


def test_gather_moves_above_the_final_norm_and_residual_add():
    out = opt_text(NORM, "prune-logits")
    assert same_text(out, HEADER + """
  param @norm.weight: f32[8]
  param @lm_head.weight: f32[16, 8]
  %9: f32[S, 8] = index_select(%r, %logits_indices) {dim=0}
  %10: f32[S, 8] = index_select(%h, %logits_indices) {dim=0}
  %11: f32[S, 8] = add(%9, %10)
  %12: f32[S, 8] = cast(%11) {dtype="f32"}
  %13: f32[S, 8] = pow(%12) {scalar=2}
  %14: f32[S, 1] = mean(%13) {dims=[-1], keepdim=true}
  %15: f32[S, 1] = add(%14) {scalar=1e-06}
  %16: f32[S, 1] = rsqrt(%15)
  %17: f32[S, 8] = mul(%12, %16)
  %18: f32[S, 8] = mul(@norm.weight, %17)
  %19: f32[S, 16] = linear(%18, @lm_head.weight)
  meta {logits="pruned"}
  return logits=%19
}
"""), out
    check_pruned(NORM, t=7, s=3)


def test_an_intermediate_read_elsewhere_stays_on_all_rows():
    # %1 is also an output: the ops reading it move, %1 itself is gathered where they start
    text = NORM.replace("return logits=%8", "return logits=%8, normed_in=%1")
    after, _ = check_pruned(text, t=6, s=2)
    out = print_graph(after)
    assert "%0: f32[T, 8] = add(%r, %h)" in out and "%1: f32[T, 8] = cast(%0)" in out
    assert "index_select(%1, %logits_indices)" in out
    assert out.count("index_select") == 1 and "f32[S, 1] = rsqrt" in out


def test_tied_embedding_head():
    text = """
graph @g(%input_ids: i64[T], %logits_indices: i64[S]) {
  param @model.embed_tokens.weight: f32[16, 8]
  param @model.norm.weight: f32[8]
  %0: f32[T, 8] = embedding(%input_ids, @model.embed_tokens.weight)
  %1: f32[T, 8] = mul(@model.norm.weight, %0)
  %2: f32[T, 16] = linear(%1, @model.embed_tokens.weight)
  return logits=%2
}
"""
    out = opt_text(text, "prune-logits")
    assert same_text(out, """
graph @g(%input_ids: i64[T], %logits_indices: i64[S]) {
  param @model.embed_tokens.weight: f32[16, 8]
  param @model.norm.weight: f32[8]
  %0: f32[T, 8] = embedding(%input_ids, @model.embed_tokens.weight)
  %3: f32[S, 8] = index_select(%0, %logits_indices) {dim=0}
  %4: f32[S, 8] = mul(@model.norm.weight, %3)
  %5: f32[S, 16] = linear(%4, @model.embed_tokens.weight)
  meta {logits="pruned"}
  return logits=%5
}
"""), out
    check_pruned(text, t=5, s=2)


@pytest.mark.parametrize("chain,moved", [
    # ops that mix rows stay on all T rows; what reads them as a broadcast value moves
    ("%0: f32[1, 8] = mean(%h) {dims=[0], keepdim=true}\n  %1: f32[T, 8] = sub(%h, %0)", ["sub"]),
    ("%0: f32[T, 8] = softmax(%h) {dim=0}\n  %1: f32[T, 8] = neg(%0)", ["neg"]),
    ("%0: f32[T, 1] = amax(%h) {dims=[1], keepdim=true}\n  %1: f32[T, 8] = sub(%h, %0)",
     ["amax", "sub"]),
    # %0 [T] broadcasts over the columns of a [T, T] value: it must keep all T rows
    ("%0: f32[T] = sum(%h) {dims=[1]}\n  %c: f32[T, 1] = mean(%r) {dims=[1], keepdim=true}\n"
     "  %a: f32[T, T] = add(%c, %0)\n  %3: f32[T, 1] = mean(%a) {dims=[1], keepdim=true}\n"
     "  %1: f32[T, 8] = mul(%h, %3)", ["mean", "add", "mean", "mul"]),
    ("%0: f32[8, T] = permute(%h) {dims=[1, 0]}\n  %1: f32[T, 8] = permute(%0) {dims=[1, 0]}", []),
    ("%0: f32[T, 2, 4] = reshape(%h) {shape=[-1, 2, 4]}\n  %1: f32[T, 8] = reshape(%0) {shape=[-1, 8]}",
     []),
])
def test_only_row_wise_ops_move(chain, moved):
    text = HEADER + f"""
  param @lm_head.weight: f32[16, 8]
  {chain}
  %2: f32[T, 16] = linear(%1, @lm_head.weight)
  return logits=%2
}}
"""
    after, _ = check_pruned(text, t=6, s=3)
    on_rows = [n.op for n in after.nodes if n.op not in ("index_select", "linear")
               and str(n.results[0].type.shape[0]) == "S"]
    assert on_rows == moved, print_graph(after)


def test_head_weight_chain_is_not_gathered():
    text = HEADER + """
  param @w: f32[16, 8]
  %0: f32[16, 8] = neg(@w)
  %1: f32[T, 16] = linear(%h, %0)
  return logits=%1
}
"""
    after, _ = check_pruned(text, t=4, s=2)
    assert "%0: f32[16, 8] = neg(@w)" in print_graph(after)


@pytest.mark.parametrize("text,reason", [
    ("graph @g(%h: f32[T, 8]) {\n  param @w: f32[16, 8]\n"
     "  %0: f32[T, 16] = linear(%h, @w)\n  return logits=%0\n}\n", "no %logits_indices input"),
    (HEADER + "\n  param @w: f32[8, 16]\n  %0: f32[T, 16] = matmul(%h, @w)\n"
     "  return logits=%0\n}\n", "logits come from matmul, not a linear"),
    (HEADER + "\n  param @w: f32[16, 8]\n  %0: f32[T, 16] = linear(%h, @w)\n"
     "  %1: i64[T] = argmax(%0) {dim=-1}\n  return logits=%0, tokens=%1\n}\n",
     "also read by argmax"),
    (HEADER + "\n  param @w: f32[16, 8]\n  %0: f32[T, 16] = linear(%h, @w)\n"
     "  return logits=%0, all=%0\n}\n", "also read by output all"),
    ("graph @g(%h: f32[T, 2, 8], %logits_indices: i64[S]) {\n  param @w: f32[16, 8]\n"
     "  %0: f32[T, 2, 16] = linear(%h, @w)\n  return logits=%0\n}\n", "not token rows"),
    ("graph @g(%h: f32[T, 8], %logits_indices: f32[S]) {\n  param @w: f32[16, 8]\n"
     "  %0: f32[T, 16] = linear(%h, @w)\n  return logits=%0\n}\n", "not a 1-D integer index"),
    (HEADER + "\n  %0: f32[T, 8] = neg(%h)\n  return y=%0\n}\n", "no output named logits"),
    (HEADER + "\n  return logits=%h\n}\n", "logits are %h, a graph input"),
])
def test_refusals_leave_the_graph_alone(text, reason):
    (r,) = refusal_reasons(text, "prune-logits")
    assert reason in r, r


SOFT_CAP = HEADER + """
  param @w: f32[16, 8]
  %0: f32[T, 16] = linear(%h, @w)
  %1: f32[T, 16] = div(%0) {scalar=30.0}
  %2: f32[T, 16] = tanh(%1)
  %3: f32[T, 16] = mul(%2) {scalar=30.0}
  return logits=%3
}
"""


def test_final_soft_cap_runs_after_the_pruned_head():
    """Gemma's cap * tanh(logits / cap) follows the head onto the S sampled rows."""
    out = opt_text(SOFT_CAP, "prune-logits")
    assert same_text(out, HEADER + """
  param @w: f32[16, 8]
  %4: f32[S, 8] = index_select(%h, %logits_indices) {dim=0}
  %5: f32[S, 16] = linear(%4, @w)
  %6: f32[S, 16] = div(%5) {scalar=30.0}
  %7: f32[S, 16] = tanh(%6)
  %8: f32[S, 16] = mul(%7) {scalar=30.0}
  meta {logits="pruned"}
  return logits=%8
}
"""), out
    check_pruned(SOFT_CAP, t=5, s=2)


def test_a_tail_value_read_elsewhere_is_refused():
    text = SOFT_CAP.replace("return logits=%3", "return logits=%3, capped=%2")
    (r,) = refusal_reasons(text, "prune-logits")
    assert "logits come from mul, not a linear" in r, r


def test_rerun_is_a_no_op():
    once = opt_text(NORM, "prune-logits")
    g, ctx = run_passes(parse_graph(once), ["prune-logits"])
    assert print_graph(g) == once and not ctx.refusals


@pytest.mark.parametrize("norm,ops", [
    ("%0: f32[T, 8] = rms_norm(%h, @norm.weight) {eps=1e-06}", ["rms_norm"]),
    ("%0: f32[T, 8], %9: f32[T, 8] = add_rms_norm(%r, %h, @norm.weight) {eps=1e-06}",
     ["add_rms_norm"]),
])
def test_fused_norms_are_row_wise(norm, ops):
    """The fused norms move above the gather and read the sampled rows themselves (their
    `rows` operand): no index_select launch before them, R rows out."""
    if not {"rms_norm", "add_rms_norm"} <= set(all_ops()):
        pytest.skip("fuse-norm's ops are not registered in this tree")
    text = HEADER + f"""
  param @norm.weight: f32[8]
  param @lm_head.weight: f32[16, 8]
  {norm}
  %1: f32[T, 16] = linear(%0, @lm_head.weight)
  return logits=%1
}}
"""
    try:
        parse_graph(text)
    except BrazeError as e:
        pytest.skip(f"fused norm ops have another signature: {e}")
    after, _ = check_pruned(text, t=5, s=2)
    assert [n.op for n in after.nodes] == ops + ["linear"]
    assert after.nodes[0].operands[-1] is after.input("logits_indices")
    # the residual sum is also read elsewhere: the fused norm stays on T rows
    if "add_rms_norm" in norm:
        after, _ = check_pruned(text.replace("return logits=%1", "return logits=%1, res=%9"), t=5, s=2)
        assert [n.op for n in after.nodes] == ["add_rms_norm", "index_select", "linear"]


def test_after_fuse_norm_on_a_real_graph(tmp_path_factory):
    from braze.passes import all_passes
    if "fuse-norm" not in all_passes():
        pytest.skip("fuse-norm is not in this tree")
    g, params = model_graph("llama", tmp_path_factory.mktemp("m"))
    g = assert_model_pass_preserves(g, params, ["fuse-norm", "prune-logits"])
    norm = [n for n in g.nodes if n.op in ("rms_norm", "add_rms_norm")][-1]
    assert str(norm.results[0].type) == "f32[R, 64]"   # the logits rows (batch contract)
    assert g.outputs["logits"].producer.operands[0] is norm.results[0]


UNARY_ROWWISE = ["neg", "tanh", "silu", "cast_f32"]


def _step(kind: str, cur: str, i: int) -> tuple[str, str]:
    """One op applied to the running value %cur; returns (lines, new value)."""
    v = f"%v{i}"
    if kind == "cast_f32":
        return f"  {v}: f32[T, 8] = cast({cur}) {{dtype=\"f32\"}}", v
    if kind in ("neg", "tanh", "silu"):
        return f"  {v}: f32[T, 8] = {kind}({cur})", v
    if kind == "add_param":
        return f"  {v}: f32[T, 8] = add({cur}, @bias)", v
    if kind == "mul_other_rows":
        return f"  {v}: f32[T, 8] = mul(%r, {cur})", v
    if kind == "rms":
        return (f"  %p{i}: f32[T, 8] = pow({cur}) {{scalar=2}}\n"
                f"  %m{i}: f32[T, 1] = mean(%p{i}) {{dims=[-1], keepdim=true}}\n"
                f"  %e{i}: f32[T, 1] = add(%m{i}) {{scalar=1e-06}}\n"
                f"  %s{i}: f32[T, 1] = rsqrt(%e{i})\n  {v}: f32[T, 8] = mul({cur}, %s{i})"), v
    if kind == "row_sum_nokeep":
        return (f"  %m{i}: f32[T] = sum({cur}) {{dims=[1]}}\n"
                f"  %u{i}: f32[T, 1] = unsqueeze(%m{i}) {{dim=1}}\n  {v}: f32[T, 8] = add({cur}, %u{i})"), v
    if kind == "softmax_rows":
        return f"  {v}: f32[T, 8] = softmax({cur}) {{dim=-1}}", v
    if kind == "where":
        return (f"  %c{i}: bool[T, 8] = gt({cur}) {{scalar=0.0}}\n"
                f"  {v}: f32[T, 8] = where(%c{i}, {cur}, %r)"), v
    if kind == "col_mean":        # mixes rows
        return (f"  %m{i}: f32[1, 8] = mean({cur}) {{dims=[0], keepdim=true}}\n"
                f"  {v}: f32[T, 8] = sub({cur}, %m{i})"), v
    if kind == "column_softmax":  # mixes rows
        return (f"  %p{i}: f32[8, T] = permute({cur}) {{dims=[1, 0]}}\n"
                f"  %q{i}: f32[8, T] = softmax(%p{i}) {{dim=-1}}\n"
                f"  {v}: f32[T, 8] = permute(%q{i}) {{dims=[1, 0]}}"), v
    if kind == "fused_norm":
        return f"  {v}: f32[T, 8] = rms_norm({cur}, @bias) {{eps=1e-06}}", v
    if kind == "fused_add_norm":
        return f"  {v}: f32[T, 8], %a{i}: f32[T, 8] = add_rms_norm(%r, {cur}, @bias) {{eps=1e-06}}", v
    raise AssertionError(kind)


KINDS = UNARY_ROWWISE + ["add_param", "mul_other_rows", "rms", "row_sum_nokeep", "softmax_rows",
                         "where", "col_mean", "column_softmax"]
if {"rms_norm", "add_rms_norm"} <= set(all_ops()):
    KINDS += ["fused_norm", "fused_add_norm"]


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=5),
       extra=st.lists(st.integers(0, 4), max_size=2), t=st.integers(1, 7), s=st.integers(1, 4),
       bias=st.booleans(), seed=st.integers(0, 5))
def test_equivalent_on_random_values(kinds, extra, t, s, bias, seed):
    lines, cur = [], "%h"
    values = []
    for i, kind in enumerate(kinds):
        line, cur = _step(kind, cur, i)
        lines.append(line)
        values.append(cur)
    outs = ["logits=%head"] + [f"x{j}={values[j]}" for j in sorted(set(extra)) if j < len(values)]
    text = (HEADER + "\n  param @bias: f32[8]\n  param @lm_head.weight: f32[16, 8]\n"
            + ("  param @lm_head.bias: f32[16]\n" if bias else "") + "\n".join(lines) + "\n"
            + f"  %head: f32[T, 16] = linear({cur}, @lm_head.weight{', @lm_head.bias' if bias else ''})\n"
            + f"  return {', '.join(outs)}\n}}\n")
    after, ctx = check_pruned(text, t=t, s=s, seed=seed)
    assert after.meta == {"logits": "pruned"} and not ctx.refusals
    assert str(after.outputs["logits"].type) == "f32[S, 16]"


FAMILIES = [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mistral", {}),
            ("qwen3", {}), ("mixtral", {}), ("qwen3_moe", {}), ("phi3", {}), ("gemma3", {})]


@pytest.mark.parametrize("family,overrides", FAMILIES)
def test_real_graphs(family, overrides, tmp_path_factory):
    g, params = model_graph(family, tmp_path_factory.mktemp("m"), **overrides)
    vocab = g.outputs["logits"].type.shape[1]
    g = assert_model_pass_preserves(g, params, ["prune-logits"])
    # R: the batch contract's logits rows (one per sequence, or k + 1 when speculating)
    assert str(g.outputs["logits"].type) == f"f32[R, {vocab}]" and g.meta["logits"] == "pruned"
    # the final norm now runs on the sampled rows: one rsqrt over R rows, the others over T
    rsqrt = [str(n.results[0].type.shape[0]) for n in g.nodes if n.op == "rsqrt"]
    # (Gemma: the last post-feedforward norm feeds that add, so it moves too)
    assert rsqrt.count("R") == (2 if family == "gemma3" else 1) and rsqrt[-1] == "R"
    # gathered: the residual stream and the last layer's MLP output
    assert g.op_counts()["index_select"] == 2
    head = g.outputs["logits"].producer
    while head.op != "linear":            # Gemma's final soft-cap, after the pruned head
        assert str(head.results[0].type.shape[0]) == "R"
        head = head.operands[0].producer
    tied = family in ("qwen3", "phi3", "gemma3") or overrides.get("tie_word_embeddings")
    assert head.operands[1].name == ("model.embed_tokens.weight" if tied else "lm_head.weight")


def test_with_merged_projections_and_text_round_trip(tmp_path_factory):
    g, params = model_graph("qwen3_moe", tmp_path_factory.mktemp("m"))
    g = assert_model_pass_preserves(g, params, ["merge-projections", "prune-logits"])
    text = print_graph(g)
    assert 'meta {logits="pruned"}' in text
    back = parse_graph(text)
    verify(back)
    assert print_graph(back) == text and back.meta == {"logits": "pruned"}
