"""Checkpoints whose config.json and tensors disagree the way real downloads do, compiled at
-O0 and run by the reference interpreter: logits equal to transformers' own loading of the
same directory, or a one-line error naming what is wrong."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from braze.ir.contract import SeqChunk
from braze.ir.errors import BrazeError

from conftest import PROMPT, hf_model, step_inputs, take_blocks


def _checkpoint(tmp_path, family="llama", **overrides):
    from braze.tiny import make_checkpoint
    with contextlib.redirect_stderr(io.StringIO()):
        return make_checkpoint(family, tmp_path / "m", seed=1, with_tokenizer=False, **overrides)


def _edit_config(ckpt, **keys):
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(keys)
    path.write_text(json.dumps(cfg))


def _logits(ckpt, tmp_path, **options):
    import braze
    from braze.runtime import Executor, open_artifact
    braze.compile(ckpt, tmp_path / "a", opt_level=0, targets="", **options)
    ex = Executor(open_artifact(tmp_path / "a"), num_blocks=4)
    return ex.run(step_inputs(ex, [SeqChunk(PROMPT, 0, take_blocks(ex, 2))]))


def _expected(ckpt):
    with torch.no_grad():
        return hf_model(ckpt)(torch.tensor([PROMPT])).logits[0]


def test_tied_config_with_its_own_lm_head_uses_that_head(tmp_path):
    """config.json says tie_word_embeddings, yet the checkpoint holds an lm_head.weight unlike
    the embeddings (a fine-tune saved untied under a config that kept, or defaulted to, the
    tie): transformers then does not tie and uses the saved head, and so must braze."""
    ckpt = _checkpoint(tmp_path, tie_word_embeddings=False)
    _edit_config(ckpt, tie_word_embeddings=True)
    torch.testing.assert_close(_logits(ckpt, tmp_path), _expected(ckpt), atol=1e-4, rtol=1e-4)


def test_tied_config_with_an_identical_lm_head_copy_still_ties(tmp_path):
    """A tied checkpoint that also saved lm_head.weight as an exact copy of the embeddings
    (as .bin conversions do) compiles tied: one [vocab, hidden] table, not two."""
    from safetensors.torch import load_file, save_file
    ckpt = _checkpoint(tmp_path, tie_word_embeddings=True)
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    from braze.frontend.load import load_model
    assert "lm_head.weight" not in load_model(ckpt).graph.params
    torch.testing.assert_close(_logits(ckpt, tmp_path), _expected(ckpt), atol=1e-4, rtol=1e-4)


def test_untied_config_without_an_lm_head_names_the_config_key(tmp_path):
    ckpt = _checkpoint(tmp_path, tie_word_embeddings=True)       # saves no lm_head.weight
    _edit_config(ckpt, tie_word_embeddings=False)
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    msg = str(e.value)
    assert "lm_head.weight" in msg and "tie_word_embeddings" in msg and "\n" not in msg


def test_git_lfs_pointer_instead_of_weights_says_to_fetch_them(tmp_path):
    """A `git clone` without git-lfs leaves ~130-byte pointer files where the shards should
    be: the error says so and how to get the weights, not "header too large"."""
    ckpt = _checkpoint(tmp_path, max_shard_size="40KB")
    shard = sorted(ckpt.glob("*.safetensors"))[-1]
    shard.write_text("version https://git-lfs.github.com/spec/v1\n"
                     "oid sha256:4d7a2146b5b9b6b2c8f3c1f6d3b1d1f0e0c8a7b6a5f4e3d2c1b0a9f8e7d6c5b4\n"
                     "size 3852\n")
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    msg = str(e.value)
    assert shard.name in msg and "git lfs pull" in msg and "\n" not in msg


def test_a_hub_repository_id_says_to_download_it_first(tmp_path, monkeypatch):
    """vLLM takes `org/name` and downloads it; braze compiles a local directory, and says
    how to get one rather than only that the path does not exist."""
    from braze.frontend.load import read_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BrazeError) as e:
        read_config("Qwen/Qwen3-0.6B")
    msg = str(e.value)
    assert "Qwen/Qwen3-0.6B" in msg and "huggingface-cli download Qwen/Qwen3-0.6B" in msg


def test_a_hugging_face_cache_entry_names_its_snapshot(tmp_path):
    """~/.cache/huggingface/hub/models--org--name holds the files under snapshots/<commit>:
    passing the entry itself names the snapshot to pass."""
    from braze.frontend.load import read_config
    entry = tmp_path / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _checkpoint(entry / "snapshots").rename(entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    with pytest.raises(BrazeError) as e:
        read_config(entry)
    assert str(entry / "snapshots" / commit) in str(e.value)


def test_a_fused_qkv_larger_than_the_config_is_refused(tmp_path):
    """Phi-3's q, k and v are row ranges of one fused qkv_proj: a config.json with fewer kv
    heads than the checkpoint was saved with must not read a part of it as the whole (no
    other tensor's shape depends on the kv heads; transformers refuses the mismatch too)."""
    ckpt = _checkpoint(tmp_path, "phi3", num_key_value_heads=4)
    _edit_config(ckpt, num_key_value_heads=2)
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    msg = str(e.value)
    assert "qkv_proj" in msg and "config.json" in msg and "\n" not in msg


def test_a_lora_adapter_directory_says_to_compile_its_base_model(tmp_path):
    """A PEFT adapter (adapter_config.json, no config.json) is not a model: the error names
    its base model and how braze serves adapters, not only "has no config.json"."""
    from braze.frontend.load import read_config
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "org/base-model", "r": 8}))
    with pytest.raises(BrazeError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert "org/base-model" in msg and "--lora-slots" in msg and "\n" not in msg


def test_tensors_under_another_prefix_are_named_in_the_error(tmp_path):
    """A checkpoint saved from a wrapper (a PEFT model saved without merging: every name
    under base_model.model.) holds the weights under other names: the missing-weight error
    says which name it does hold, so the cause is visible."""
    from safetensors.torch import load_file, save_file
    ckpt = _checkpoint(tmp_path)
    f = ckpt / "model.safetensors"
    tensors = {f"base_model.model.{k}": v for k, v in load_file(f).items()}
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    assert "'base_model.model.model.embed_tokens.weight'" in str(e.value)


@pytest.mark.parametrize("file, text, named", [
    ("config.json", "[1, 2]", "config.json"),
    ("model.safetensors.index.json", '{"weight_map": ["model.safetensors"]}', "weight_map"),
    ("model.safetensors.index.json", '{"weight_map": {"lm_head.weight": 3}}', "lm_head.weight"),
])
def test_malformed_json_files_are_one_line_errors(tmp_path, file, text, named):
    """Valid JSON of the wrong shape (not an object; a weight_map that is not names to
    files) is said to be so, not an AttributeError traceback. (Sharded: beside a
    model.safetensors the index is not read, as transformers reads none.)"""
    ckpt = _checkpoint(tmp_path, max_shard_size="40KB")
    (ckpt / file).write_text(text)
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    assert file in str(e.value) and named in str(e.value)


@pytest.mark.parametrize("key", ["rope_theta", "factor"])
def test_a_rope_number_written_as_a_string_is_named(tmp_path, key):
    """transformers checks rope_parameters' keys, not their types: "rope_theta": "10000"
    reached braze's frequency math as a TypeError traceback."""
    ckpt = _checkpoint(tmp_path)
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    _edit_config(ckpt, rope_parameters={**rope, key: str(rope[key])})
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    assert key in str(e.value) and "number" in str(e.value)


def test_a_mistral_or_meta_native_checkpoint_says_to_use_the_hugging_face_format(tmp_path):
    """params.json + consolidated.safetensors (Mistral's format, which vLLM loads with
    --load-format mistral) or consolidated.00.pth (Meta's): no config.json, and the error
    says which format it is and what braze needs instead."""
    from braze.frontend.load import read_config
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "n_layers": 32}))
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(BrazeError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert "params.json" in msg and "Hugging Face format" in msg and "\n" not in msg


def _long_logits(ckpt, tmp_path, tokens, **options):
    import braze
    from braze.runtime import Executor, open_artifact
    braze.compile(ckpt, tmp_path / "a", opt_level=0, targets="", **options)
    ex = Executor(open_artifact(tmp_path / "a"), num_blocks=4)
    return ex.run(step_inputs(ex, [SeqChunk(tokens, 0, take_blocks(ex, 4))]))


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
     "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
])
def test_a_scaled_rope_serves_past_max_position_embeddings(tmp_path, rope):
    """Qwen's long-context recipe adds YaRN (factor 4 over the 32K it was trained on) to
    config.json and serves --max-model-len 4 x 32K, which vLLM allows (its context is
    original x factor for YaRN, max_position_embeddings x factor for linear): braze refused
    anything past max_position_embeddings. These RoPEs are fixed frequencies, so
    transformers gives every position the same logits as braze."""
    ckpt = _checkpoint(tmp_path, "qwen3", max_position_embeddings=32, rope_scaling=rope)
    tokens = (PROMPT * 3)[:50]                       # past the 32 positions
    got = _long_logits(ckpt, tmp_path, tokens, max_model_len=64)
    with torch.no_grad():
        expected = hf_model(ckpt)(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope, named", [
    (None, "max_position_embeddings"),
    ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, "dynamic"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
      "rope_theta": 10000.0}, "128"),
])
def test_a_max_model_len_past_the_models_context_names_the_limit(tmp_path, rope, named):
    """Past what the RoPE serves (dynamic NTK: transformers recomputes its frequencies
    past max_position_embeddings, which an artifact's fixed ones cannot follow) the error
    says what limits it and the longest --max-model-len there is."""
    ckpt = _checkpoint(tmp_path, "qwen3", max_position_embeddings=32, rope_scaling=rope)
    with pytest.raises(BrazeError) as e:
        _long_logits(ckpt, tmp_path, PROMPT, max_model_len=200)
    msg = str(e.value)
    assert "--max-model-len 200" in msg and named in msg and "\n" not in msg


