"""Gemma 4 specifics beyond the model-vs-transformers suites (conftest case
"gemma4-ple-kvshare-moe"): the KV cache of shared layers, what the fusion passes make of
the model, and the config errors a user can hit."""

from __future__ import annotations

import json

import pytest
import torch

from braze.ir.errors import BrazeError
from pass_helpers import assert_model_pass_preserves, model_graph, run_passes

CASE = "gemma4-ple-kvshare-moe"


def _hf_config(store):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(store.checkpoint(CASE))


def test_shared_layers_get_no_cache_and_the_cache_shrinks(store):
    """transformers' attention layers say which reuse another's K/V (`is_kv_shared_layer`):
    braze allocates cache only for the others, each [block, kv_heads, head_dim] of its own
    layer type. (Read from transformers' modules, not its config: `kv_sharing_modes` and
    `per_layer_config` are newer than the GPU image's transformers 5.17.)"""
    from transformers import AutoModelForCausalLM

    from braze.runtime import Executor, open_artifact
    cfg = _hf_config(store)
    attn = [layer.self_attn for layer in
            AutoModelForCausalLM.from_config(cfg).model.layers]
    shared = [a.is_kv_shared_layer for a in attn]
    assert shared.count(True) == 2
    ex = Executor(open_artifact(store.artifact(CASE)), num_blocks=4)
    owners = {i for i, s in enumerate(shared) if not s}
    assert set(ex.cache.tensors) == {f"{kv}_cache.{i}" for i in owners for kv in "kv"}

    def block_bytes(layers):
        return sum(2 * 16 * cfg.num_attention_heads // attn[i].num_key_value_groups
                   * attn[i].head_dim * 4 for i in layers)

    assert ex.cache.bytes_per_block == block_bytes(owners)
    assert ex.cache.bytes_per_block < block_bytes(range(cfg.num_hidden_layers))
    # each shared layer attends over the cache of the last earlier layer of its type
    reads = [n.operands[1].name for n in ex.graph.nodes if n.op == "paged_attention"]
    types = cfg.layer_types
    for i, name in enumerate(reads):
        src = i if not shared[i] else max(j for j in owners if types[j] == types[i])
        assert name == f"k_cache.{src}"
    assert [n.op for n in ex.graph.nodes].count("cache_write") == len(owners)


def test_o2_fuses_every_gemma4_pattern(store):
    """-O2 leaves no dense MoE, no unfused RoPE or cache write, and no RMSNorm math (the
    weightless value norms go to fuse-pointwise); everything but GEMMs and views runs as
    Triton kernels."""
    from braze.inspect import summarize
    s = summarize(store.artifact(CASE, opt_level=2))
    ops = s["ops"]
    for gone in ("einsum", "topk", "scatter", "softmax", "rsqrt", "cache_write", "paged_attention"):
        assert gone not in ops, gone
    assert ops["fused_moe"] == 5 and ops["attention"] == 5
    assert ops["rope_cache_write"] == 3 and ops["rope1"] == 2      # shared layers rotate q only
    m = json.loads((store.artifact(CASE, opt_level=2) / "manifest.json").read_text())
    assert m["plan"]["extern_ops"].keys() <= {"linear", "reshape", "select", "split", "unsqueeze"}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_fuse_norm_splits_norms_that_cse_merged(dtype, tmp_path_factory):
    """The residual is normed three times (dense MLP, experts, router) and a k_eq_v
    layer's projection twice (k with a weight, v without); canonicalize merges the shared
    x * rsqrt(...) and fuse-norm copies it back per norm, bit for bit."""
    g, params = model_graph("gemma4", tmp_path_factory.mktemp("g"), dtype=dtype)
    run_passes(g, ["canonicalize"])
    g = assert_model_pass_preserves(g, params, ["fuse-norm"], atol=0, rtol=0)
    counts = g.op_counts()
    # per layer: input, post-attn, pre-ff, post-ff, post-ff-1/2, pre-ff-2, post-PLE; router
    # (x * scale after the weightless norm is the plain form); q and k norms where k exists;
    # and PLE's projection norm plus the final norm
    layers, with_k = 5, 3
    norms = counts.get("rms_norm", 0) + counts.get("add_rms_norm", 0)
    assert norms == layers * (8 + 1 + 1) + with_k + 2
    # what is left of rsqrt: one weightless v norm per layer with a cache
    assert counts.get("rsqrt") == with_k


