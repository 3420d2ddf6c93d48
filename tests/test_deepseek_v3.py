"""DeepSeek-V3 (MLA + grouped sigmoid MoE) against transformers' own DeepseekV3ForCausalLM.

Two tiny configs keep the real checkpoint's features (braze.tiny.tiny_config):
  - "dsv3": q_lora_rank (q_a_proj/q_a_layernorm/q_b_proj), interleaved rope, YaRN with
    mscale_all_dim (softmax scale x1.30), 4 expert groups of which 2 are kept,
    renormalised and scaled weights, a shared expert, one dense first layer;
  - "dsv3-plain": q_proj instead, rotate-half rope with default frequencies, 2 groups of
    which 1 is kept, no renormalisation.
float32 logits within 1e-4, greedy tokens identical, chunked prefill and mixed steps equal
to running alone, at -O0 and -O2 (reference interpreter) and through the kernels
(--backend interpret).
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from braze.ir.contract import SeqChunk

from conftest import (PROMPT, _Store, assert_greedy_matches_transformers,
                      assert_steps_match_transformers, executor, hf_model, step_inputs,
                      take_blocks)

CASES = {
    "dsv3": {},
    "dsv3-plain": {"q_lora_rank": None, "rope_interleave": False, "norm_topk_prob": False,
                   "n_group": 2, "topk_group": 1, "rope_parameters": {"rope_type": "default",
                                                                      "rope_theta": 10000.0}},
}


class _DSStore(_Store):
    def checkpoint(self, case: str):
        if case not in self.checkpoints:
            from braze.tiny import make_checkpoint
            d = self.factory.mktemp(case)
            with contextlib.redirect_stderr(io.StringIO()):
                self.checkpoints[case] = make_checkpoint("deepseek_v3", d / "model", seed=1,
                                                         **CASES[case])
        return self.checkpoints[case]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    torch.manual_seed(0)
    return _DSStore(tmp_path_factory)


@pytest.mark.parametrize("case", list(CASES))
def test_o0_prefill_logits_match_transformers(ds, case):
    ex = executor(ds, case, opt_level=0)
    logits = ex.run(step_inputs(ex, [SeqChunk(PROMPT, 0, take_blocks(ex, 2))]))
    with torch.no_grad():
        expected = hf_model(ds.checkpoint(case))(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_and_mixed_steps_match_transformers(ds, case, opt_level):
    assert_steps_match_transformers(ds, case, executor(ds, case, opt_level=opt_level))


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(ds, case, opt_level):
    assert_greedy_matches_transformers(ds, case, executor(ds, case, opt_level=opt_level),
                                       PROMPT[:11], 12)


@pytest.mark.parametrize("case", list(CASES))
def test_interpret_backend_matches_transformers(ds, case):
    ex = executor(ds, case, opt_level=2, backend="interpret", num_blocks=8)
    assert_steps_match_transformers(ds, case, ex)
    ex = executor(ds, case, opt_level=2, backend="interpret", num_blocks=8)
    assert_greedy_matches_transformers(ds, case, ex, PROMPT[:11], 5)


@pytest.mark.parametrize("opt_level", [0, 2])
def test_mixed_batch_equals_one_by_one(ds, opt_level):
    """Prefill, prefill-after-prefix and decode sequences in one step == each run alone."""
    a, b, c = PROMPT[:11], PROMPT[3:13], PROMPT[5:20]
    alone = []
    for seq_chunks in ([(a, 0)], [(b[:9], 0), (b[9:], 9)], [(c[:5], 0), (c[5:], 5)]):
        ex = executor(ds, "dsv3", opt_level=0)
        blocks = take_blocks(ex, 2)
        for toks, done in seq_chunks:
            out = ex.run(step_inputs(ex, [SeqChunk(toks, done, blocks)]))
        alone.append(out)
    ex = executor(ds, "dsv3", opt_level=0)
    ba, bb, bc = (take_blocks(ex, 2) for _ in range(3))
    ex.run(step_inputs(ex, [SeqChunk(b[:9], 0, bb), SeqChunk(c[:5], 0, bc)]))
    inputs = step_inputs(ex, [SeqChunk(a, 0, ba), SeqChunk(b[9:], 9, bb), SeqChunk(c[5:], 5, bc)])
    logits = ex.run(inputs)
    q = inputs["query_start_loc"].tolist()
    for i, expected in enumerate(alone):
        torch.testing.assert_close(logits[q[i]:q[i + 1]], expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_holds_the_latent_not_full_kv(ds):
    """One [NB, block, 1, kv_lora_rank + rope] tensor per layer: for the tiny config 40
    values per token per layer, against 4 heads x (24 + 12) = 144 for expanded K/V."""
    from braze.runtime import Executor, open_artifact
    ex = Executor(open_artifact(ds.artifact("dsv3")), num_blocks=4)
    cfg = json.loads((ex.artifact.root / "config.json").read_text())
    row = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    layers = cfg["num_hidden_layers"]
    assert sorted(ex.cache.tensors) == [f"kv_latent.{i}" for i in range(layers)]
    for t in ex.cache.tensors.values():
        assert tuple(t.shape) == (4, ex.block_size, 1, row)
    per_token = ex.cache.bytes_per_block // ex.block_size
    heads = cfg["num_attention_heads"]
    mha = layers * heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
                            + cfg["v_head_dim"]) * 4
    assert per_token == layers * row * 4 and per_token * 3 < mha


def test_o2_moe_runs_only_the_selected_experts(ds):
    """fuse-moe fuses the experts (fused_moe_routed), fuse-grouped-topk the grouped
    sigmoid router (grouped_topk): one real step pushes T * top_k rows through expert
    GEMMs, not T * E; the cache write is the latent one."""
    import braze.ir.op_moe as op_moe
    from braze.inspect import summarize
    s = summarize(ds.artifact("dsv3", opt_level=2))
    assert s["ops"].get("latent_cache_write") == 2 and "cache_write" not in s["ops"]
    assert s["ops"].get("fused_moe_routed") == 1 and "scatter" not in s["ops"]
    assert s["ops"].get("grouped_topk") == 1 and "topk" not in s["ops"]
    ex = executor(ds, "dsv3", opt_level=2)
    op_moe.EXPERT_GEMM_ROWS = 0
    ex.run(step_inputs(ex, [SeqChunk(PROMPT[:13], 0, take_blocks(ex, 1))]))
    assert op_moe.EXPERT_GEMM_ROWS == 13 * 2


def _router_launches(ds, case: str, skip: str | None = None) -> list[int]:
    """Per MoE layer, the launches of the -O2 plan that compute its routing: every node in
    the backward slice of fused_moe_routed's weights and ids, down to the router GEMM
    (linear, or the split of a merged one) and the parameters; a kernel counts once per
    launch, an extern call once unless it is a view (a view costs no kernel). `skip`: a
    pass left out of the pipeline."""
    from braze.codegen.plan import build_plan
    from braze.config import CompileOptions
    from braze.frontend import load_model
    from braze.frontend.kv_groups import assign_kv_groups
    from braze.ir import get_op
    from braze.passes import PassContext, PassManager, pipeline
    opts = CompileOptions(opt_level=2, targets="")
    g = load_model(ds.checkpoint(case), dtype="float32").graph
    assign_kv_groups(g)
    names = [n for n in pipeline(2) if n != skip]
    PassManager(names, ctx=PassContext(options=opts.to_json())).run(g)
    plan = build_plan(g, opts.to_json())
    launches = [ln for seg in plan["segments"] for ln in seg["launches"]
                if "extern" not in ln or not get_op(ln["extern"]).view]
    per_layer = []
    for moe in (n for n in g.nodes if n.op == "fused_moe_routed"):
        todo, seen = list(moe.operands[1:3]), set()
        while todo:
            node = todo.pop().producer
            if node is None or node.op in ("linear", "split") or g.index(node) in seen:
                continue
            seen.add(g.index(node))
            todo.extend(node.operands)
        per_layer.append(sum(ln["node"] in seen for ln in launches))
    return per_layer


@pytest.mark.parametrize("case", list(CASES))
def test_o2_routes_each_moe_layer_in_one_launch(ds, case):
    """fuse-grouped-topk: the grouped sigmoid router is one launch per MoE layer at -O2
    (the grouped_topk kernel); the same pipeline without the pass plans 10."""
    fused = _router_launches(ds, case)
    assert fused and fused == [1] * len(fused)
    assert _router_launches(ds, case, skip="fuse-grouped-topk") == [10] * len(fused)


def test_mtp_weights_are_recognised_and_shipped(ds, tmp_path):
    """The MTP layer's own tensors land in the artifact (mtp-*.safetensors, listed in the
    manifest, hashed) with its graph, in the compile dtype with the router kept float32;
    its copies of the embedding and LM head are not shipped twice; the main model still
    matches transformers, which ignores the layer (tests/test_mtp.py runs it)."""
    import braze
    from safetensors.torch import load_file
    from braze.runtime import Executor, open_artifact
    from braze.tiny_mtp import with_mtp_layer
    src = ds.checkpoint("dsv3")
    extra = with_mtp_layer(src, tmp_path / "m")
    logs = []
    braze.compile(tmp_path / "m", tmp_path / "a", opt_level=0, targets="", dtype="float16",
                  log=logs.append)
    assert any("MTP: kept" in ln for ln in logs) and not any("not used" in ln for ln in logs)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["mtp"]["num_layers"] == 1 and m["mtp"]["graph"] in m["files"]
    shipped = {}
    for f in m["mtp"]["files"]:
        assert f in m["files"]
        shipped.update(load_file(tmp_path / "a" / f))
    for k, v in extra.items():
        if k.endswith(("embed_tokens.weight", "shared_head.head.weight")):
            assert k not in shipped
            continue
        if k in shipped:           # per-expert tensors ship stacked, as the main graph's
            want = torch.float32 if ".mlp.gate." in k else torch.float16
            assert shipped[k].dtype == want
            torch.testing.assert_close(shipped[k], v.to(want))
    assert "model.layers.2.eh_proj.weight" in shipped
    ex = Executor(open_artifact(tmp_path / "a"), num_blocks=4)
    logits = ex.run(step_inputs(ex, [SeqChunk(PROMPT[:6], 0, take_blocks(ex, 1))]))
    assert logits.shape[-1] == 256 and torch.isfinite(logits).all()


def test_undeclared_extra_layer_is_a_clear_error(ds, tmp_path):
    import braze
    from braze.ir.errors import BrazeError
    from braze.tiny_mtp import with_mtp_layer
    with_mtp_layer(ds.checkpoint("dsv3"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 0
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BrazeError, match="num_nextn_predict_layers"):
        braze.compile(tmp_path / "m", tmp_path / "a", opt_level=0, targets="")


def test_o2_decodes_in_the_absorbed_form(ds):
    """absorb-mla replaced every mla_attention: the latent_attention kernel reads the
    latent cache, W_UK and W_UV are shipped per head."""
    from braze.inspect import summarize
    from braze.runtime import open_artifact
    root = ds.artifact("dsv3", opt_level=2)
    s = summarize(root)
    assert s["ops"].get("latent_attention") == 2 and "mla_attention" not in s["ops"]
    assert any(k["fn"] == "mla_attn_kernel" for k in s["kernels"].values())
    params = open_artifact(root).graph.params
    assert params["model.layers.0.self_attn.kv_b_proj.w_uk"].type.shape == (4, 16, 32)
    assert params["model.layers.0.self_attn.kv_b_proj.w_uv"].type.shape == (4, 12, 32)


def test_bf16_artifact_has_a_cubin_per_kernel_per_target(ds):
    from braze.artifact import sha256_file
    root = ds.artifact("dsv3", opt_level=2, dtype="bfloat16", targets="sm_80,sm_90")
    m = json.loads((root / "manifest.json").read_text())
    assert m["targets"] == ["sm_80", "sm_90"] and m["kernels"]
    assert {k["fn"] for k in m["kernels"].values()} >= {"mla_attn_kernel",
                                                        "latent_cache_write_kernel"}
    for vid, k in m["kernels"].items():
        assert k["specs"] and set(k["cubins"]) == {"sm_80", "sm_90"}, vid
        for t, by_key in k["cubins"].items():
            for entry in by_key.values():
                assert m["files"][entry["cubin"]] == sha256_file(root / entry["cubin"])
                assert entry["shared"] <= (227 if t == "sm_90" else 163) * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_bf16_close_to_transformers(ds, case):
    """The cuda backend in bf16 (absorbed MLA kernel, CUDA graphs) against transformers in
    bf16 on the same GPU, with tests/test_gpu.py's measured tolerance: at most a few times
    transformers' own bf16-vs-f32 difference."""
    from braze.runtime import Executor, open_artifact
    from conftest import run_step
    prompt = PROMPT[:11]
    art = open_artifact(ds.artifact(case, opt_level=2, dtype="bfloat16", targets="sm_80,sm_90"))
    ex = Executor(art, backend="cuda", num_blocks=16)
    ours = torch.cat([run_step(ex, [SeqChunk(prompt[:p], 0, take_blocks(ex, 1))])
                      for p in range(1, len(prompt) + 1)]).float()
    ref = hf_model(ds.checkpoint(case)).to("cuda")
    with torch.no_grad():
        f32 = ref(torch.tensor([prompt], device="cuda")).logits[0].float()
        b16 = ref.to(torch.bfloat16)(torch.tensor([prompt], device="cuda")).logits[0].float()
    noise, err = (b16 - f32).abs(), (ours - b16).abs()
    for stat in (torch.max, torch.median):
        assert stat(err) <= 4 * stat(noise) + 2 ** -8 * f32.abs().max(), (stat.__name__, err, noise)