def test_gemma3_in_float16_is_refused_naming_the_dtypes_that_work(tmp_path):
    """Gemma 3's activations outgrow float16's range on real checkpoints (garbage or <pad>
    floods; vLLM refuses --dtype float16 for it): an asked-for float16 is one line naming
    the model and what to pass instead."""
    ckpt = _checkpoint(tmp_path, "gemma3")
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path, dtype="float16")
    msg = str(e.value)
    assert "float16" in msg and "--dtype bfloat16" in msg and "Gemma3" in msg and "\n" not in msg


def test_gemma3_declared_float16_compiles_in_bfloat16(tmp_path):
    """A Gemma 3 whose config.json declares float16 (a conversion) and no --dtype: braze
    picks bfloat16, as vLLM's dtype auto does, and says so."""
    import braze
    ckpt = _checkpoint(tmp_path, "gemma3")
    _edit_config(ckpt, dtype="float16")
    said = []
    art = braze.compile(ckpt, tmp_path / "a", opt_level=0, targets="", log=said.append)
    assert art.model["dtype"] == "bf16"
    assert any("bfloat16" in m and "float16" in m for m in said)


def test_dtype_auto_is_the_checkpoints_as_in_vllm(tmp_path):
    """vLLM's --dtype default and usual spelling is `auto` (the checkpoint's dtype, half
    for float32 there): braze compile refused it as an invalid choice. It now means the
    checkpoint's dtype, from the command line and the Python API alike."""
    import braze
    from braze.cli import build_parser
    args = build_parser().parse_args(["compile", "m", "-o", "a", "--dtype", "auto"])
    assert args.dtype == "auto"
    ckpt = _checkpoint(tmp_path)
    _edit_config(ckpt, dtype="bfloat16")
    art = braze.compile(ckpt, tmp_path / "a", opt_level=0, targets="", dtype=args.dtype)
    assert art.model["dtype"] == braze.compile(ckpt, tmp_path / "b", opt_level=0,
                                               targets="").model["dtype"] == "bf16"


