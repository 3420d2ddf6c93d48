"""tabulate-positions: RoPE's cos/sin (anything computed from the positions alone) become
tables over every position, read by one gather, on real traced families: the step's
outputs and caches equal the traced graph's at positions up to the last one a block table
holds; the refusals say why."""

from __future__ import annotations

import pytest
import torch

from braze.ir import parse_graph, print_graph, run_graph
from pass_helpers import (materialize_params, model_graph, model_step_feeds, opt_text,
                          refusal_reasons, run_passes)

MAX_LEN, BLOCK = 60, 16                 # the tables cover 64 positions (4 blocks)
OPTIONS = dict(max_model_len=MAX_LEN, block_size=BLOCK)


def _positions_ops(g):
    """The nodes that read %positions, by op."""
    pos = g.input("positions")
    return sorted(n.op for n in g.nodes if pos in n.operands)


# longrope past its original length (the long factors at every position, one set: no switch
# by position in the graph); gemma3 and gemma4 have two RoPE
# bases (four tables, one gather); deepseek_v3 interleaved (GPT-J) YaRN on MLA's rope dims
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3", "gemma4",
                                    "deepseek_v3"])
def test_tables_give_the_traced_values_at_every_position(tmp_path, family):
    overrides = {}
    if family == "phi3":
        from braze.tiny import tiny_longrope
        overrides = {"original_max_position_embeddings": 32,        # long factors: 256 > 32
                     "rope_scaling": tiny_longrope(12, original=32)}
    g, params = model_graph(family, tmp_path, **overrides)
    if family == "phi3":
        assert not [n for n in g.nodes if n.op == "ge"]     # one factor set for all positions
    run_passes(g, ["canonicalize"], **OPTIONS)
    before = print_graph(g)
    run_passes(g, ["tabulate-positions"], **OPTIONS)
    assert _positions_ops(g) == ["index_select"], family
    assert not {"cos", "sin"} & set(g.op_counts())
    tables = [p for name, p in g.params.items() if name.startswith("positions.table")]
    assert tables and all(p.type.shape[0] == 64 for p in tables if p.recipe.op != "arange")
    # a decode at the last position a block table holds, and a prefill across longrope's
    # original length (32) in the same step
    feeds = model_step_feeds(g, prompts=(tuple(range(3, 67)), tuple(range(5, 45))),
                             cached=(63, 20))
    ref = parse_graph(before)
    ref_feeds = {k: v.clone() for k, v in feeds.items()}
    got_feeds = {k: v.clone() for k, v in feeds.items()}
    want = run_graph(ref, ref_feeds, materialize_params(ref, params))
    got = run_graph(g, got_feeds, materialize_params(g, params))
    assert feeds["positions"].max().item() == 63
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    for k in feeds:
        if k.startswith(("k_cache.", "v_cache.", "kv_latent.")):
            torch.testing.assert_close(got_feeds[k], ref_feeds[k], atol=1e-5, rtol=1e-5)


TEXT = """
graph @g(%positions: i64[T], %x: f32[T, 4]) {
  param @f: f32[1, 4]
  %0: f32[T] = cast(%positions) {dtype="f32"}
  %1: f32[T, 1] = unsqueeze(%0) {dim=1}
  %2: f32[T, 4] = mul(%1, @f)
  %3: f32[T, 4] = cos(%2)
  %4: f32[T, 4] = mul(%x, %3)
  return y=%4
}
"""


def test_the_ir_before_and_after():
    got = opt_text(TEXT, "tabulate-positions", **OPTIONS)
    assert "param @positions.table: i64[64] = arange() {n=64}" in got
    assert "param @positions.table.cos: f32[64, 4] = cos(@positions.table.mul)" in got
    assert "= index_select(@positions.table.cos, %positions) {dim=0}" in got
    # mul(%x, ..) reads another input too: the table ends at its operand, which it reads
    assert "cast(%positions)" not in got and "mul(%x, %" in got and got.count("index_select") == 1


def test_tables_of_two_shapes_take_two_gathers():
    """Frontier values of different shapes (Gemma 4's head sizes) get a table each."""
    text = TEXT.replace("%4: f32[T, 4] = mul(%x, %3)\n  return y=%4",
                        "%4: f32[T, 4] = mul(%x, %3)\n  %5: f32[T, 1, 4] = unsqueeze(%2) {dim=1}"
                        "\n  return y=%4, z=%5")
    got = opt_text(text, "tabulate-positions", **OPTIONS)
    assert got.count("index_select(") == 2 and "split(" not in got


def test_refusals_say_why():
    assert refusal_reasons(TEXT, "tabulate-positions") == [
        "tabulate-positions: no max_model_len in the options, so the positions a table must "
        "cover are unknown (braze opt: --set max_model_len=N)"]
    (reason,) = refusal_reasons(TEXT, "tabulate-positions", max_model_len=1 << 26,
                                block_size=16)
    assert "MiB" in reason and "computed every step instead" in reason


def test_tables_side_by_side_start_16_byte_aligned():
    """Parts of one table are padded to 16-byte multiples: each part's view starts aligned
    (codegen/specialize.py compiles the kernels' cubins assuming aligned pointers)."""
    text = """
graph @g(%positions: i64[T]) {
  param @f: f32[1, 6]
  %0: f32[T] = cast(%positions) {dtype="f32"}
  %1: f32[T, 1] = unsqueeze(%0) {dim=1}
  %2: f32[T, 6] = mul(%1, @f)
  %3: f16[T, 6] = cos(%2)
  %4: f16[T, 6] = sin(%2)
  %5: f16[T, 6] = cast(%3) {dtype="f16"}
  %6: f16[T, 6] = cast(%4) {dtype="f16"}
  return c=%5, s=%6
}
"""
    from pass_helpers import assert_pass_preserves
    g = assert_pass_preserves(text.replace("f16[T, 6] = cos", "f32[T, 6] = cos")
                              .replace("f16[T, 6] = sin", "f32[T, 6] = sin"),
                              ["tabulate-positions"], {"T": 5}, **OPTIONS)
    (split,) = [n for n in g.nodes if n.op == "split"]
    assert split.attrs["sizes"] == [6, 2, 6, 2]
    assert [g.outputs["c"], g.outputs["s"]] == [split.results[0], split.results[2]]
