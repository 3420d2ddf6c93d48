"""Codegen: launch plans, kernel tables, ahead-of-time cubins for sm_80/sm_90 without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from braze.artifact import sha256_file
from braze.ir import all_ops
from braze.launch import compile_expr


FAMILY_CASES = ["llama", "mistral-window8", "qwen3-headdim24-tied", "mixtral", "qwen3_moe-dense-middle",
                "phi3-longrope-partial-tied", "gemma3-sandwich-softcap", "gemma4-ple-kvshare-moe"]


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_bf16_artifact_has_a_cubin_per_kernel_per_spec_per_target(store, case):
    root = store.artifact(case, opt_level=2, dtype="bfloat16", targets="sm_80,sm_90")
    m = json.loads((root / "manifest.json").read_text())
    assert m["targets"] == ["sm_80", "sm_90"]
    assert m["kernels"], "an -O2 artifact must use kernels"
    for vid, k in m["kernels"].items():
        assert k["specs"] and set(k["cubins"]) == {"sm_80", "sm_90"}, vid
        for t, by_key in k["cubins"].items():
            assert sorted(by_key) == k["specs"], (vid, t)
            for key, entry in by_key.items():
                for f in (entry["cubin"], entry["meta"]):
                    assert (root / f).is_file() and m["files"][f] == sha256_file(root / f)
                assert entry["shared"] <= (227 if t == "sm_90" else 163) * 1024
        assert (root / "kernels" / f"{k['module']}.py").is_file()


def test_step_limits_are_recorded_once_and_planned_for(store):
    """The manifest's step limits are the compile options, and plan-memory sized the arena
    for exactly those: compile and runtime share one set of numbers."""
    from braze.runtime import open_artifact
    art = open_artifact(store.artifact("llama", opt_level=2, max_num_tokens=40, max_num_seqs=6,
                                       max_model_len=72, block_size=8))
    assert art.manifest["limits"] == {"max_num_tokens": 40, "max_num_seqs": 6,
                                      "max_model_len": 72, "block_size": 8,
                                      "max_logits_rows": 6}     # R: one row per sequence
    assert art.graph.meta["memory"]["bindings"] == {"T": 40, "S": 6, "MB": 9, "R": 6}
    assert art.limits.bindings() == art.graph.meta["memory"]["bindings"]


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_plan_is_complete_and_well_formed(store, case):
    root = store.artifact(case, opt_level=2)
    m = json.loads((root / "manifest.json").read_text())
    plan = m["plan"]
    nodes = [launch["node"] for seg in plan["segments"] for launch in seg["launches"]]
    assert sorted(set(nodes)) == list(range(max(nodes) + 1))
    for seg in plan["segments"]:
        for launch in seg["launches"]:
            if "kernel" in launch:
                assert launch["kernel"] in m["kernels"]
                for g in launch["grid"]:
                    compile_expr(g)({"T": 5, "S": 2, "MB": 4, "R": 2})
    extern_by_design = {name for name, opdef in all_ops().items() if opdef.extern}
    assert set(plan["extern_ops"]) - extern_by_design <= {"cat", "index_select"}, plan["extern_ops"]


@pytest.mark.parametrize("case", ["llama", "gemma3-sandwich-softcap"])
def test_layers_share_one_set_of_workspaces(store, case):
    """A step runs its nodes' launches in order on one stream, so the layers' attentions use
    one set of split-KV workspaces (one per distinct shape: Gemma 3's local and global
    layers may differ), not a set each; the plan names only workspaces it declares."""
    m = json.loads((store.artifact(case, opt_level=2) / "manifest.json").read_text())
    plan = m["plan"]
    launches = [launch for seg in plan["segments"] for launch in seg["launches"]]
    used = {a["ws"] for launch in launches for a in launch.get("args", ()) if "ws" in a}
    assert used == set(plan["workspaces"])
    attention = [launch for launch in launches if launch.get("fn") == "attn_fwd_kernel"]
    layers = {launch["node"] for launch in attention}
    assert len(layers) >= 2
    sets = {tuple(a["ws"] for a in launch["args"] if "ws" in a) for launch in attention}
    shapes = {tuple(json.dumps(plan["workspaces"][w], sort_keys=True) for w in ws) for ws in sets}
    assert len(sets) == len(shapes) < len(layers)


def test_interpret_backend_imports_no_compiler(store):
    art = store.artifact("llama", opt_level=2)
    code = f"""
