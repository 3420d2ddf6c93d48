"""Multimodal checkpoints (Gemma 3 and Gemma 4 `*ForConditionalGeneration`) compile to their
language model alone: the logits and greedy tokens equal transformers' ConditionalGeneration
model on text, the tower tensors are never read, the artifact says it is text-only, and a
chat request with an image or audio part gets a 400 that says so."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from braze.tiny_multimodal import IMAGE_ID, MULTIMODAL_CHAT_TEMPLATE, make_multimodal_checkpoint
from conftest import (
    PROMPT,
    _Store,
    assert_greedy_matches_transformers,
    assert_steps_match_transformers,
    executor,
    hf_model,
)

ORIGINS = {"gemma3": "Gemma3ForConditionalGeneration", "gemma4": "Gemma4ForConditionalGeneration"}


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    """conftest's store, with the tiny multimodal checkpoints as its cases."""
    return _Store(tmp_path_factory, {case: (case, {}) for case in ORIGINS},
                  make_multimodal_checkpoint)


def test_the_reference_is_the_conditional_generation_model(mm):
    """What the comparisons below load is transformers' multimodal model, towers and all,
    and the test prompt holds no image, video or audio placeholder id."""
    assert max(PROMPT) < IMAGE_ID - 2
    for case, origin in ORIGINS.items():
        m = hf_model(mm.checkpoint(case))
        assert type(m).__name__ == origin
        assert any("vision_tower" in n for n, _ in m.named_parameters())


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("case", ["gemma3", "gemma4"])
def test_logits_equal_transformers(mm, case, opt_level):
    """Prefill, a chunked prefill over a cached prefix and a decode in one step, each equal
    to the ConditionalGeneration model's logits. Gemma 3's has no final soft-cap although
    its text config sets one (transformers' Gemma3ForConditionalGeneration applies none)."""
    if case == "gemma3":
        assert json.loads((mm.checkpoint(case) / "config.json").read_text())[
            "text_config"]["final_logit_softcapping"] == 30.0
    ex = executor(mm, case, opt_level=opt_level)
    assert_steps_match_transformers(mm, case, ex)


@pytest.mark.parametrize("case", ["gemma3", "gemma4"])
def test_greedy_equals_transformers_generate(mm, case):
    ex = executor(mm, case, opt_level=2)
    assert_greedy_matches_transformers(mm, case, ex, PROMPT[:6], max_tokens=8)


def test_tower_tensors_are_never_read(mm, tmp_path, monkeypatch):
    """A spy on the checkpoint reader: compiling reads shapes and tensors of the language
    model only, never of the vision or audio tower or their projectors."""
    import braze
    from braze.frontend.multimodal import text_name
    from braze.frontend.weights import Checkpoint

    touched = []
    for method in ("get", "shape"):
        real = getattr(Checkpoint, method)

        def spy(self, name, _real=real):
            touched.append(name)
            return _real(self, name)
        monkeypatch.setattr(Checkpoint, method, spy)
    for case in ORIGINS:
        touched.clear()
        braze.compile(mm.checkpoint(case), tmp_path / case, opt_level=0, targets="")
        towers = {n for n in Checkpoint(mm.checkpoint(case)).names() if text_name(n) is None}
        assert towers and any("vision_tower" in n for n in towers)
        assert touched and not towers & set(touched), sorted(towers & set(touched))[:3]


def test_manifest_and_inspect_say_text_only(mm):
    from braze.inspect import format_summary, summarize
    from braze.runtime import open_artifact
    for case, origin in ORIGINS.items():
        art = open_artifact(mm.artifact(case))
        rec = art.manifest["model"]["multimodal"]
        assert rec["architecture"] == origin and rec["text_only"] is True
        assert "vision_tower" in rec["skipped_modules"] and rec["skipped_tensors"] > 0
        assert art.text_only_origin == origin
        assert art.manifest["model"]["architecture"] == origin.replace(
            "ConditionalGeneration", "CausalLM")
        lines = [ln for ln in format_summary(summarize(art.root)).splitlines()
                 if ln.startswith("text-only")]
        assert len(lines) == 1 and origin in lines[0] and "vision_tower" in lines[0]
        assert "audio_tower" in lines[0] if case == "gemma4" else True
    # an artifact of a text checkpoint is none of this
    from braze.artifact import text_only_origin
    assert text_only_origin({"model": {"architecture": "LlamaForCausalLM"}}) is None


def test_chat_template_json_ships_and_wins_over_tokenizer_config(mm, tmp_path):
    """chat_template.json (the processor's file) is copied into the artifact and read;
    chat_template.jinja still comes first, tokenizer_config.json's chat_template last."""
    from braze.runtime import open_artifact
    from braze.runtime.chat_template import template_source
    tok_dir = open_artifact(mm.artifact("gemma3")).tokenizer_dir
    assert (tok_dir / "chat_template.json").is_file()
    assert template_source(tok_dir, {"chat_template": "other"}) == MULTIMODAL_CHAT_TEMPLATE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert template_source(tmp_path, {"chat_template": "from config"}) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert template_source(tmp_path, {"chat_template": "from config"}) == "from jinja"
    assert template_source(tmp_path / "none", {"chat_template": "from config"}) == "from config"


