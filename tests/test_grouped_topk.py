"""grouped_topk (ir/op_router.py), fuse-grouped-topk and its kernel (codegen/kernels/router.py).

- the op's reference == transformers' own DeepseekV3TopkRouter on random logits and bias
  (hypothesis over the grouping), the router weight set to the identity so that the
  router's logits are exactly the drawn ones;
- the kernel (TRITON_INTERPRET, float32, a few tokens) == the reference, on random and on
  tie-heavy values (the tie policy: lowest id wins, exactly topk_group groups);
- the pass turns the traced router (IR text, as models/deepseek_v3.py traces it) into
  one op that computes the same, and says why for a near miss;
- cubins for sm_80 and sm_90 at DeepSeek-V3's real routing (256 experts).
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braze.ir import Graph, T, TensorType, parse_graph, print_graph, run_graph

from kernel_helpers import aot_compile_node, check_kernels, run_with_kernels
from pass_helpers import assert_pass_preserves, opt_text, refusal_reasons

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def groupings(draw):
    n_group = draw(st.sampled_from([1, 2, 4, 8]))
    per = draw(st.integers(2, 8))
    topk_group = draw(st.integers(1, n_group))
    return dict(n_group=n_group, topk_group=topk_group,
                top_k=draw(st.integers(1, min(8, topk_group * per))),
                renormalize=draw(st.booleans()),
                scale=draw(st.sampled_from([1.0, 2.5, 0.3]))), n_group * per


def _graph(e: int, attrs: dict) -> Graph:
    g = Graph("router")
    logits = g.add_input("logits", TensorType((T, e), "f32"))
    bias = g.add_param("bias", TensorType((e,), "f32"))
    w, ids = g.add_node("grouped_topk", [logits, bias], attrs).results
    g.set_output("w", w)
    g.set_output("ids", ids)
    return g


def _hf_router(e: int, attrs: dict, bias: torch.Tensor):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    with contextlib.redirect_stderr(io.StringIO()):
        cfg = DeepseekV3Config(hidden_size=e, n_routed_experts=e, num_experts_per_tok=attrs["top_k"],
                               n_group=attrs["n_group"], topk_group=attrs["topk_group"],
                               norm_topk_prob=attrs["renormalize"],
                               routed_scaling_factor=attrs["scale"])
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))          # logits = the drawn values, exactly
        router.e_score_correction_bias.copy_(bias)
    return router


def _by_id(w, ids):
    order = ids.argsort(dim=-1)
    return w.gather(1, order), ids.gather(1, order)


def _hf_route(e, attrs, logits, bias):
    """transformers' (weights, ids) for these logits, each token's experts in id order."""
    with torch.no_grad():
        hf = _hf_router(e, attrs, bias)(logits)
    # transformers 5.x returns (logits, weights, ids); the ids are its one integer tensor
    ids = next(t for t in hf if not t.is_floating_point())
    w = next(t for t in hf if t.is_floating_point() and t.shape == ids.shape and t is not hf[0])
    return _by_id(w, ids)


def _assert_same_routing(out, want):
    w, ids = _by_id(out["w"], out["ids"])
    assert torch.equal(ids, want[1])
    torch.testing.assert_close(w, want[0], atol=1e-6, rtol=1e-6)


@settings(max_examples=40, **SETTINGS)
@given(groupings(), st.integers(1, 6), st.integers(0, 2 ** 16))
def test_reference_equals_transformers_router(grouping, tokens, seed):
    attrs, e = grouping
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, e, generator=gen) * 2
    bias = torch.randn(e, generator=gen) * 0.5
    out = run_graph(_graph(e, attrs), {"logits": logits}, {"bias": bias})
    _assert_same_routing(out, _hf_route(e, attrs, logits, bias))
    # slot order: descending biased score
    choice = (logits.sigmoid() + bias).gather(1, out["ids"])
    assert (choice[:, :-1] >= choice[:, 1:]).all()


def _check_kernel(e, attrs, logits, bias):
    check_kernels(_graph(e, attrs), {"logits": logits}, {"bias": bias}, {"grouped_topk"},
                  {"T": logits.shape[0]}, atol=1e-6, rtol=1e-6)


@settings(max_examples=12, **SETTINGS)
@given(groupings(), st.integers(1, 3), st.integers(0, 2 ** 16), st.booleans())
def test_kernel_equals_reference(grouping, tokens, seed, ties):
    """Random values, or values from {-1, 0, 1} with a bias of 0 or 1 so that expert
    and group scores tie often: the ids must be exactly the reference's."""
    attrs, e = grouping
    gen = torch.Generator().manual_seed(seed)
    if ties:
        logits = torch.randint(-1, 2, (tokens, e), generator=gen).float()
        bias = torch.randint(0, 2, (e,), generator=gen).float()
    else:
        logits, bias = torch.randn(tokens, e, generator=gen), torch.randn(e, generator=gen)
    _check_kernel(e, attrs, logits, bias)
    if not ties:     # and transformers' own router, directly
        out = run_with_kernels(_graph(e, attrs), {"logits": logits}, {"bias": bias},
                               {"grouped_topk"}, {"T": tokens})
        _assert_same_routing(out, _hf_route(e, attrs, logits, bias))


