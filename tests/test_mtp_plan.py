"""The MTP graphs' own launch plans (braze/compiler.py builds them, codegen/emit.py writes
them, runtime/mtp_proposer.mtp_runner runs them): with backend `interpret` the `mtp`
proposers run Triton kernels, not the reference interpreter.

- every MTP call of a generation, run through the plan, equals the IR's reference
  interpreter on the same inputs (a copy of the MTP cache as it was before the call):
  logits and hidden states within 1e-4, and the MTP KV the call writes too; for
  DeepSeek-V3's next-n layer and for Gemma 4's assistant model;
- greedy output with mtp k=2 at `interpret` equals plain greedy;
- the plan is verified like the main one (an unsigned artifact regenerates it from
  mtp.bir; a changed MTP launch plan is refused);
- its kernels compile to cubins for sm_80 and sm_90, stored under mtp-cubin/;
- on a GPU, the cuda backend runs it and output equals plain greedy.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from braze.ir.errors import BrazeError
from braze.ir.interpreter import Interpreter
from braze.runtime.engine import Engine
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of, run_all

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
MTP = {"method": "mtp", "num_speculative_tokens": 2}


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory):
    """An -O2 float32 DeepSeek-V3 artifact whose next-n layer guesses well."""
    import braze
    from braze.tiny_mtp import guessing_deepseek
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mtpplan")
    ckpt = guessing_deepseek(d)
    braze.compile(ckpt, d / "a", opt_level=2, targets="", dtype="float32", max_num_seqs=4,
                  max_logits_rows=16, max_num_tokens=64)
    return d / "a"


def _checked(proposer, diffs, written):
    """Wrap the proposer's plan call: each call is also run by the reference interpreter on
    copies of its inputs as they were, and the largest difference is recorded."""
    interp = Interpreter(proposer.graph)
    plan = proposer.run_graph

    def run(feeds):
        ref = {k: v.clone() for k, v in feeds.items()}
        got = plan(feeds)
        got = {k: v.clone() for k, v in got.items()}
        want = interp.run(ref, proposer.params)        # writes its cache copy in `ref`
        for k in ("logits", "hidden_states"):
            diffs.append((got[k] - want[k]).abs().max().item())
        for k, v in feeds.items():            # what each wrote (the MTP's latent cache)
            if v.is_floating_point():
                diffs.append((v - ref[k]).abs().max().item())
                written.append(bool((v != 0).any()))
        return got
    proposer.run_graph = run


def _spec_run(art, prompts):
    plain = run_all(Engine(art, backend="interpret", cudagraph_mode="none"), prompts, GREEDY)
    eng = Engine(art, backend="interpret", cudagraph_mode="none", speculative=MTP)
    assert eng.spec.proposer.runs_on == "plan"
    diffs, written = [], []
    _checked(eng.spec.proposer, diffs, written)
    got = run_all(eng, prompts, GREEDY)
    assert any(written)
    return plain, got, diffs, eng


def test_deepseek_mtp_plan_equals_the_reference_interpreter(dsv3):
    plain, got, diffs, eng = _spec_run(dsv3, prompts_of([6, 11], seed=8))
    assert eng.spec.proposer.num_mtp_calls > 0 and diffs
    assert max(diffs) < 1e-4
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0


def test_reference_backend_keeps_the_interpreter(dsv3):
    eng = Engine(dsv3, backend="reference", speculative=MTP)
    assert eng.spec.proposer.runs_on == "reference"


def test_mtp_plan_is_in_the_manifest_and_verified(dsv3, tmp_path):
    from braze.runtime import open_artifact
    m = json.loads((dsv3 / "manifest.json").read_text())
    mtp = m["mtp"]
    assert mtp["plan"]["segments"] and mtp["kernels"]
    # at -O2 the MTP graph gets the main pipeline's fusions: absorbed MLA attention, norms
    assert {k["fn"] for k in mtp["kernels"].values()} >= {"latent_cache_write_kernel",
                                                         "mla_attn_kernel"}
    assert set(mtp["plan"]["extern_ops"]) <= {"linear", "einsum", "reshape", "slice",
                                              "split", "unsqueeze"}
    for k in mtp["kernels"].values():
        assert (dsv3 / "kernels" / f"{k['module']}.py").is_file()
    # unsigned: trusted only because its plans, the MTP's too, regenerate
    copy = tmp_path / "copy"
    shutil.copytree(dsv3, copy)
    (copy / "signature.json").unlink(missing_ok=True)
    trust = open_artifact(copy).trust
    assert trust.how == "verified" and "from graph.bir and mtp.bir" in trust.detail
    seg = mtp["plan"]["segments"][0]
    launch = next(i for i, x in enumerate(seg["launches"]) if "grid" in x)
    seg["launches"][launch]["grid"] = ["1"]
    (copy / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    with pytest.raises(BrazeError, match=r"MTP launch plan at segments\[0\].*mtp\.bir"):
        open_artifact(copy, check_hashes=False)


def test_mtp_kernels_compile_to_cubins(tmp_path):
    import braze
    from braze.artifact import sha256_file
    from braze.tiny import make_checkpoint
    from braze.tiny_mtp import with_mtp_layer
    base = make_checkpoint("deepseek_v3", tmp_path / "base", seed=1)
    with_mtp_layer(base, tmp_path / "m")
    ckpt = tmp_path / "m"
    root = braze.compile(ckpt, tmp_path / "a", opt_level=2, dtype="bfloat16",
                         targets="sm_80,sm_90").root
    m = json.loads((root / "manifest.json").read_text())
    kernels = m["mtp"]["kernels"]
    assert kernels
    for vid, k in kernels.items():
        assert set(k["cubins"]) == {"sm_80", "sm_90"}, vid
        for t, by_key in k["cubins"].items():
            assert sorted(by_key) == k["specs"], (vid, t)
            for entry in by_key.values():
                assert entry["cubin"].startswith(f"mtp-cubin/{t}/")
                assert m["files"][entry["cubin"]] == sha256_file(root / entry["cubin"])
                assert entry["shared"] <= (227 if t == "sm_90" else 163) * 1024
    # inspect --kernels reads the MTP graph's cubins too, named as such
    from braze.codegen.cubin_report import cuobjdump
    from braze.inspect import summarize
    if cuobjdump() is not None:
        rows = summarize(root, kernels=True)["cubin_resources"]
        mtp = {(r["variant"], r["target"], r["spec"]) for r in rows
               if r["variant"].startswith("mtp:")}
        assert mtp == {("mtp:" + vid, t, key) for vid, k in kernels.items()
                       for t, by_key in k["cubins"].items() for key in by_key}
        assert all(r["regs"] > 0 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mtp_plan_equals_plain(tmp_path):
    """On a GPU, float16 -O2 with cubins: the proposer runs its plan's kernels; greedy
    output with mtp equals plain greedy, and its guesses are accepted."""
    import braze
    from braze.tiny_mtp import guessing_deepseek
    ckpt = guessing_deepseek(tmp_path)
    art = braze.compile(ckpt, tmp_path / "a", opt_level=2, dtype="float16", max_num_seqs=8,
                        max_logits_rows=32, max_num_tokens=128, targets="sm_80,sm_90").root
    prompts = prompts_of([6, 11, 17], seed=8)
    base_out = run_all(Engine(art, backend="cuda"), prompts, GREEDY)
    eng = Engine(art, backend="cuda", speculative=MTP)
    assert eng.spec.proposer.runs_on == "plan"
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in base_out]
    assert eng.spec.proposer.num_mtp_calls > 0
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.slow      # an -O2 Gemma 4 compile, then the target interpreted: 30-40 s here
def test_gemma4_assistant_plan_equals_the_reference_interpreter(tmp_path):
    import braze
    from braze.tiny_gemma4_assistant import has_gemma4_assistant, make_guessing_pair
    if not has_gemma4_assistant():
        pytest.skip("transformers has no Gemma4AssistantForCausalLM")
    target, assistant = make_guessing_pair(tmp_path / "g4")
    art = braze.compile(target, tmp_path / "a", mtp_assistant=assistant, opt_level=2,
                        targets="", dtype="float32", block_size=4, max_num_seqs=4,
                        max_logits_rows=16, max_num_tokens=64).root
    assert json.loads((art / "manifest.json").read_text())["mtp"]["plan"]["segments"]
    plain, got, diffs, eng = _spec_run(art, prompts_of([5, 9], seed=3))
    assert eng.spec.proposer.num_mtp_calls > 0 and diffs
    assert max(diffs) < 1e-4
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0


def test_inspect_counts_the_mtp_plan(dsv3):
    from braze.inspect import format_summary, summarize
    s = summarize(dsv3)
    m = json.loads((dsv3 / "manifest.json").read_text())["mtp"]
    assert s["mtp_plan"]["kernels"] == len(m["kernels"]) > 0
    assert s["mtp_plan"]["launches"] == sum(len(x["launches"]) for x in m["plan"]["segments"])
    line = next(x for x in format_summary(s).splitlines() if x.startswith("mtp plan"))
    assert f"{len(m['kernels'])} Triton kernel variants" in line and "linear x" in line


def test_artifact_without_an_mtp_plan_runs_it_on_the_interpreter(dsv3, tmp_path):
    """An artifact compiled before MTP plans (its manifest's mtp entry has no plan): at
    `interpret` the proposer falls back to the reference interpreter, output unchanged."""
    copy = tmp_path / "old"
    shutil.copytree(dsv3, copy)
    (copy / "signature.json").unlink(missing_ok=True)
    m = json.loads((copy / "manifest.json").read_text())
    del m["mtp"]["plan"], m["mtp"]["kernels"]
    (copy / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
    prompts = prompts_of([7], seed=2)
    eng = Engine(copy, backend="interpret", cudagraph_mode="none", speculative=MTP)
    assert eng.spec.proposer.runs_on == "reference"
    got = run_all(eng, prompts, GREEDY)
    plain = run_all(Engine(dsv3, backend="interpret", cudagraph_mode="none"), prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
