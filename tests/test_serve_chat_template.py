"""`braze serve --chat-template FILE|TEXT` (vLLM's flag): the server's chat template instead
of the model's (or for a model that has none), rendered exactly as transformers'
apply_chat_template renders that template; a model without a template says how to give one;
a template file that is missing or does not compile is refused at start-up, naming the flag."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from cli_helpers import assert_one_line_error, run  # noqa: E402
from serve_helpers import MODEL, Server  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def untemplated(tmp_path_factory):
    """A tiny llama whose tokenizer has no chat template (as many base models)."""
    import braze
    from braze.tiny import make_checkpoint
    d = tmp_path_factory.mktemp("untemplated")
    ck = make_checkpoint("llama", d / "model", seed=1)
    cfg_path = ck / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    return ck, braze.compile(ck, d / "a.braze", opt_level=0, targets="").root


def _hf_ids(checkpoint, template, **kw) -> list[int]:
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(checkpoint)
    text = hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=False,
                                  add_generation_prompt=True, **kw)
    return hf(text, add_special_tokens=False)["input_ids"]


def test_a_model_without_a_template_serves_chat_with_the_flags_template(untemplated, tmp_path):
    checkpoint, art = untemplated
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    s = Server(art, tmp_path, "--chat-template", str(path))
    try:
        r = s.http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                            "add_special_tokens": False})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == _hf_ids(checkpoint, TEMPLATE)
        c = s.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert c.choices[0].finish_reason in ("length", "stop")
    finally:
        s.stop()


def test_without_a_template_chat_is_a_400_naming_the_flag(untemplated, tmp_path):
    s = Server(untemplated[1], tmp_path)
    try:
        r = s.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
        assert r.status_code == 400, r.text
        assert "--chat-template" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_a_bad_chat_template_flag_is_one_line_at_start_up(untemplated, tmp_path):
    art = untemplated[1]
    code, _, err = run("serve", art, "--port", "0", "--chat-template",
                       str(tmp_path / "missing.jinja"), timeout=120)
    assert_one_line_error(code, err, "--chat-template", "missing.jinja")
    code, _, err = run("serve", art, "--port", "0", "--chat-template", "{% for %}",
                       timeout=120)
    assert_one_line_error(code, err, "--chat-template", "does not compile")