@pytest.mark.parametrize("key, value", [
    ("num_key_value_heads", 0),          # was a ZeroDivisionError traceback
    ("num_hidden_layers", 0),            # was "graph @LlamaForCausalLM has no attention..."
    ("num_attention_heads", 0),
    ("sliding_window", -1),              # was compiled as is
])
def test_a_config_count_that_is_not_positive_names_the_key(tmp_path, key, value):
    ckpt = _checkpoint(tmp_path, "mistral")
    _edit_config(ckpt, **{key: value})
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    msg = str(e.value)
    assert f"{key}={value}" in msg and "config.json" in msg and "\n" not in msg


def test_architectures_written_as_a_string_says_it_should_be_a_list(tmp_path):
    """"architectures": "LlamaForCausalLM" (a hand-written config) was read letter by
    letter: "unsupported architecture L, l, a, m, a, ...". """
    ckpt = _checkpoint(tmp_path)
    _edit_config(ckpt, architectures="LlamaForCausalLM")
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    msg = str(e.value)
    assert '["LlamaForCausalLM"]' in msg and "L, l, a" not in msg and "\n" not in msg


def test_a_single_weights_file_beside_a_stale_index_is_read_as_transformers_does(tmp_path):
    """Shards merged into model.safetensors (and the shards deleted) with the old index
    left behind: transformers loads model.safetensors whenever it exists, index or not;
    braze followed the index to shards no longer there."""
    from safetensors.torch import load_file, save_file
    ckpt = _checkpoint(tmp_path, max_shard_size="40KB")
    shards = sorted(ckpt.glob("model-*.safetensors"))
    merged = {k: v for f in shards for k, v in load_file(f).items()}
    save_file(merged, ckpt / "model.safetensors", metadata={"format": "pt"})
    for f in shards:
        f.unlink()
    assert (ckpt / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_logits(ckpt, tmp_path), _expected(ckpt), atol=1e-4, rtol=1e-4)


