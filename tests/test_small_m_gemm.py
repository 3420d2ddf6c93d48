"""`--small-m-gemm triton`: the per-bucket choice between the Triton skinny GEMM (T <= 16) and
the extern cuBLAS call (larger buckets), from the launch plan through the interpret backend
to `braze inspect`, against the extern artifact and transformers."""

from __future__ import annotations

import pytest
import torch

from braze.ir.contract import SeqChunk
from braze.ir.errors import BrazeError
from braze.runtime import Executor, open_artifact

from conftest import hf_model, run_step, take_blocks

MAX_TOKENS = 24               # buckets 1, 2, 4, 8, 16, 24: four with the kernel, one without
OPTS = dict(opt_level=2, max_num_tokens=MAX_TOKENS)
PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45]
LONG = PROMPT + [200, 3, 77, 12, 190, 55, 8, 101, 42, 5]          # 21 tokens: bucket 24


def _linear_launches(manifest: dict) -> dict[int, list[dict]]:
    from braze.ir import parse_graph
    g = parse_graph((manifest["_root"] / "graph.bir").read_text())
    linears = {i for i, n in enumerate(g.nodes) if n.op in ("linear", "linear_glu")}
    out: dict[int, list[dict]] = {i: [] for i in linears}
    for seg in manifest["plan"]["segments"]:
        for launch in seg["launches"]:
            if launch["node"] in linears:
                out[launch["node"]].append(launch)
    return out


def test_every_linear_gets_a_guarded_kernel_and_a_guarded_extern_call(store):
    art = open_artifact(store.artifact("llama", small_m_gemm="triton", **OPTS))
    m = dict(art.manifest, _root=art.root)
    by_node = _linear_launches(m)
    assert len(by_node) == 9                  # 2 layers x (qkv, o, gate_up, down) + lm_head
    glu = {i for i, ls in by_node.items() if any(ln.get("fn") == "glu_kernel" for ln in ls)}
    assert len(glu) == 2                      # gate_up + silu * mul: linear_glu
    for node, launches in by_node.items():
        kernels = [ln for ln in launches if "kernel" in ln and ln["fn"] != "glu_kernel"]
        externs = [ln for ln in launches if "extern" in ln]
        assert kernels and all(ln["when"] == {"T": [1, 16]} for ln in kernels), node
        assert [ln["when"] for ln in externs] == [{"T": [17, None]}], node
        # a gated linear: above the kernel's buckets cuBLAS writes h, then the epilogue
        assert [ln["when"] for ln in launches if ln.get("fn") == "glu_kernel"] == \
            ([{"T": [17, None]}] if node in glu else []), node
        assert all(ln["constexprs"]["ACT"] == (1 if node in glu else 0) for ln in kernels)
        for ln in kernels:       # spec keys only for the buckets the guard admits: M in 1..16
            specs = m["kernels"][ln["kernel"]]["specs"]
            m_at = next(i for i, a in enumerate(ln["args"]) if "expr" in a)
            assert {k[m_at] for k in specs} <= {"1", "D", "-"} and "1" in {k[m_at] for k in specs}
    small = m["plan"]["small_m_gemm"]
    assert small["max_tokens"] == 16 and all("when" in e for e in small["linears"])
    assert m["options"]["small_m_gemm"] == "triton"
    plain = open_artifact(store.artifact("llama", **OPTS)).manifest
    assert "small_m_gemm" not in plain["plan"] and plain["options"]["small_m_gemm"] == "extern"
    assert not any("when" in ln for seg in plain["plan"]["segments"] for ln in seg["launches"])


@pytest.mark.parametrize("case", ["llama", "qwen2-qkv-bias-tied", "phi3-longrope-partial-tied",
                                  "gemma3-sandwich-softcap", "qwen3_moe-dense-middle"])
