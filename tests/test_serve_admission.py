"""--max-queue bounds the client requests a server accepts while its queue is full; it must
not refuse, on an idle server, one request whose own prompts, samples (n) or beams outnumber
the bound: retrying such a request "later", as the 503 says, could never help.

The server here runs one sequence at a time (--max-num-seqs 1) with a queue of 2, so a
request of 4 prompts, n=4 or 4 beams is more than the queue at any moment. The answers are
compared with the offline engine's (the same artifact, greedy)."""

from __future__ import annotations

import pytest

pytest.importorskip("openai")

from braze.runtime.engine import Engine  # noqa: E402
from braze.runtime.sampler import SamplingParams  # noqa: E402

from conftest import prompts_of, run_all  # noqa: E402
from serve_helpers import MODEL, Server  # noqa: E402

PROMPTS = prompts_of([5, 6, 7, 8], seed=11)
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def art(store):
    return store.artifact("llama")


@pytest.fixture(scope="module")
def server(art, tmp_path_factory):
    s = Server(art, tmp_path_factory.mktemp("admission"), "--max-queue", "2",
               "--max-num-seqs", "1")
    try:
        yield s
    finally:
        s.stop()


def _complete(server, **body):
    return server.http.post("/v1/completions", json={
        "model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, **body})


def test_a_batch_of_prompts_larger_than_the_queue_is_served(server, art):
    want = [o.token_ids for o in run_all(Engine(art, backend="reference", num_kv_blocks=64),
                                         PROMPTS, SamplingParams(max_tokens=MAX_TOKENS,
                                                                 ignore_eos=True))]
    r = _complete(server, prompt=PROMPTS)
    assert r.status_code == 200, r.text
    got = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["token_ids"] for c in got] == want


def test_more_samples_than_the_queue_are_served(server):
    r = _complete(server, prompt=PROMPTS[0], n=4, temperature=1.0, seed=5)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4


def test_a_beam_search_wider_than_the_queue_is_served(server):
    r = _complete(server, prompt=PROMPTS[0], n=4, use_beam_search=True)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 4


def test_nothing_was_counted_as_rejected_or_aborted(server):
    m = server.metrics()
    assert m["braze_requests_rejected_total"] == 0
    assert m['braze_requests_total{finish_reason="abort"}'] == 0


def test_a_beam_search_in_flight_when_the_drain_starts_finishes(art):
    """A drain (SIGTERM) lets in-flight requests finish. A beam search sends new engine
    requests at every step: those were refused once the drain began, so the search in
    flight was answered 503; and between two steps no engine request of it was in flight,
    so the drain could end under it. In-process, the engine's steps held on an Event: the
    drain starts while the search runs, and the answer is the one given without a drain."""
    import threading

    from fastapi.testclient import TestClient

    from braze.serving.app import Service, create_app
    from braze.serving.async_engine import AsyncEngine
    from braze.serving.metrics import Metrics
    engine = Engine(art, backend="reference", num_kv_blocks=64)
    step, entered, go = engine.step, threading.Event(), threading.Event()
    go.set()

    def held_step():
        entered.set()
        go.wait(60)
        return step()
    engine.step = held_step
    metrics = Metrics(MODEL)
    aeng = AsyncEngine(engine, metrics=metrics)
    svc = Service(aeng, metrics, MODEL, engine.max_model_len, engine.tokenizer, None)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "n": 2,
            "use_beam_search": True, "ignore_eos": True}
    with TestClient(create_app(svc)) as client:
        want = client.post("/v1/completions", json=body)
        assert want.status_code == 200, want.text
        go.clear()
        entered.clear()
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=client.post("/v1/completions", json=body)))
        t.start()
        assert entered.wait(60)               # the search's first step is in the engine
        aeng.begin_drain()
        idle = client.portal.call(aeng.wait_idle, 0.0)   # not idle: the search is in flight
        go.set()
        t.join(60)
        drained = client.portal.call(aeng.wait_idle, 30.0)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == \
            [c["text"] for c in want.json()["choices"]]
        assert not idle and drained
        assert client.post("/v1/completions", json=body).status_code == 503  # new: refused