def test_a_shard_missing_from_a_download_says_to_fetch_it(tmp_path):
    """An interrupted download leaves the index naming a shard that is not there: the error
    names the shard and says to download it again, not only that it is missing."""
    ckpt = _checkpoint(tmp_path, max_shard_size="40KB")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    msg = str(e.value)
    assert shard.name in msg and "download" in msg and "\n" not in msg


@pytest.mark.parametrize("family, key, value", [
    ("mixtral", "num_experts_per_tok", 0),         # compiled: MoE layers that add nothing
    ("qwen3_moe", "decoder_sparse_step", 0),       # read as 1 ("gate weight missing")
    ("deepseek_v3", "num_experts_per_tok", 0),
    ("deepseek_v3", "kv_lora_rank", 0),            # a tracing error from torch.cat
    ("gemma3", "query_pre_attn_scalar", 0),        # a ZeroDivisionError traceback
])
def test_a_family_count_that_is_not_positive_names_the_key(tmp_path, family, key, value):
    ckpt = _checkpoint(tmp_path, family)
    _edit_config(ckpt, **{key: value})
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    msg = str(e.value)
    assert key in msg and str(value) in msg and "config.json" in msg and "\n" not in msg


def test_a_zero_partial_rotary_factor_is_refused_not_read_as_one(tmp_path):
    """rope_parameters' partial_rotary_factor 0.0 fell through an `or` to the default 1.0
    and compiled a whole-head RoPE."""
    ckpt = _checkpoint(tmp_path)
    _edit_config(ckpt, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                        "partial_rotary_factor": 0.0})
    with pytest.raises(BrazeError) as e:
        _logits(ckpt, tmp_path)
    assert "partial_rotary_factor=0.0" in str(e.value) and "config.json" in str(e.value)
