"""vLLM's truncate_prompt_tokens: a request keeps only its prompt's last N tokens (-1: the
model's max_model_len), so a client can send more context than fits. The reference is
transformers' greedy continuation of those last N tokens."""

from __future__ import annotations

import torch

from conftest import hf_model
from serve_helpers import MODEL, Server


def _greedy(ckpt, ids, n):
    with torch.no_grad():
        out = hf_model(ckpt).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_truncate_prompt_tokens_keeps_the_last_tokens(store, tmp_path):
    ckpt = store.checkpoint("llama")
    s = Server(store.artifact("llama"), tmp_path)
    try:
        limit = s.http.get("/v1/models").json()["data"][0]["max_model_len"]
        g = torch.Generator().manual_seed(0)
        long = [1] + torch.randint(3, 200, (limit + 40,), generator=g).tolist()
        k = 24
        body = {"model": MODEL, "prompt": long, "max_tokens": 4, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        r = s.http.post("/v1/completions", json={**body, "truncate_prompt_tokens": k})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert r.json()["usage"]["prompt_tokens"] == k
        assert ch["prompt_token_ids"] == long[-k:]
        assert ch["token_ids"] == _greedy(ckpt, long[-k:], 4)
        # without truncation the prompt is too long; -1 keeps max_model_len: still too long
        for extra in ({}, {"truncate_prompt_tokens": -1}):
            r = s.http.post("/v1/completions", json={**body, **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = s.http.post("/v1/completions", json={**body, "truncate_prompt_tokens": 0})
        assert r.status_code == 400 and "truncate_prompt_tokens" in r.text
        # a text prompt cut short echoes what the model read; an uncut one as sent
        text = "The quick brown fox jumps over the lazy dog. " * 4
        ids = s.http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()["tokens"]
        for keep, cut in ((5, True), (len(ids) + 3, False)):
            r = s.http.post("/v1/completions", json={
                "model": MODEL, "prompt": text, "max_tokens": 1, "echo": True,
                "truncate_prompt_tokens": keep, "temperature": 0})
            echoed = r.json()["choices"][0]["text"]
            if cut:
                from transformers import AutoTokenizer
                want = AutoTokenizer.from_pretrained(ckpt).decode(ids[-keep:])
                assert echoed.startswith(want) and not echoed.startswith(text)
            else:
                assert echoed.startswith(text)
        # /v1/responses: the same, on the rendered input
        r = s.http.post("/v1/responses", json={"model": MODEL, "input": text,
                                               "max_output_tokens": 1,
                                               "truncate_prompt_tokens": 6})
        assert r.status_code == 200 and r.json()["usage"]["input_tokens"] == 6, r.text
        # chat: the rendered prompt's last tokens
        msgs = [{"role": "user", "content": text}]
        full = s.http.post("/tokenize", json={"model": MODEL, "messages": msgs}).json()["tokens"]
        r = s.http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": msgs, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, "truncate_prompt_tokens": 7, "return_token_ids": True})
        assert r.json()["usage"]["prompt_tokens"] == 7
        assert r.json()["choices"][0]["token_ids"] == _greedy(ckpt, full[-7:], 3)
    finally:
        s.stop()


def test_a_truncation_longer_than_the_model_is_refused_by_name(store, tmp_path):
    """truncate_prompt_tokens above max_model_len can keep nothing the model takes: a 400
    naming it, as vLLM's, for a short prompt too (it was taken), and for a long one
    (whose 400 blamed the prompt, which the client had asked to have cut)."""
    s = Server(store.artifact("llama"), tmp_path)
    try:
        limit = s.http.get("/v1/models").json()["data"][0]["max_model_len"]
        long = [1] + [3 + i % 200 for i in range(limit + 40)]
        for route, body in (("/v1/completions", {"prompt": long}),
                            ("/v1/completions", {"prompt": "hi"}),
                            ("/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/responses", {"input": "hi"})):
            r = s.http.post(route, json={"model": MODEL, **body,
                                         "truncate_prompt_tokens": limit + 1})
            assert r.status_code == 400, (route, r.text)
            err = r.json()["error"]
            assert err["param"] == "truncate_prompt_tokens" and str(limit) in err["message"]
            r = s.http.post(route, json={"model": MODEL, **body, "max_tokens": 1,
                                         "truncate_prompt_tokens": limit - 1}
                            if route != "/v1/responses" else
                            {"model": MODEL, **body, "max_output_tokens": 1,
                             "truncate_prompt_tokens": limit - 1})
            assert r.status_code == 200, (route, r.text)
    finally:
        s.stop()
