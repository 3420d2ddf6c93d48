"""absorb-mla: expanded MLA -> W_UK folded into q, latent_attention, W_UV after."""

from __future__ import annotations

from braze.ir import parse_graph, print_graph
from pass_helpers import assert_model_pass_preserves, model_graph, refusal_reasons


def test_deepseek_v3_graph_is_absorbed_and_computes_the_same(tmp_path):
    g, params = model_graph("deepseek_v3", tmp_path)
    assert g.op_counts()["mla_attention"] == 2
    g = assert_model_pass_preserves(g, params, ["absorb-mla"], atol=1e-5, rtol=1e-5)
    ops = g.op_counts()
    assert ops["latent_attention"] == 2 and "mla_attention" not in ops
    recipes = {n: p.recipe.op for n, p in g.params.items() if p.recipe is not None}
    assert recipes["model.layers.1.self_attn.kv_b_proj.w_uk"] == "slice"
    assert parse_graph(print_graph(g)) is not None        # derived params print and parse


def test_no_q_lora_and_plain_rope_too(tmp_path):
    g, params = model_graph("deepseek_v3", tmp_path, q_lora_rank=None, rope_interleave=False)
    assert_model_pass_preserves(g, params, ["absorb-mla"], atol=1e-5, rtol=1e-5)


COMPUTED_WEIGHT = """
graph @m(%q: f32[T, 2, 24], %kv_latent.0: f32[NB, 4, 1, 40], %query_start_loc: i32[S + 1], %seq_lens: i32[S], %block_tables: i32[S, MB], %w: f32[56, 32]) {
  %0: f32[56, 32] = mul(%w) {scalar=2.0}
  %1: f32[T, 2, 12] = mla_attention(%q, %kv_latent.0, %0, %query_start_loc, %seq_lens, %block_tables) {scale=0.25, kv_lora_rank=32}
  return o=%1
}
"""


def test_a_computed_kv_b_weight_is_refused_with_the_reason():
    reasons = refusal_reasons(COMPUTED_WEIGHT, "absorb-mla")
    assert reasons and "computed in the graph" in reasons[0], reasons