def test_interpret_logits_equal_the_extern_artifact(store, case):
    """Eager steps through the plans: a prefill and a decode (T <= 16: the kernel) and a
    21-token chunk (T > 16: cuBLAS), in float32 within 1e-4 of the extern artifact (Qwen2:
    q/k/v biases, and the LM head over the tied embedding). The gated MLPs are linear_glu
    (tests/test_linear_glu.py): the act in the kernel's epilogue at T <= 16, cuBLAS and
    glu_kernel above; Phi-3 with its fused gate_up checkpoint, Gemma 3 with GeLU tanh, the
    dense layer of a Qwen3-MoE."""
    outs = []
    for small in ("triton", "extern"):
        ex = Executor(open_artifact(store.artifact(case, small_m_gemm=small, **OPTS)),
                      backend="interpret", num_blocks=8)
        a, b = take_blocks(ex, 2), take_blocks(ex, 2)
        got = [run_step(ex, [SeqChunk(PROMPT[:9], 0, a)])]
        got.append(run_step(ex, [SeqChunk(PROMPT[9:10], 9, a)]))
        got.append(run_step(ex, [SeqChunk(LONG, 0, b)]))
        outs.append(got)
    for t, e in zip(*outs):
        torch.testing.assert_close(t, e, atol=1e-4, rtol=1e-4)


def test_split_k_plan_binds_the_kernel_exactly_at_small_buckets(tmp_path, store, monkeypatch):
    """Greedy tokens equal transformers' through the bound plans (the runtime's replay path),
    with small W tiles so that down_proj (K = 128) splits K: its workspace is reserved for
    the largest bucket its launches run at (16), not the largest bucket (24)."""
    import braze
    from braze.codegen.kernels import skinny_gemm
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    monkeypatch.setattr(skinny_gemm, "TILE_BYTES", 1024)
    out = tmp_path / "split.braze"
    braze.compile(store.checkpoint("llama"), out, small_m_gemm="triton", targets="", **OPTS)
    art = open_artifact(out)
    fns = {v["fn"] for v in art.manifest["kernels"].values() if v["module"] == "skinny_gemm"}
    assert fns == {"skinny_gemm_kernel", "glu_kernel"}      # split K is one launch too
    eng = Engine(art, backend="interpret", num_kv_blocks=16, max_num_seqs=4,
                 buckets=[1, 2, 4, 8, 16])
    eng.add_request("r", list(PROMPT), SamplingParams(max_tokens=5, ignore_eos=True))
    ours = eng.run_to_completion()["r"].token_ids
    with torch.no_grad():
        theirs = hf_model(store.checkpoint("llama")).generate(
            torch.tensor([PROMPT]), max_new_tokens=5, do_sample=False)
    assert ours == theirs[0, len(PROMPT):].tolist()
    graphs = eng.runner.graphs
    assert graphs.buckets == [1, 2, 4, 8, 16, 24]
    for T in graphs.buckets:
        names = [c.name for c in graphs._buckets[T].plan.calls]
        gemms = sum("skinny_gemm_kernel" in n for n in names)
        cublas = sum(n == "extern.linear" for n in names)
        glu = sum("glu_kernel" in n for n in names)       # gated MLPs' epilogue on its own
        assert (gemms, cublas, glu) == ((9, 0, 0) if T <= 16 else (0, 9, 2)), (T, names)
    runner = eng.runner.executor.plan.runner
    partials = {k: v for k, v in runner._ws_flat.items() if k.endswith(".partials")}
    assert len(partials) == 1                       # one, which both down_projs use in turn
    assert all(t.numel() == 2 * 16 * 64 for t in partials.values())   # [SPLIT_K, T=16, N]
    node = next(iter(partials)).split(".")[1]       # the GEMM's arrival counts, reset each time
    assert not runner._ws_flat[f"ws.{node}.arrived"].any()


def test_inspect_names_the_triton_gemms_and_their_buckets(store):
    from braze.inspect import format_summary, summarize
    text = format_summary(summarize(store.artifact("llama", small_m_gemm="triton", **OPTS)))
    line = next(x for x in text.splitlines() if x.startswith("small-M"))
    assert "buckets 1, 2, 4, 8, 16 (T <= 16)" in line and "9 of 9 linears" in line
    for name in ("qkv_proj x2", "o_proj x2", "gate_up_proj + silu(gate) * up x2",
                 "down_proj x2", "lm_head x1"):
        assert name in line
    assert "GEMMs Triton skinny GEMM at T <= 16" in text
    plain = format_summary(summarize(store.artifact("llama", **OPTS)))
    assert "small-M" not in plain and "GEMMs extern (torch/cuBLAS)" in plain