def test_server_refuses_image_parts_and_renders_the_json_template(mm, tmp_path):
    pytest.importorskip("openai")
    from transformers import AutoTokenizer

    from serve_helpers import MODEL, Server
    s = Server(mm.artifact("gemma3"), tmp_path)
    try:
        for part in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                     {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}):
            msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
            for path in ("/v1/chat/completions", "/tokenize"):
                r = s.http.post(path, json={"model": MODEL, "messages": msgs, "max_tokens": 2})
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert err["param"] == "messages" and err["type"] == "invalid_request_error"
                assert "text-only" in err["message"] and ORIGINS["gemma3"] in err["message"]
                assert part["type"] in err["message"] and "content[1]" in err["message"]
        # /v1/responses says the same of its image parts, naming its own field
        for part in ({"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                     {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}):
            r = s.http.post("/v1/responses", json={"model": MODEL, "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "What?"}, part]}]})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "input" and "input[0].content[1]" in err["message"]
            assert part["type"] in err["message"] and "text-only" in err["message"]
            assert ORIGINS["gemma3"] in err["message"]
        # text parts are served, rendered with chat_template.json's template
        msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        r = s.http.post("/tokenize", json={"model": MODEL, "messages": msgs})
        assert r.status_code == 200, r.text
        tok = AutoTokenizer.from_pretrained(mm.checkpoint("gemma3"))
        assert r.json()["tokens"] == tok.encode("<s>user says: Hi\nassistant:",
                                                add_special_tokens=False)
        r = s.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3,
                                             temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
    finally:
        s.stop()


def test_checkpoint_with_its_own_lm_head(mm, tmp_path):
    """Untied: the head is read from the checkpoint (`language_model.lm_head.weight` in the
    Gemma 3 layout), and the logits still equal transformers'."""
    import braze
    from braze.ir.contract import SeqChunk
    from conftest import run_step, take_blocks
    from braze.runtime import Executor, open_artifact
    with contextlib.redirect_stderr(io.StringIO()):
        ckpt = make_multimodal_checkpoint("gemma3", tmp_path / "m", seed=2,
                                          tie_word_embeddings=False)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg.get("tie_word_embeddings") is False
    braze.compile(ckpt, tmp_path / "a", opt_level=0, targets="")
    ex = Executor(open_artifact(tmp_path / "a"), num_blocks=4)
    assert "lm_head.weight" in ex.artifact.graph.params
    got = run_step(ex, [SeqChunk(PROMPT, 0, take_blocks(ex, 2))])
    with torch.no_grad():
        expected = hf_model(ckpt)(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=1e-4)


def test_top_level_token_ids_and_tie_are_the_wrappers(mm, tmp_path):
    """Published multimodal configs keep bos/eos at the top (gemma-3-4b-it: eos [1, 106])
    and tie the head by the top-level flag: the text model's spec takes those."""
    from braze.frontend.load import read_config
    from braze.models.registry import build_spec
    raw = json.loads((mm.checkpoint("gemma3") / "config.json").read_text())
    raw.update(eos_token_id=[2, 106], bos_token_id=2, tie_word_embeddings=False)
    raw["text_config"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    _, cfg, origin = read_config(tmp_path)
    spec = build_spec(cfg)
    assert origin == ORIGINS["gemma3"] and spec.architecture == "Gemma3ForCausalLM"
    assert (spec.eos_token_ids, spec.bos_token_id) == ([2, 106], 2)
    assert spec.tie_word_embeddings is False and spec.final_softcap == 0.0


def test_other_multimodal_architectures_are_refused_naming_the_accepted_ones(tmp_path):
    from braze.frontend.load import read_config
    from braze.ir.errors import BrazeError
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}))
    with pytest.raises(BrazeError) as e:
        read_config(tmp_path)
    msg = str(e.value)
    assert "LlavaForConditionalGeneration" in msg and "\n" not in msg
    assert all(origin in msg for origin in ORIGINS.values())


def test_llm_chat_refuses_image_parts_naming_the_text_only_origin(mm):
    """LLM.chat says what the server says: the part, its type, and that the artifact was
    compiled text-only from the multimodal checkpoint (it said only 'braze chats in
    text'); text parts are rendered with chat_template.json's template."""
    import braze
    from braze.ir.errors import BrazeError
    from braze.runtime import SamplingParams
    llm = braze.LLM(mm.artifact("gemma3"), backend="reference")
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(BrazeError, match=r"messages\[0\]\.content\[1\] is of type 'image_url'"
                       r".*text-only from Gemma3ForConditionalGeneration"):
        llm.chat([{"role": "user", "content": [{"type": "text", "text": "What?"}, part]}])
    (out,) = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                      SamplingParams(max_tokens=1))
    assert out.prompt.endswith("user says: Hi\nassistant:")
