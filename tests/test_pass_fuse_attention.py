"""fuse-attention: paged_attention (+ flattening reshape) -> the kernel `attention` op."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pass_helpers import assert_model_pass_preserves, model_graph, opt_text, same_text

BEFORE = """
graph @g(%q: f32[T, 4, 8], %k_cache.0: f32[NB, 4, 2, 8], %v_cache.0: f32[NB, 4, 2, 8], %query_start_loc: i32[S + 1], %seq_lens: i32[S], %block_tables: i32[S, MB]) {
  %0: f32[T, 4, 8] = paged_attention(%q, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.25, sliding_window=3}
  %1: f32[T, 32] = reshape(%0) {shape=[-1, 32]}
  return o=%1
}
"""


def test_flattening_reshape_folds_in():
    out = opt_text(BEFORE, "fuse-attention")
    assert same_text(out, """
graph @g(%q: f32[T, 4, 8], %k_cache.0: f32[NB, 4, 2, 8], %v_cache.0: f32[NB, 4, 2, 8], %query_start_loc: i32[S + 1], %seq_lens: i32[S], %block_tables: i32[S, MB]) {
  %2: f32[T, 32] = attention(%q, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.25, sliding_window=3, num_heads=4, num_kv_heads=2, head_dim=8}
  return o=%2
}
"""), out


def test_other_users_keep_the_head_layout():
    text = BEFORE.replace("return o=%1", "return o=%1, heads=%0")
    out = opt_text(text, "fuse-attention")
    assert "paged_attention" not in out and "reshape(%2) {shape=[-1, 4, 8]}" in out


def test_graph_without_attention_is_unchanged():
    text = "graph @g(%x: f32[T, 4]) {\n  %0: f32[T, 4] = neg(%x)\n  return y=%0\n}\n"
    assert opt_text(text, "fuse-attention") == text


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "mixtral", "qwen3_moe"])
def test_real_graphs(family, tmp_path_factory):
    g, params = model_graph(family, tmp_path_factory.mktemp("m"))
    layers = sum(1 for n in g.nodes if n.op == "paged_attention")
    g = assert_model_pass_preserves(g, params, ["fuse-attention"], atol=0, rtol=0)
    counts = g.op_counts()
    assert counts.get("attention") == layers and "paged_attention" not in counts


@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 6), window=st.sampled_from([0, 2, 5]), extra_user=st.booleans())
def test_equivalent_on_random_values(t, window, extra_user):
    from braze.ir import parse_graph
    from braze.ir.contract import SeqChunk, build_step
    from pass_helpers import run_passes
    import torch
    text = BEFORE.replace("sliding_window=3", f"sliding_window={window}")
    if extra_user:
        text = text.replace("return o=%1", "return o=%1, heads=%0")
    feeds = build_step([SeqChunk(list(range(t)), 2, [1, 0, 3])], 4, 3)
    gen = torch.Generator().manual_seed(t)
    feeds = {"q": torch.randn(t, 4, 8, generator=gen), "k_cache.0": torch.randn(4, 4, 2, 8, generator=gen),
             "v_cache.0": torch.randn(4, 4, 2, 8, generator=gen),
             **{k: feeds[k] for k in ("query_start_loc", "seq_lens", "block_tables")}}
    from braze.ir import run_graph
    want = run_graph(parse_graph(text), dict(feeds), {})
    g, _ = run_passes(parse_graph(text), ["fuse-attention"])
    got = run_graph(g, dict(feeds), {})
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
