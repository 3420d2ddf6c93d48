"""Tests for braze.tiny: tiny random checkpoints and the toy tokenizer."""

import json

import pytest
import torch

from braze import tiny

SENTENCE = "Hello, world! The quick brown fox jumps over 12 lazy dogs.\n\t{ok} ~`|"


def _ids(n=24):
    # Longer than mistral's sliding window (8); skips the special ids 0..2.
    return (torch.arange(n) * 37 % 253 + 3)[None]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_checkpoint_roundtrip(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny.make_checkpoint(family, tmp_path / family, seed=1, with_tokenizer=False)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()

    # Rebuild the in-memory model the same way make_checkpoint does.
    config = tiny.tiny_config(family)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tiny._init_weights(original, 1)

    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(reloaded) is type(original)
    assert reloaded.config.model_type == config.model_type
    assert reloaded.dtype == torch.float32
    with torch.no_grad():
        want = original(_ids()).logits
        got = reloaded(_ids()).logits
    assert want.shape == (1, 24, 256)
    assert torch.isfinite(got).all()
    assert want.std() > 0.1  # weights are not trivially small
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_family_specifics():
    cfg = tiny.tiny_config("mistral")
    assert cfg.sliding_window == 8
    cfg = tiny.tiny_config("qwen3")
    assert cfg.head_dim == 24 and cfg.tie_word_embeddings
    cfg = tiny.tiny_config("mixtral")
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (4, 2, 3)
    cfg = tiny.tiny_config("qwen3_moe")
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (4, 2, 32)
    assert cfg.mlp_only_layers == [1] and cfg.norm_topk_prob
    for family in tiny.FAMILIES:
        cfg = tiny.tiny_config(family)
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tiny.BOS_ID, tiny.EOS_ID, tiny.PAD_ID)
        assert cfg.hidden_size == 64 and cfg.vocab_size == 256


def test_overrides_and_llama3_rope(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny.tiny_config("llama", num_hidden_layers=1, tie_word_embeddings=True)
    assert cfg.num_hidden_layers == 1 and cfg.tie_word_embeddings

    path = tiny.make_checkpoint("llama", tmp_path, with_tokenizer=False, rope_scaling=tiny.tiny_llama3_rope())
    rope = json.loads((path / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 64
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny.make_checkpoint("qwen3_moe", tmp_path, with_tokenizer=False, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / s).exists() for s in shards)
    assert not (path / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_deterministic(tmp_path):
    a = tiny.make_checkpoint("llama", tmp_path / "a", seed=3)
    b = tiny.make_checkpoint("llama", tmp_path / "b", seed=3)
    c = tiny.make_checkpoint("llama", tmp_path / "c", seed=4, with_tokenizer=False)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_tokenizer_roundtrip(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    assert tiny.make_tokenizer(tmp_path) == 256

    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [raw.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    ids = raw.encode(SENTENCE).ids
    assert ids[0] == tiny.BOS_ID and max(ids) < 256
    assert len(ids) < len(SENTENCE)  # merges are used
    assert raw.decode(ids) == SENTENCE

    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf.model_max_length == 256
    assert hf(SENTENCE)["input_ids"] == ids
    assert hf.decode(ids, skip_special_tokens=True) == SENTENCE
    assert hf(SENTENCE, add_special_tokens=False)["input_ids"] == ids[1:]


def test_checkpoint_includes_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    path = tiny.make_checkpoint("mistral", tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok("abc def")["input_ids"], skip_special_tokens=True) == "abc def"


def test_unknown_family():
    with pytest.raises(ValueError, match="qwen3_moe"):
        tiny.tiny_config("gpt2")
    with pytest.raises(ValueError):
        tiny.make_checkpoint("nope", "/nonexistent/never-written")
