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

TEMPLATE = ("{% if tools %}[tools: {% for t in tools %}{{ t['function']['name'] }} "
            "{% endfor %}]\n{% endif %}"
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
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


@pytest.fixture(scope="module")
def flagged(untemplated, tmp_path_factory):
    d = tmp_path_factory.mktemp("flagged")
    (d / "t.jinja").write_text(TEMPLATE)
    s = Server(untemplated[1], d, "--chat-template", str(d / "t.jinja"))
    try:
        yield s
    finally:
        s.stop()


def test_a_model_without_a_template_serves_chat_with_the_flags_template(untemplated, flagged):
    r = flagged.http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                              "add_special_tokens": False})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == _hf_ids(untemplated[0], TEMPLATE)
    c = flagged.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert c.choices[0].finish_reason in ("length", "stop")


def test_tokenize_renders_the_requests_tools_as_chat_does(untemplated, flagged):
    """vLLM's /tokenize takes `tools` with `messages`: its count is the prompt_tokens of the
    chat request with those tools, not of the chat without them."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = flagged.http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                              "tools": tools, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == _hf_ids(untemplated[0], TEMPLATE, tools=tools)
    c = flagged.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1,
                                               tools=tools, tool_choice="none")
    counted = flagged.http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                                    "tools": tools}).json()["count"]
    assert counted == c.usage.prompt_tokens
    bad = flagged.http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                                "tools": [{"type": "function"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"


@pytest.fixture(scope="module")
def bare(untemplated, tmp_path_factory):
    """The model without a template, served without --chat-template."""
    s = Server(untemplated[1], tmp_path_factory.mktemp("bare"), "--trust-request-chat-template")
    try:
        yield s
    finally:
        s.stop()


def test_without_a_template_chat_is_a_400_naming_the_flag(bare):
    r = bare.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 400, r.text
    assert "--chat-template" in r.json()["error"]["message"]


def test_a_requests_template_that_writes_the_bos_gets_one_bos(untemplated, bare):
    """A request's chat_template writing {{ bos_token }} (as real templates do) on a model
    without one: the prompt starts with one BOS, as chat completions promise, not with the
    template's and the tokenizer's both."""
    template = "{{ bos_token }}" + TEMPLATE
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(untemplated[0])
    want = hf.apply_chat_template(MESSAGES, chat_template=template, tokenize=True,
                                  add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert want[:2] == [hf.bos_token_id, want[1]] and want[1] != hf.bos_token_id
    r = bare.http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES,
                                           "chat_template": template})
    assert r.json()["tokens"] == want
    c = bare.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MESSAGES, "chat_template": template, "max_tokens": 1,
        "return_token_ids": True}).json()
    assert c["prompt_token_ids"] == want


def test_a_bad_chat_template_flag_is_one_line_at_start_up(untemplated, tmp_path):
    art = untemplated[1]
    code, _, err = run("serve", art, "--port", "0", "--chat-template",
                       str(tmp_path / "missing.jinja"), timeout=120)
    assert_one_line_error(code, err, "--chat-template", "missing.jinja")
    code, _, err = run("serve", art, "--port", "0", "--chat-template", "{% for %}",
                       timeout=120)
    assert_one_line_error(code, err, "--chat-template", "does not compile")


def _metaspace_tokenizer(directory, template: str):
    """A Mistral-v0.3-style tokenizer: Metaspace with prepend_scheme "first" (only the
    text's first piece gets the '▁'), a BOS prepended by encoding, the template writing
    {{ bos_token }} itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in ["▁"] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ[]/.,?"):
        vocab[c] = len(vocab)
    merges = [("▁", "["), ("[", "I"), ("▁", "h"), ("▁h", "i"), ("[", "/")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": template}))


@pytest.mark.parametrize("template", [
    "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}",
    "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"])
def test_chat_prompt_ids_are_the_templates_text_tokenised_as_transformers_does(tmp_path,
                                                                              template):
    """The rendered chat is tokenised as one text, as transformers' apply_chat_template
    (tokenize=True) and vLLM do, with exactly one BOS: a template's own BOS is not cut off
    and the rest re-encoded (a Metaspace 'first' tokenizer would then put a '▁' before
    '[INST]' that the model never saw in training); a template writing none gets the
    tokenizer's."""
    from transformers import AutoTokenizer

    from braze.runtime.tokenizer import Tokenizer
    from braze.serving.app import Service
    from braze.serving.chat import ChatTemplate
    from braze.serving.protocol import ChatCompletionRequest
    _metaspace_tokenizer(tmp_path, template)
    tok = Tokenizer(tmp_path)
    svc = Service(None, None, "m", 64, tok, ChatTemplate(template, tok.config))
    msgs = [{"role": "user", "content": "hi there"}]
    hf = AutoTokenizer.from_pretrained(tmp_path)
    want = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    if want[0] != hf.bos_token_id:              # the template writes none: the tokenizer's
        want = [hf.bos_token_id] + want
    body = ChatCompletionRequest(messages=msgs)
    assert svc.prompts._chat(body, None, False) == want
    assert svc.prompts._chat(body, None, True) == want       # the capped path
