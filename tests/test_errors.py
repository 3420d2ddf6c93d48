"""Bad input: each a one-line error naming the thing at fault, non-zero exit, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from cli_helpers import assert_one_line_error, run


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(store, tmp_path):
    d = _copy(store.checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("compile", d, "-o", tmp_path / "a")
    assert_one_line_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3MoeForCausalLM")
    assert not (tmp_path / "a").exists()


def _rewrite_weights(d, edit):
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_missing_weight(store, tmp_path):
    d = _copy(store.checkpoint("llama"), tmp_path / "m")
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    code, _, err = run("compile", d, "-o", tmp_path / "a")
    assert_one_line_error(code, err, "model.layers.1.self_attn.k_proj.weight", "missing")


def test_misshaped_weight(store, tmp_path):
    d = _copy(store.checkpoint("llama"), tmp_path / "m")
    _rewrite_weights(d, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:10]))
    code, _, err = run("compile", d, "-o", tmp_path / "a")
    assert_one_line_error(code, err, "model.norm.weight", "[10]", "[64]")


def test_missing_expert_in_sharded_checkpoint(store, tmp_path):
    d = _copy(store.checkpoint("mixtral"), tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    gone = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    del index["weight_map"][gone]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run("compile", d, "-o", tmp_path / "a")
    assert_one_line_error(code, err, gone)


def test_an_index_naming_the_wrong_shard_is_one_line(store, tmp_path):
    """A stale index (the checkpoint re-sharded, or shards from two downloads) names a
    shard that does not hold the weight: the user's files are at fault, not braze."""
    d = _copy(store.checkpoint("mixtral"), tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    name = "model.layers.1.self_attn.k_proj.weight"
    wrong = next(f for f in sorted(set(weight_map.values())) if f != weight_map[name]
                 and name not in load_file(str(d / f)))
    weight_map[name] = wrong
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run("compile", d, "-o", tmp_path / "a")
    assert_one_line_error(code, err, name, wrong, "model.safetensors.index.json")
    assert not (tmp_path / "a").exists()


def test_a_config_dtype_braze_cannot_compute_in_points_at_config_and_dtype(store, tmp_path):
    """config.json's dtype is the default; one braze does not compute in is config.json's
    problem, and --dtype is the way around it."""
    d = _copy(store.checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "float64"
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("compile", d, "-o", tmp_path / "a", "--opt-level", "0", "--targets", "")
    assert_one_line_error(code, err, "config.json", "float64", "--dtype")
    code, _, err = run("compile", d, "-o", tmp_path / "a", "--opt-level", "0", "--targets", "",
                       "--dtype", "float32")
    assert code == 0, err


def test_not_a_model_dir(tmp_path):
    code, _, err = run("compile", tmp_path / "nope", "-o", tmp_path / "a")
    assert_one_line_error(code, err, "nope", "does not exist")


@pytest.fixture
def artifact_copy(store, tmp_path):
    return _copy(store.artifact("llama"), tmp_path / "a.braze")


def test_tampered_weights(artifact_copy):
    f = next(artifact_copy.glob("weights-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    code, _, err = run("generate", artifact_copy, "--prompt-ids", "1,2")
    assert_one_line_error(code, err, f.name, "sha256")


def test_tampered_graph(artifact_copy):
    g = artifact_copy / "graph.bir"
    g.write_text(g.read_text().replace("silu", "relu", 1))
    code, _, err = run("inspect", artifact_copy)
    assert_one_line_error(code, err, "graph.bir", "sha256")


def test_corrupt_manifest(artifact_copy):
    (artifact_copy / "manifest.json").write_text("{ not json")
    code, _, err = run("generate", artifact_copy, "--prompt-ids", "1,2")
    assert_one_line_error(code, err, "manifest.json", "corrupt")


def test_other_format_version(artifact_copy):
    m = json.loads((artifact_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run("generate", artifact_copy, "--prompt-ids", "1,2")
    assert_one_line_error(code, err, "format version 99", "recompile")


def test_missing_and_extra_files(artifact_copy, tmp_path):
    (artifact_copy / "stray.txt").write_text("x")
    code, _, err = run("inspect", artifact_copy)
    assert_one_line_error(code, err, "stray.txt")
    (artifact_copy / "stray.txt").unlink()
    (artifact_copy / "config.json").unlink()
    code, _, err = run("inspect", artifact_copy)
    assert_one_line_error(code, err, "config.json", "missing")


def test_not_an_artifact(tmp_path):
    code, _, err = run("generate", tmp_path, "--prompt-ids", "1")
    assert_one_line_error(code, err, "manifest.json")


def test_prompt_too_long(store, tmp_path):
    art = tmp_path / "short.braze"
    code, _, err = run("compile", store.checkpoint("llama"), "-o", art, "--max-model-len", "8", "-q")
    assert code == 0, err
    code, _, err = run("generate", art, "--prompt-ids", ",".join(["5"] * 9))
    assert_one_line_error(code, err, "9 tokens", "max_model_len")


def test_bad_prompt_ids_and_options(store):
    art = store.artifact("llama")
    code, _, err = run("generate", art, "--prompt-ids", "1,x")
    assert code == 2 and "--prompt-ids" in err and "Traceback" not in err
    code, _, err = run("generate", art, "--prompt-ids", "1,99999")
    assert_one_line_error(code, err, "99999", "vocabulary")
    code, _, err = run("generate", art, "--prompt-ids", "1", "--top-p", "0")
    assert_one_line_error(code, err, "top_p")
    code, _, err = run("generate", art)
    assert_one_line_error(code, err, "--prompt")


def test_existing_output_needs_force(store, tmp_path):
    art = tmp_path / "a.braze"
    art.mkdir()
    code, _, err = run("compile", store.checkpoint("llama"), "-o", art)
    assert_one_line_error(code, err, str(art), "--force")


def test_unknown_pass(tmp_path):
    f = tmp_path / "g.bir"
    f.write_text("graph @g(%x: f32[T]) {\n  %0: f32[T] = neg(%x)\n  return y=%0\n}\n")
    code, _, err = run("opt", f, "--passes", "fuse-everything")
    assert_one_line_error(code, err, "fuse-everything", "canonicalize")


def test_bad_ir_text(tmp_path):
    f = tmp_path / "bad.bir"
    f.write_text("graph @g(%x: f32[T]) {\n  %0: f32[T] = frobnicate(%x)\n  return y=%0\n}\n")
    code, _, err = run("opt", f, "--passes", "")
    assert_one_line_error(code, err, "line 2", "frobnicate")


def test_an_artifact_without_step_limits_is_refused_by_name(artifact_copy):
    """The runtime reads the step limits the compiler recorded, with no fallbacks: a manifest
    without them (or with a bad one) is named, with what to do."""
    from braze.ir.errors import BrazeError
    from braze.runtime import Executor, open_artifact
    from trust_helpers import rehash
    for bad in (None, {"max_num_tokens": 8}, {"max_num_tokens": 0, "max_num_seqs": 4,
                                              "max_model_len": 64, "block_size": 16}):
        m = json.loads((artifact_copy / "manifest.json").read_text())
        m.pop("limits", None)
        if bad is not None:
            m["limits"] = bad
        (artifact_copy / "manifest.json").write_text(json.dumps(m))
        rehash(artifact_copy)            # unsigned now: the operator's trust admits it
        with pytest.raises(BrazeError, match="no valid step limits.*recompile"):
            Executor(open_artifact(artifact_copy, trust_artifact=True), backend="reference")


def test_compile_without_the_cryptography_package_says_what_to_install(store, tmp_path):
    """An install with --no-deps (a GPU image with no network) may lack `cryptography`:
    signing is then a one-line error naming the package, not an internal error."""
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "from braze.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "compile", str(store.checkpoint("llama")),
                        "-o", str(tmp_path / "a.braze"), "-q", "--targets", ""],
                       capture_output=True, text=True, timeout=300)
    assert_one_line_error(r.returncode, r.stderr, "cryptography", "pip install")


def test_misshaped_fused_qkv_of_phi3(store, tmp_path):
    """Phi-3 keeps q, k, v in one tensor: a short one is named, with what the slice needs."""
    d = _copy(store.checkpoint("phi3-longrope-partial-tied"), tmp_path / "m")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    _rewrite_weights(d, lambda t: t.__setitem__(name, t[name][:100]))
    code, _, err = run("compile", d, "-o", tmp_path / "a")
    assert_one_line_error(code, err, name, "[100, 64]", "v_proj")


@pytest.mark.parametrize("edit, words", [
    ({"use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
    ({"query_pre_attn_scalar": None}, ["query_pre_attn_scalar"]),
])
def test_gemma3_config_errors_name_the_key(store, tmp_path, edit, words):
    d = _copy(store.checkpoint("gemma3-sandwich-softcap"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("compile", d, "-o", tmp_path / "a")
    assert_one_line_error(code, err, *words)


def test_force_replaces_only_an_artifact(store, tmp_path):
    """--force must not delete what is not an earlier artifact: the model's own directory,
    a directory of the user's files, or a file; each is refused before compiling and left
    as it was. An earlier artifact is still replaced."""
    model = _copy(store.checkpoint("llama"), tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me too")
    for out in (model, mine, a_file):
        code, _, err = run("compile", model, "-o", out, "--force", "--opt-level", "0",
                           "--targets", "")
        assert_one_line_error(code, err, str(out), "--force")
        assert "tracing" not in err          # refused before any work
    assert sorted(p.name for p in model.iterdir()) == before
    assert (mine / "notes.txt").read_text() == "keep me"
    assert a_file.read_text() == "keep me too"

    art = tmp_path / "a.braze"
    for _ in range(2):
        code, _, err = run("compile", model, "-o", art, "--force", "--opt-level", "0",
                           "--targets", "", "-q")
        assert code == 0, err
    assert json.loads((art / "manifest.json").read_text())["format"] == "braze-artifact"
    assert not list(tmp_path.glob("a.braze.partial*"))


def test_unwritable_output_is_refused_before_compiling(store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "sub" / "a.braze"          # under a file: no directory can be made
    code, _, err = run("compile", store.checkpoint("llama"), "-o", out, "--opt-level", "0",
                       "--targets", "")
    assert_one_line_error(code, err, "cannot write the artifact", str(blocker))
    assert "tracing" not in err


@pytest.mark.parametrize("device,words", [
    ("gpu", ["'gpu'", "not a device name"]), ("meta", ["'meta'", "cpu or cuda"]),
    ("cuda:7", ["'cuda:7'"])])
def test_a_bad_device_is_named_not_the_weights(store, device, words):
    """--device names a device braze cannot run on: the error is about the device (it was
    an internal error, or 'artifact weights ... cannot be read')."""
    import torch
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = run("generate", store.artifact("llama"), "--prompt-ids", "1,2",
                       "--max-tokens", "1", "--device", device)
    assert_one_line_error(code, err, *words)
    assert "weights" not in err


def test_cpu_with_an_index_runs(store):
    from braze.runtime import LLM, SamplingParams
    p = SamplingParams(max_tokens=3, ignore_eos=True)
    art = store.artifact("llama")
    a = LLM(art, backend="reference", device="cpu:0", num_kv_blocks=8).generate([1, 2], p)
    b = LLM(art, backend="reference", num_kv_blocks=8).generate([1, 2], p)
    assert a[0].token_ids == b[0].token_ids


@pytest.mark.parametrize("edit", ["model", "versions", "weights.bytes", "options",
                                  "model.eos_token_ids"])
def test_a_manifest_with_a_section_damaged_is_named_not_an_internal_error(artifact_copy,
                                                                           capsys, edit):
    """A manifest edited by hand (or damaged) but still JSON: the section at fault is named
    with what to do, by every command, instead of 'internal error: KeyError' (a bug report)."""
    from braze.cli import main
    m = json.loads((artifact_copy / "manifest.json").read_text())
    if edit == "model":
        del m["model"]
    elif edit == "versions":
        m["versions"] = None
    elif edit == "weights.bytes":
        m["weights"]["bytes"] = None
    elif edit == "options":
        m["options"] = [1]
    else:
        m["model"]["eos_token_ids"] = "x"
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    (artifact_copy / "signature.json").unlink(missing_ok=True)
    for argv in (["inspect", str(artifact_copy)],
                 ["generate", str(artifact_copy), "--prompt-ids", "1", "--max-tokens", "1",
                  "--backend", "reference"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert_one_line_error(code, err, "manifest.json", edit.split(".")[-1], "recompile")
        assert code == 1, err


def test_an_incomplete_or_cluttered_copy_says_what_to_do(artifact_copy):
    """An artifact shipped to a host can arrive short (a file missing, a file cut off: an
    interrupted copy or download) or with a stray file; each refusal names the file and what
    to do about it, not only what is wrong."""
    from braze.ir.errors import BrazeError
    from braze.runtime import open_artifact
    weights = next(artifact_copy.glob("weights-*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])             # the copy stopped half-way
    with pytest.raises(BrazeError, match=rf"{weights.name}.*copy the artifact again"):
        open_artifact(artifact_copy)
    weights.write_bytes(data)
    (artifact_copy / "config.json").rename(artifact_copy.parent / "config.json")
    with pytest.raises(BrazeError, match=r"missing config\.json.*copy the artifact again"):
        open_artifact(artifact_copy)
    (artifact_copy.parent / "config.json").rename(artifact_copy / "config.json")
    (artifact_copy / "notes.txt").write_text("x")
    with pytest.raises(BrazeError, match=r"notes\.txt.*remove it"):
        open_artifact(artifact_copy)
    (artifact_copy / "notes.txt").unlink()
    assert open_artifact(artifact_copy).trust.admitted


def test_compiling_an_artifact_is_refused_not_a_model_without_its_tokenizer(store, tmp_path):
    """`braze compile ARTIFACT` (a user told to "recompile" who has only the artifact) used
    to trace the artifact's weights as a checkpoint and write an artifact without the
    tokenizer (it lives in tokenizer/ there): text prompts and chat then fail on the
    serving host. It is refused, saying what to compile instead."""
    art = store.artifact("llama")
    out = tmp_path / "again.braze"
    code, _, err = run("compile", art, "-o", out, "--opt-level", "0", "--targets", "")
    assert_one_line_error(code, err, str(art), "braze artifact", "model directory")
    assert not out.exists()


@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_weights_of_another_dtype_or_shape_are_refused_at_load(artifact_copy, change):
    """Weights rewritten after compiling (here: cast to float16 to save space, or one cut
    short, then rehashed, unsigned: weights are data that verification does not cover)
    are refused when they are read, naming the weight and what the graph expects, not at
    the first op that meets them with a raw torch or kernel error (or not at all)."""
    from safetensors.torch import load_file, save_file
    from braze.ir.errors import BrazeError
    from braze.runtime import open_artifact
    from trust_helpers import rehash
    f = next(artifact_copy.glob("weights-*.safetensors"))
    w = load_file(f)
    name = "model.norm.weight"
    if change == "dtype":
        w = {k: v.half() if v.is_floating_point() else v for k, v in w.items()}
    else:
        w[name] = w[name][:-1].clone()
    save_file(w, f, metadata={"format": "pt"})
    rehash(artifact_copy)
    art = open_artifact(artifact_copy)
    with pytest.raises(BrazeError, match=rf"{f.name}.*weight .*expects f32"
                       if change == "dtype" else rf"weight {name} is float32 \[63\].*f32\[64\]"):
        art.load_weights()


def test_an_artifact_from_a_newer_braze_says_to_upgrade(artifact_copy):
    """An artifact compiled by a newer braze (a newer format) shipped to a host with an
    older one: the fix on that host is to upgrade braze; recompiling needs the model
    directory, which a serving host usually lacks."""
    from braze.artifact import FORMAT_VERSION
    m = json.loads((artifact_copy / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    m["versions"]["braze"] = "99.0"
    (artifact_copy / "manifest.json").write_text(json.dumps(m))
    code, _, err = run("generate", artifact_copy, "--prompt-ids", "1,2")
    assert_one_line_error(code, err, f"format version {FORMAT_VERSION + 1}", "braze 99.0",
                          "newer", "upgrade braze")