def test_kernel_scores_a_group_by_its_two_best_not_its_best_twice():
    """Group 0 has the single best expert but a poor second (0.9 + -4.5); group 1 two fair
    ones (0.5 + 0.5): with one group kept, its experts are group 1's, in the kernel as in
    the reference. Scoring a group by its best twice keeps group 0."""
    attrs = dict(n_group=4, topk_group=1, top_k=2, renormalize=True, scale=1.0)
    logits = torch.zeros(2, 8)
    bias = torch.tensor([0.4, -5.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0])
    _check_kernel(8, attrs, logits, bias)
    out = run_with_kernels(_graph(8, attrs), {"logits": logits}, {"bias": bias},
                           {"grouped_topk"}, {"T": 2})
    assert [sorted(r.tolist()) for r in out["ids"]] == [[2, 3], [2, 3]]


def test_kernel_reads_a_strided_logits_row_and_survives_nan():
    """The logits are a split of a wider linear (a row stride > E), and a NaN row still
    picks top_k distinct experts."""
    attrs = dict(n_group=4, topk_group=2, top_k=3, renormalize=True, scale=2.5)
    g = Graph("router")
    wide = g.add_input("wide", TensorType((T, 24), "f32"))
    logits = g.add_node("slice", [wide], {"dim": 1, "start": 0, "end": 16}).results[0]
    bias = g.add_param("bias", TensorType((16,), "f32"))
    w, ids = g.add_node("grouped_topk", [logits, bias], attrs).results
    g.set_output("w", w)
    g.set_output("ids", ids)
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(3))
    check_kernels(g, {"wide": x}, {"bias": torch.randn(16)}, {"grouped_topk"}, {"T": 3},
                  atol=1e-6, rtol=1e-6)
    x[1] = float("nan")
    got = run_with_kernels(g, {"wide": x}, {"bias": torch.zeros(16)}, {"grouped_topk"}, {"T": 3})
    for row in got["ids"]:
        assert len(set(row.tolist())) == 3 and all(0 <= i < 16 for i in row.tolist())


def test_compiles_for_sm80_and_sm90_at_deepseek_v3_size():
    """DeepSeek-V3's real routing: 256 experts in 8 groups, 4 kept, 8 experts per token."""
    g = _graph(256, dict(n_group=8, topk_group=4, top_k=8, renormalize=True, scale=2.5))
    kernels = aot_compile_node(g, 0)
    assert len(kernels) == 2 and all(c.asm.get("cubin") for c in kernels)


# -- the pass ----------------------------------------------------------------------------

# models/deepseek_v3.py's router as fuse-moe leaves it (tiny dsv3: 8 experts, 4 groups)
TRACED = """
graph @router(%logits: f32[T, 8]) {
  param @bias: f32[8]
  %160: f32[T, 8] = sigmoid(%logits)
  %161: f32[T, 8] = add(%160, @bias)
  %162: f32[T, 4, 2] = reshape(%161) {shape=[-1, 4, 2]}
  %163: f32[T, 4, 2], %164: i64[T, 4, 2] = topk(%162) {k=2}
  %165: f32[T, 4] = sum(%163) {dims=[-1]}
  %166: f32[T, 2], %167: i64[T, 2] = topk(%165) {k=2}
  %168: f32[T, 1] = slice(%166) {dim=1, start=1}
  %169: bool[T, 4] = ge(%165, %168)
  %170: bool[T, 4, 1] = unsqueeze(%169) {dim=2}
  %171: f32[T, 4, 2] = full_like(%162) {value=-inf}
  %172: f32[T, 4, 2] = where(%170, %162, %171)
  %173: f32[T, 8] = reshape(%172) {shape=[-1, 8]}
  %174: f32[T, 2], %175: i64[T, 2] = topk(%173) {k=2}
  %176: f32[T, 2] = gather(%160, %175) {dim=1}
  %177: f32[T, 1] = sum(%176) {dims=[-1], keepdim=true}
  %178: f32[T, 1] = add(%177) {scalar=1e-20}
  %179: f32[T, 2] = div(%176, %178)
  %180: f32[T, 2] = mul(%179) {scalar=2.5}
  return w=%180, ids=%175
}
"""