def test_float16_kernels_equal_the_reference_interpreter(ds):
    """A float16 -O2 artifact: the MLA, routed-MoE, norm and pointwise kernels (interpreted)
    against the reference interpreter on the same artifact, over a mixed step."""
    from braze.runtime import Executor, open_artifact
    from conftest import run_step
    art = open_artifact(ds.artifact("dsv3", opt_level=2, dtype="float16"))
    outs = []
    for backend in ("reference", "interpret"):
        ex = Executor(art, backend=backend, num_blocks=8)
        a, b = take_blocks(ex, 1), take_blocks(ex, 1)
        run_step(ex, [SeqChunk(PROMPT[:5], 0, b)])
        outs.append(run_step(ex, [SeqChunk(PROMPT[:11], 0, a), SeqChunk(PROMPT[5:6], 5, b)]))
    assert outs[0].dtype == torch.float16
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("opt_level", [0, 2])
def test_full_mode_captures_no_break_op_that_reads_the_host(ds, opt_level):
    """-O0 keeps MLA's reference form (mla_attention, no kernel), which reads the step's
    lengths on the host: a whole-forward graph holding it would fail its capture on a GPU,
    so mode full replays the piecewise graphs there (the break op eager between them).
    Whatever the runner would capture reads nothing on the host, at either level."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from discipline_helpers import HostReads
    from braze.ir.contract import build_step
    from braze.runtime.graph_runner import GraphRunner
    from braze.runtime.input_batch import static_buffers
    ex = executor(ds, "dsv3", opt_level=opt_level, backend="interpret", num_blocks=8)
    r = GraphRunner(ex, static_buffers(16, 4, ex.max_blocks, ex.device), [1, 2, 4, 16], 4,
                    mode="full")
    r.capture()
    assert ("full_refused" in r.stats) == (opt_level == 0)
    assert r.full_capture == (None if opt_level == 0 else "any")
    step = [SeqChunk([5], 3, [0]), SeqChunk([8], 4, [1])]
    n, s = r.write_step(build_step(step, ex.block_size, ex.max_blocks))
    r.run(n, s, decode_only=True)
    assert r.last_variant == ("piecewise" if opt_level == 0 else "full")
    mixed = [SeqChunk([5, 6, 7], 0, [0]), SeqChunk([8], 4, [1])]
    n, s = r.write_step(build_step(mixed, ex.block_size, ex.max_blocks))
    r.run(n, s, decode_only=False)
    assert r.last_variant == ("piecewise" if opt_level == 0 else "full")
    for b in r._buckets.values():
        # interpret flattens the lists; piecewise graphs hold the non-break calls
        captured = b.full if b.full is not None else [
            c for c in b.pieces if ex.graph.nodes[c.node].opdef.graph_break is False]
        for c in captured:
            if c.name.startswith("extern."):
                with HostReads() as spy:
                    c()
                assert not spy.bad, (b.T, c, dict(spy.bad))
