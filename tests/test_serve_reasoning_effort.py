"""OpenAI's reasoning effort: chat's `reasoning_effort` and the Responses API's
`reasoning: {"effort": ...}` reach the chat template as `reasoning_effort`, as vLLM passes
them (gpt-oss's template and others read it). The reference is the template rendered by
jinja2 itself and encoded by the tokenizer."""

from __future__ import annotations

from serve_helpers import MODEL, Server

TEMPLATE = ("{{ bos_token }}{% if reasoning_effort is defined %}effort {{ reasoning_effort }}\n"
            "{% endif %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
MSGS = [{"role": "user", "content": "hello there"}]


def _prompt_tokens(ckpt, **kw) -> int:
    from jinja2 import Environment
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    text = Environment().from_string(TEMPLATE).render(
        messages=MSGS, add_generation_prompt=True, bos_token=tok.bos_token, **kw)
    return len(tok.encode(text, add_special_tokens=False))


def test_reasoning_effort_reaches_the_chat_template(store, tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    s = Server(store.artifact("llama"), tmp_path, "--chat-template", str(tmp_path / "t.jinja"))
    ckpt = store.checkpoint("llama")
    try:
        chat = {"model": MODEL, "messages": MSGS, "max_tokens": 1}
        for effort in (None, "low", "high"):
            body = chat if effort is None else {**chat, "reasoning_effort": effort}
            r = s.http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            want = _prompt_tokens(ckpt, **({} if effort is None else
                                           {"reasoning_effort": effort}))
            assert r.json()["usage"]["prompt_tokens"] == want, effort
        r = s.http.post("/v1/responses", json={"model": MODEL, "input": "hello there",
                                               "max_output_tokens": 1,
                                               "reasoning": {"effort": "low"}})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["input_tokens"] == _prompt_tokens(ckpt, reasoning_effort="low")
        assert r.json()["reasoning"] == {"effort": "low", "summary": None}
        bad = s.http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                 "reasoning": {"effort": "low",
                                                               "summary": "auto"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning"
        bad = s.http.post("/v1/chat/completions", json={**chat, "reasoning_effort": "max"})
        assert bad.status_code == 400 and "reasoning_effort" in bad.text
    finally:
        s.stop()