FUSED = """
graph @router(%logits: f32[T, 8]) {
  param @bias: f32[8]
  %180: f32[T, 2], %175: i64[T, 2] = grouped_topk(%logits, @bias) {n_group=4, topk_group=2, top_k=2, renormalize=true, scale=2.5}
  return w=%180, ids=%175
}
"""

# dsv3-plain: 2 groups, 1 kept (canonicalize dropped the whole-range slice), no renormalisation
ONE_GROUP_KEPT = """
graph @router(%logits: f32[T, 8]) {
  param @bias: f32[8]
  %126: f32[T, 8] = sigmoid(%logits)
  %127: f32[T, 8] = add(%126, @bias)
  %128: f32[T, 2, 4] = reshape(%127) {shape=[-1, 2, 4]}
  %129: f32[T, 2, 2], %130: i64[T, 2, 2] = topk(%128) {k=2}
  %131: f32[T, 2] = sum(%129) {dims=[-1]}
  %132: f32[T, 1], %133: i64[T, 1] = topk(%131) {k=1}
  %135: bool[T, 2] = ge(%131, %132)
  %136: bool[T, 2, 1] = unsqueeze(%135) {dim=2}
  %137: f32[T, 2, 4] = full_like(%128) {value=-inf}
  %138: f32[T, 2, 4] = where(%136, %128, %137)
  %139: f32[T, 8] = reshape(%138) {shape=[-1, 8]}
  %140: f32[T, 2], %141: i64[T, 2] = topk(%139) {k=2}
  %142: f32[T, 2] = gather(%126, %141) {dim=1}
  %143: f32[T, 2] = mul(%142) {scalar=2.5}
  return w=%143, ids=%141
}
"""

# no groups, no renormalisation (dsv3-plain-like with n_group 1)
UNGROUPED = """
graph @router(%logits: f32[T, 8]) {
  param @bias: f32[8]
  %1: f32[T, 8] = sigmoid(%logits)
  %2: f32[T, 8] = add(%1, @bias)
  %3: f32[T, 3], %4: i64[T, 3] = topk(%2) {k=3}
  %5: f32[T, 3] = gather(%1, %4) {dim=1}
  %6: f32[T, 3] = mul(%5) {scalar=1.5}
  return w=%6, ids=%4
}
"""


def test_pass_fuses_the_traced_router_into_one_op():
    assert print_graph(parse_graph(opt_text(TRACED, "fuse-grouped-topk"))) == \
        print_graph(parse_graph(FUSED))
    for text in (TRACED, ONE_GROUP_KEPT, UNGROUPED):
        g = assert_pass_preserves(text, ["fuse-grouped-topk"], {"T": 5}, atol=1e-6, rtol=1e-6)
        assert g.op_counts() == {"grouped_topk": 1}


def test_ungrouped_router_gets_one_group():
    assert "{n_group=1, topk_group=1, top_k=3, renormalize=false, scale=1.5}" in \
        opt_text(UNGROUPED, "fuse-grouped-topk")


@pytest.mark.parametrize("edit, why", [
    (("{scalar=1e-20}", "{scalar=1e-06}"), "adds 1e-06 to the sum"),
    (("{dim=1, start=1}", "{dim=1, start=0, end=1}"), "keeps the 2 best"),
    (("%174: f32[T, 2], %175", "%174: f32[T, 2], %175"), None),
], ids=["eps", "kept-groups", "control"])
def test_near_misses_are_refused_with_a_reason(edit, why):
    text = TRACED.replace(*edit)
    if why is None:
        assert "grouped_topk" in opt_text(text, "fuse-grouped-topk")
        return
    reasons = refusal_reasons(text, "fuse-grouped-topk")
    assert len(reasons) == 1 and why in reasons[0], reasons


def test_scores_read_elsewhere_are_refused():
    """The sigmoid scores also feed an output: fusing would have to keep them alive."""
    text = TRACED.replace("return w=%180, ids=%175", "return w=%180, ids=%175, s=%165")
    reasons = refusal_reasons(text, "fuse-grouped-topk")
    assert len(reasons) == 1 and "outside the pattern" in reasons[0], reasons
