"""The prefix cache as an operator drives it: vLLM's `LLM.reset_prefix_cache()` and
`POST /reset_prefix_cache`, on a plain and on a hybrid (sliding-window) cache, and the
prefix-cache counters of /metrics. After a reset the next prompt with a known prefix hits
nothing and its output equals a cold engine's."""

from __future__ import annotations

import pytest

from braze.runtime import LLM
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of

GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
SHARED = prompts_of([40], seed=11)[0]
A, B = (SHARED + t for t in prompts_of([6, 7], seed=12))


def _cached(out) -> int:
    return out.metrics["num_cached_tokens"]


@pytest.mark.parametrize("case,opts", [
    ("llama", {}),
    ("gemma3-sandwich-softcap", dict(block_size=4, max_model_len=128, max_num_tokens=16,
                                     max_num_seqs=4)),
    # KV-shared layers (they read another layer's cache) beside window and global ones
    ("gemma4-ple-kvshare-moe", dict(block_size=4, max_model_len=128, max_num_tokens=16,
                                    max_num_seqs=4))])
def test_reset_prefix_cache_forgets_every_prefix(store, case, opts):
    art = store.artifact(case, **opts)
    cold = LLM(art, backend="reference").generate([B], GREEDY)[0].outputs[0].token_ids
    llm = LLM(art, backend="reference")
    llm.generate([A], GREEDY)
    hit = llm.generate([B], GREEDY)[0]
    assert _cached(hit) > 0 and hit.outputs[0].token_ids == cold
    assert llm.reset_prefix_cache() is True
    again = llm.generate([B], GREEDY)[0]
    assert _cached(again) == 0 and again.outputs[0].token_ids == cold
    # and the cache fills again after it
    assert _cached(llm.generate([B], GREEDY)[0]) > 0


def test_serve_resets_the_prefix_cache_and_counts_its_queries(store, tmp_path):
    """POST /reset_prefix_cache as vLLM has it (200, the next prompt hits nothing), and
    /metrics counts the prompt tokens looked up beside those that hit, so a dashboard can
    show the hit rate (vLLM's prefix_cache_queries / prefix_cache_hits)."""
    pytest.importorskip("fastapi")
    from serve_helpers import MODEL, Server
    s = Server(store.artifact("llama"), tmp_path)
    try:
        def complete(prompt):
            r = s.http.post("/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": GREEDY.max_tokens,
                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        def counts():
            m = s.metrics()
            return m["braze_prefix_cache_hit_tokens_total"], \
                m["braze_prefix_cache_query_tokens_total"]
        hits0, queries0 = counts()
        complete(A)
        first = complete(B)
        hits1, queries1 = counts()
        assert queries1 - queries0 == len(A) + len(B)
        assert 0 < hits1 - hits0 <= len(SHARED)
        r = s.http.post("/reset_prefix_cache")
        assert r.status_code == 200, r.text
        assert complete(B) == first
        hits2, queries2 = counts()
        assert (hits2, queries2 - queries1) == (hits1, len(B))
    finally:
        s.stop()


def test_reset_prefix_cache_on_a_server_that_is_stopping_is_a_503(store):
    """A draining server (or one whose engine thread died) answers the routes that reach
    the engine between steps with the 503 of /health, not a 500 and a traceback."""
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from braze.runtime.engine import Engine
    from braze.serving import app as app_mod
    from braze.serving import utility_routes
    from braze.serving.async_engine import AsyncEngine

    aengine = AsyncEngine(Engine(store.artifact("llama"), backend="reference"))
    aengine.begin_drain()
    svc = type("Svc", (), {"aengine": aengine})()
    api = FastAPI()
    app_mod._install_errors(api)
    utility_routes.install(api, svc)
    r = TestClient(api, raise_server_exceptions=False).post("/reset_prefix_cache")
    assert r.status_code == 503, r.text
    assert "shutting down" in r.json()["error"]["message"]
