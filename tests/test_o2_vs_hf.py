"""Every family compiled at -O2 (all fusions, segments, memory plan) against transformers.

float32 logits within 1e-4 and greedy tokens identical, as at -O0; plus what the
pipeline must have done to each graph.
"""

from __future__ import annotations

import pytest

from braze.ir.contract import SeqChunk

from conftest import (CASES, PROMPT, assert_greedy_matches_transformers,
                      assert_steps_match_transformers, executor, run_step, take_blocks)


SHARED_KV = {"gemma4-ple-kvshare-moe": (3, 4)}      # layers that read another layer's cache


def _executor(store, case):
    return executor(store, case, opt_level=2)


@pytest.mark.parametrize("case", list(CASES))
def test_o2_logits_match_transformers(store, case):
    assert_steps_match_transformers(store, case, _executor(store, case))


@pytest.mark.parametrize("case", list(CASES))
def test_o2_greedy_generation_matches_transformers(store, case):
    assert_greedy_matches_transformers(store, case, _executor(store, case), PROMPT[:11], 16)


@pytest.mark.parametrize("case", list(CASES))
def test_o2_pipeline_did_its_work(store, case):
    from braze.inspect import summarize
    s = summarize(store.artifact(case, opt_level=2))
    ops = s["ops"]
    layers = s["model"]["num_layers"]
    assert [p["name"] for p in s["passes"]][-2:] == ["split-segments", "plan-memory"]
    assert ops.get("attention") == layers and "paged_attention" not in ops
    # one cache write per layer that has a KV cache (Gemma 4's shared layers have none)
    caches = sum(1 for name in s["inputs"] if name.startswith("k_cache."))
    assert caches == layers - len(SHARED_KV.get(case, ()))
    assert ops.get("rope_cache_write") == caches and "cache_write" not in ops
    assert "einsum" not in ops and "topk" not in ops          # no dense MoE left
    # the default cudagraph mode full: one segment, attention inside it
    assert s["graph_breaks"] == 0 and s["segments"] == 1
    assert s["arena_bytes"] > 0
    assert sum(ops.values()) < sum(s["ops_before_passes"].values()) / 2
    assert s["outputs"]["logits"].startswith("f32[R,")       # the logits rows (pruned)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe-dense-middle", "qwen3_moe-step2-nonorm",
                                  "gemma4-ple-kvshare-moe"])
def test_o2_moe_computes_only_the_selected_experts(store, case):
    """Count the rows the fused MoE pushes through expert GEMMs in one real step."""
    import braze.ir.op_moe as op_moe
    ex = _executor(store, case)
    import json
    config = json.loads((ex.artifact.root / "config.json").read_text())
    top_k = config.get("num_experts_per_tok") or config["top_k_experts"]     # Gemma 4
    moe_layers = ex.graph.op_counts().get("fused_moe", 0)
    assert moe_layers >= 1 and all(n.attrs["top_k"] == top_k for n in ex.graph.nodes
                                   if n.op == "fused_moe")
    op_moe.EXPERT_GEMM_ROWS = 0
    tokens = 13
    run_step(ex, [SeqChunk(PROMPT[:tokens], 0, take_blocks(ex, 1))])
    assert op_moe.EXPERT_GEMM_ROWS == tokens * top_k * moe_layers


def test_opt_print_after_all_and_round_trip(store, tmp_path):
    """`braze opt` over a traced graph: each pass's IR printed, the final text a fixed point."""
    import subprocess
    import sys
    src = store.artifact("qwen3-headdim24-tied") / "graph.bir"      # -O0: the traced graph
    passes = "canonicalize,merge-projections,fuse-norm,fuse-rope,fuse-attention"
    run = lambda *a: subprocess.run([sys.executable, "-m", "braze", "opt", *map(str, a)],
                                    capture_output=True, text=True, timeout=300)
    r = run(src, "--passes", passes, "--print-after-all", "--stats")
    assert r.returncode == 0, r.stderr
    for name in passes.split(","):
        assert f"// ----- after {name} -----" in r.stdout
        assert f"{name}: " in r.stderr
    final = run(src, "--passes", passes)
    assert final.returncode == 0 and "rope_cache_write" in final.stdout
    (tmp_path / "o.bir").write_text(final.stdout)
    again = run(tmp_path / "o.bir", "--passes", "")
    assert again.stdout == final.stdout
    last = r.stdout.split("// ----- after fuse-attention -----\n")[1]
    assert last == final.stdout


def test_inspect_json_reports_the_pipeline(store):
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "braze", "inspect", "--json",
                        str(store.artifact("mixtral", opt_level=2))],
                       capture_output=True, text=True, timeout=300)
    info = json.loads(r.stdout)
    for key in ("ops", "passes", "segments", "graph_breaks", "arena_bytes"):
        assert key in info
    assert all(set(p) >= {"name", "matches", "ms"} for p in info["passes"])
    assert info["ops"]["fused_moe"] == 3 and (info["segments"], info["graph_breaks"]) == (1, 0)
