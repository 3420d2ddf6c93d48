"""The model's sampling defaults (runtime/sampling_defaults.py): a generation_config.json's
temperature / top_k / max_new_tokens ... stand in for what a request leaves unset, in the
server and in LLM.generate, as vLLM's --generation-config auto does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from braze.ir.errors import BrazeError
from braze.runtime.sampler import SamplingParams
from braze.runtime.sampling_defaults import sampling_defaults

from conftest import hf_model
from serve_helpers import MODEL, Server

PROMPT = [1, 17, 93, 4, 250, 66, 7]
# top_k 1 makes sampling at temperature 1 greedy: the reference is transformers' argmax
GEN = {"temperature": 1.0, "top_k": 1, "max_new_tokens": 3, "do_sample": True}


def _write(d, config: dict):
    d.mkdir(parents=True, exist_ok=True)
    (d / "generation_config.json").write_text(json.dumps(config))
    return d


def test_the_file_keys_are_read_under_sampling_params_names(tmp_path):
    d = _write(tmp_path / "t", {**GEN, "top_p": 0.95, "min_p": 0.05, "bos_token_id": 1,
                                "repetition_penalty": 1.1, "eos_token_id": [2, 3]})
    got = sampling_defaults(d)
    assert got == {"temperature": 1.0, "top_k": 1, "max_tokens": 3, "top_p": 0.95,
                   "min_p": 0.05, "repetition_penalty": 1.1}
    assert sampling_defaults(d, "vllm") == {}
    assert sampling_defaults(tmp_path / "nothing-here") == {}      # no file: no defaults
    assert sampling_defaults(None) == {}                           # no tokenizer directory
    # override over the file; -1 is "no top-k", as in requests
    assert sampling_defaults(d, override={"top_k": -1, "max_new_tokens": 5})["top_k"] == 0
    assert sampling_defaults(d, "vllm", {"temperature": 0.5}) == {"temperature": 0.5}
    other = _write(tmp_path / "other", {"temperature": 0.7})
    assert sampling_defaults(d, str(other)) == {"temperature": 0.7}
    assert sampling_defaults(d, str(other / "generation_config.json")) == {"temperature": 0.7}


@pytest.mark.parametrize("config, words", [
    ({"top_p": 1.5}, ["top_p", "generation_config.json", "--generation-config vllm"]),
    ({"max_new_tokens": 0}, ["max_tokens", "generation_config.json"]),
    ({"temperature": "hot"}, ["temperature"]),
])
def test_a_bad_default_is_refused_naming_the_file_and_the_way_out(tmp_path, config, words):
    d = _write(tmp_path / "t", config)
    with pytest.raises(BrazeError) as e:
        sampling_defaults(d)
    for w in words:
        assert w in str(e.value)


def test_a_bad_file_or_source_is_refused(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(BrazeError, match="cannot be read as JSON"):
        sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(BrazeError, match="not a JSON object"):
        sampling_defaults(tmp_path)
    with pytest.raises(BrazeError, match="no generation_config.json there"):
        sampling_defaults(None, str(tmp_path / "missing"))


def test_engine_options_check_the_override():
    from braze.runtime.options import EngineOptions
    with pytest.raises(BrazeError, match="'do_sample', which braze does not read"):
        EngineOptions(override_generation_config={"do_sample": True})
    with pytest.raises(BrazeError, match="not valid JSON"):
        EngineOptions(override_generation_config="{temperature: 1}")
    assert EngineOptions(override_generation_config='{"top_p": 0.9}') \
        .override_generation_config == {"top_p": 0.9}
    with pytest.raises(BrazeError, match="generation_config must be"):
        EngineOptions(generation_config="")


@pytest.fixture(scope="module")
def gen_artifact(store, tmp_path_factory):
    """The tiny Llama, compiled from a checkpoint whose generation_config.json says GEN."""
    import braze
    d = tmp_path_factory.mktemp("gencfg")
    ckpt = shutil.copytree(store.checkpoint("llama"), d / "model")
    cfg = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**cfg, **GEN}))
    braze.compile(ckpt, d / "a.braze", opt_level=0, targets="")
    return ckpt, d / "a.braze"


def _greedy(ckpt, prompt, n):
    m = hf_model(ckpt)
    m.generation_config.eos_token_id = 2         # stop where braze stops
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_llm_generate_without_params_uses_the_models_defaults(gen_artifact):
    from braze import LLM
    ckpt, art = gen_artifact
    with LLM(art, backend="reference", num_kv_blocks=16) as llm:
        assert llm.get_default_sampling_params() == SamplingParams(
            temperature=1.0, top_k=1, max_tokens=3)
        out = llm.generate({"prompt_token_ids": PROMPT})[0].outputs[0]
        assert out.token_ids == _greedy(ckpt, PROMPT, 3)
        # explicit parameters are the caller's: none of the defaults apply
        explicit = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=5))
        assert explicit[0].outputs[0].token_ids == _greedy(ckpt, PROMPT, 5)
    with LLM(art, backend="reference", num_kv_blocks=16, generation_config="vllm") as llm:
        assert llm.get_default_sampling_params() == SamplingParams()
    with LLM(art, backend="reference", num_kv_blocks=16,
             override_generation_config={"max_new_tokens": 2}) as llm:
        assert llm.get_default_sampling_params().max_tokens == 2


def test_the_server_fills_unset_fields_from_the_models_defaults(gen_artifact, tmp_path):
    ckpt, art = gen_artifact
    s = Server(art, tmp_path, "--override-generation-config", '{"max_new_tokens": 2}')
    try:
        assert "sampling defaults" in s.stderr()
        info = s.http.get("/server_info").json()["engine"]
        assert info["sampling_defaults"] == {"temperature": 1.0, "top_k": 1, "max_tokens": 2}
        # no temperature, no top_k, no max_tokens: the file's top_k 1, the override's 2
        r = s.http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 2
        from transformers import AutoTokenizer
        text = AutoTokenizer.from_pretrained(ckpt).decode(_greedy(ckpt, PROMPT, 2),
                                                          skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == text
        chat = s.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}])
        assert chat.usage.completion_tokens <= 2
        resp = s.http.post("/v1/responses", json={"model": MODEL, "input": "hello there"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["output_tokens"] <= 2
        # a request's own values win: top_k 0 at temperature 0 is greedy for 4 tokens
        r = s.http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                 "max_tokens": 4, "temperature": 0,
                                                 "top_k": 0, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        s.stop()