import sys
from braze.runtime import LLM, SamplingParams
LLM({str(art)!r}, backend="interpret").generate([[1, 2, 3]], SamplingParams(max_tokens=2))
bad = [m for m in sys.modules if m.split('.')[:2] in (['braze', 'frontend'], ['braze', 'passes'],
       ['braze', 'models'], ['braze', 'codegen'], ['braze', 'compiler'])]
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cuda_backend_without_gpu_is_a_clear_error(store):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, "-m", "braze", "generate", str(store.artifact("llama", opt_level=2)),
                        "--prompt-ids", "1,2", "--backend", "cuda"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_stored_cubins_load_as_triton_kernels(store):
    """Without a GPU, check everything short of launching: each stored cubin and its Triton
    metadata rebuild into a CompiledKernel for the variant's source, signature and spec."""
    from braze.kernel_modules import KernelModules
    from braze.runtime import open_artifact
    from braze.runtime.cubins import CubinCache
    art = open_artifact(store.artifact("qwen3_moe-dense-middle", opt_level=2, dtype="bfloat16",
                                       targets="sm_80,sm_90"))
    modules = KernelModules(art.root / "kernels", interpret=False)
    cache = CubinCache(art.root, art.manifest, modules)
    cache.usable, cache.target = True, "sm_90"        # as on an H100 with the same triton
    launches = {l["kernel"]: l for s in art.manifest["plan"]["segments"] for l in s["launches"]
                if "kernel" in l}
    assert launches
    for vid, launch in launches.items():
        for key, entry in art.manifest["kernels"][vid]["cubins"]["sm_90"].items():
            k = cache.get(vid, launch, key)
            assert k is not None, (vid, key)
            assert k.metadata.target.arch == 90
            assert k.kernel == (art.root / entry["cubin"]).read_bytes()
    assert cache.counts() == {"cubin": sum(len(art.manifest["kernels"][v]["specs"]) for v in launches),
                              "cubin_less_specialised": 0, "jit": 0}


def test_loading_kernels_never_writes_into_the_artifact(store):
    """With bytecode writing on (as on the GPU machine, unlike these CPU machines), opening
    and running an artifact twice leaves it unchanged: no kernels/__pycache__ appears, and
    the second open does not refuse an unlisted file."""
    import os
    art = store.artifact("llama", opt_level=2)
    before = sorted(str(p.relative_to(art)) for p in art.rglob("*"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "braze", "generate", str(art), "--prompt-ids",
                            "1,2,3", "--max-tokens", "2", "--backend", "interpret", "--json"],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(art)) for p in art.rglob("*")) == before


def test_generated_kernels_need_no_shared_directory(tmp_path, monkeypatch):
    """Generated kernel sources load from memory: nothing is written to a temporary directory
    that another user could plant code in, and a planted file there is never executed."""
    import hashlib
    import tempfile
    from braze.kernel_modules import KernelModules
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / "braze-kernels"
    planted.mkdir()
    marker = tmp_path / "ran"
    src = "import triton\n\n@triton.jit\ndef kernel(x):\n    pass\n"
    for name in ("pw_0", "pw_0_" + hashlib.sha256(src.encode()).hexdigest()[:16]):
        (planted / f"{name}.py").write_text(f"open({str(marker)!r}, 'w')\n")
    fn = KernelModules(tmp_path / "none", interpret=False, sources={"pw_0": src}).get("pw_0", "kernel")
    assert fn.src.strip().startswith("def kernel(x)") and not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["braze-kernels"]

