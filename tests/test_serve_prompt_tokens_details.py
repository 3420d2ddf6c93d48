"""--enable-prompt-tokens-details (vLLM's flag): usage.prompt_tokens_details.cached_tokens
says how many prompt tokens the prefix cache served. The reference is the block arithmetic:
a repeated prompt hits every full block but the one holding its last token, which is
always computed again (the step needs its logits)."""

from __future__ import annotations

import json

from serve_helpers import MODEL, Server

PROMPT = [1] + [17, 93, 4, 250, 66, 7, 31, 128, 9, 45, 200, 3, 77, 12, 190, 55] * 3


def _usage_of_stream(s, body) -> dict:
    use = None
    with s.http.stream("POST", "/v1/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                use = json.loads(line[6:]).get("usage") or use
    return use


def test_cached_prompt_tokens_are_reported(store, tmp_path):
    s = Server(store.artifact("llama"), tmp_path, "--enable-prompt-tokens-details")
    try:
        block = s.http.get("/server_info").json()["engine"]["block_size"]
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        first = s.http.post("/v1/completions", json=body).json()["usage"]
        assert first["prompt_tokens_details"] == {"cached_tokens": 0}
        want = (len(PROMPT) - 1) // block * block
        assert want > 0
        again = s.http.post("/v1/completions", json=body).json()["usage"]
        assert again["prompt_tokens_details"] == {"cached_tokens": want}
        assert _usage_of_stream(s, body)["prompt_tokens_details"] == {"cached_tokens": want}
        # vLLM's cache_salt: hits only among requests of the same salt
        salted = {**body, "cache_salt": "tenant-a"}
        for req, hit in ((salted, 0), ({**body, "cache_salt": "tenant-b"}, 0), (salted, want)):
            use = s.http.post("/v1/completions", json=req).json()["usage"]
            assert use["prompt_tokens_details"] == {"cached_tokens": hit}
        # /v1/responses passes the salt on too (its usage always counts cached tokens)
        text = "Tell me everything about prefix caches, please. " * 3
        for salt, cached in (("x", False), ("y", False), ("x", True)):
            use = s.http.post("/v1/responses", json={
                "model": MODEL, "input": text, "max_output_tokens": 1,
                "cache_salt": salt}).json()["usage"]
            assert (use["input_tokens_details"]["cached_tokens"] > 0) == cached, salt
        r = s.http.post("/v1/completions", json={**body, "cache_salt": ""})
        assert r.status_code == 400 and "cache_salt" in r.text
        # n samples of one prompt: its cached tokens count once, as its prompt tokens do
        both = s.http.post("/v1/completions", json={**body, "n": 2}).json()["usage"]
        assert both["prompt_tokens"] == len(PROMPT)
        assert both["prompt_tokens_details"] == {"cached_tokens": want}
    finally:
        s.stop()


def test_without_the_flag_usage_is_plain(store, tmp_path):
    s = Server(store.artifact("llama"), tmp_path)
    try:
        use = s.http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                   "max_tokens": 1}).json()["usage"]
        assert "prompt_tokens_details" not in use
    finally:
        s.stop()