@pytest.mark.parametrize("overrides, words", [
    ({"num_kv_shared_layers": 5}, "num_kv_shared_layers=5 must be below"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"num_kv_shared_layers": 3, "layer_types": ["full_attention", "sliding_attention",
                                                 "sliding_attention", "sliding_attention",
                                                 "full_attention"]}, None),
])
def test_config_errors_name_the_key(overrides, words):
    from braze.models.registry import build_spec
    from braze.tiny import tiny_config
    cfg = tiny_config("gemma4", **overrides)
    if words is None:    # layer 2 (sliding) shares, and a sliding layer 1 writes before it
        spec = build_spec(cfg)
        assert spec.gemma4.kv_from == [None, None, 1, 1, 0]
        return
    with pytest.raises(BrazeError, match=words):
        build_spec(cfg)


def test_no_shared_producer_is_refused():
    from braze.models.registry import build_spec
    from braze.tiny import tiny_config
    cfg = tiny_config("gemma4", num_kv_shared_layers=2,
                      layer_types=["sliding_attention"] * 3 + ["full_attention"] * 2)
    with pytest.raises(BrazeError, match="layer 3 .full_attention. shares the KV cache"):
        build_spec(cfg)


def test_proportional_rope_rotates_only_the_first_pairs(store):
    """The global layers' cos/sin: 1 and 0 past the rotated quarter of each half-head."""
    from braze.models.registry import build_model, build_spec
    spec = build_spec(_hf_config(store))
    model = build_model(spec, torch.float32)
    cos, sin = model.model.rotary_emb(torch.arange(5))
    d = spec.gemma4.head_dims[1]
    rotated = int(0.25 * d // 2)
    assert cos.shape == (5, 1, d)
    for half in (0, d // 2):
        assert (cos[:, :, half + rotated:half + d // 2] == 1).all()
        assert (sin[:, :, half + rotated:half + d // 2] == 0).all()
    assert (sin[1:, :, :rotated] != 0).all()


def test_kv_shared_queries_of_one_layer_type_are_not_paired(tmp_path_factory):
    """Three shared layers, two of them sliding: their q rotations share cos/sin, yet none
    is the k of another; each is a rope1, and fuse-rope refuses nothing."""
    from braze.passes import PIPELINES
    g, _ = model_graph("gemma4", tmp_path_factory.mktemp("g"), num_kv_shared_layers=3)
    g, ctx = run_passes(g, PIPELINES[2], max_num_tokens=64, max_num_seqs=4, max_model_len=64)
    assert g.op_counts()["rope1"] == 3 and g.op_counts()["rope_cache_write"] == 2
    assert not [r for r in ctx.refusals if r.pass_name == "fuse-rope"], ctx.refusals


def test_dense_variant_matches_transformers(tmp_path):
    """The 31B-like dense form: no per-layer inputs, no MoE, no KV sharing, v from its own
    projection on global layers (the conftest case has every feature on)."""
    import braze
    from braze.ir.contract import SeqChunk
    from braze.runtime import Executor, open_artifact
    from braze.tiny import make_checkpoint
    from conftest import PROMPT, hf_model, step_inputs, take_blocks
    ckpt = make_checkpoint("gemma4", tmp_path / "m", seed=3, hidden_size_per_layer_input=0,
                           enable_moe_block=False, num_kv_shared_layers=0,
                           attention_k_eq_v=False, use_double_wide_mlp=False)
    braze.compile(ckpt, tmp_path / "a", opt_level=2, targets="")
    ex = Executor(open_artifact(tmp_path / "a"), num_blocks=4)
    assert len(ex.cache.tensors) == 2 * 5
    blocks = take_blocks(ex, 2)
    ex.run(step_inputs(ex, [SeqChunk(PROMPT[:7], 0, blocks)]))
    logits = ex.run(step_inputs(ex, [SeqChunk(PROMPT[7:], 7, blocks)]))
    with torch.no_grad():
        expected = hf_model(ckpt)(torch.tensor([PROMPT])).logits[0, -1:]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