def test_cli_compiles_with_the_option_and_refuses_a_bad_one(store, tmp_path, capsys):
    """`braze compile --small-m-gemm triton` records it; `braze inspect` shows it; an unknown
    value is a one-line error naming the option."""
    from braze.cli import main
    out = tmp_path / "sm.braze"
    assert main(["compile", str(store.checkpoint("llama")), "-o", str(out), "--small-m-gemm",
                 "triton", "--targets", "", "--max-num-tokens", "24", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "small-M    linear at buckets 1, 2, 4, 8, 16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compile", "m", "-o", str(tmp_path / "x"), "--small-m-gemm", "cutlass"])
    assert "--small-m-gemm: invalid choice: 'cutlass'" in capsys.readouterr().err


def test_refusals_name_the_option():
    from braze.compiler import _check_small_m
    from braze.config import CompileOptions
    from braze.codegen.plan import build_plan
    from braze.ir import Graph, T, TensorType
    with pytest.raises(BrazeError, match="--small-m-gemm must be one of extern, triton"):
        CompileOptions(small_m_gemm="cublas").validate()
    g = Graph("rank3")          # a linear over [T, 2, 8] rows: not the kernel's [M, K]
    x = g.add_input("x", TensorType((T, 2, 8), "f32"))
    g.set_output("y", g.op("linear", x, g.add_param("w", TensorType((4, 8), "f32"))))
    plan = build_plan(g, {"small_m_gemm": "triton"})
    assert plan["small_m_gemm"]["linears"][0]["extern_because"].startswith("input %")
    assert not any("when" in ln for seg in plan["segments"] for ln in seg["launches"])
    with pytest.raises(BrazeError, match="--small-m-gemm triton has nothing to apply to: none "
                                         "of its 1 linears can run it"):
        _check_small_m(plan["small_m_gemm"], print)
    with pytest.raises(BrazeError, match="the graph has no linear op"):
        _check_small_m({"max_tokens": 16, "linears": []}, print)


def test_an_unsigned_triton_artifact_is_verified_by_regeneration(store, tmp_path):
    """The guarded plans are a function of graph.bir and the recorded options: a host that
    trusts no key regenerates them exactly."""
    import shutil
    a = tmp_path / "a"
    shutil.copytree(store.artifact("llama", small_m_gemm="triton", **OPTS), a)
    (a / "signature.json").unlink()
    trust = open_artifact(a).trust
    assert trust.how == "verified", trust.detail
    assert "skinny_gemm" in trust.kernel_hashes


@pytest.mark.parametrize("bad", ["T<=16", {}, {"Q": [1, 2]}, {"T": [1]}, {"T": [None, 3]},
                                 {"T": ["1", 16]}, {"T": [True, 16]}])
def test_a_malformed_guard_is_refused_naming_it(bad):
    from braze.launch import compile_guard
    with pytest.raises(BrazeError, match="launch guard"):
        compile_guard(bad)


def test_guards_admit_exactly_their_range():
    from braze.launch import compile_guard
    small, large = compile_guard({"T": [1, 16]}), compile_guard({"T": [17, None]})
    assert [small({"T": t}) for t in (1, 16, 17)] == [True, True, False]
    assert [large({"T": t}) for t in (16, 17, 8192)] == [False, True, True]
    assert compile_guard(None)({"T": 5})


def test_lora_artifacts_run_the_base_linear_on_the_kernel(store):
    """add-lora keeps each base linear a plain `linear` (its delta is a separate `lora` op),
    so every linear still gets the kernel at the small buckets."""
    m = open_artifact(store.artifact("llama", small_m_gemm="triton", lora_slots=2,
                                     **OPTS)).manifest
    small = m["plan"]["small_m_gemm"]["linears"]
    assert len(small) == 9 and all("when" in e for e in small)
    assert m["compile"]["ops_after"].get("lora", 0) > 0
