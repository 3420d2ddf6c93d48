"""`braze serve` end to end: the real server in a subprocess on 127.0.0.1, a tiny compiled
llama (reference backend) with the tiny tokenizer and its chat template, talked to with
the `openai` package and raw httpx. Generated text is checked against the engine run
in-process one request at a time, and chat prompts against transformers'
`apply_chat_template`. Also unit tests of the pieces that need no server (protocol,
metrics text, chat rendering, SSE framing).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")

from serve_helpers import MODEL, Server  # noqa: E402  (after the importorskip)


# ---- the server in a subprocess ---------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(store):
    return store.artifact("llama")


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    s = Server(artifact, tmp_path_factory.mktemp("serve"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def ref_engine(artifact):
    """The engine in-process, for requests run one at a time (what the server must match)."""
    from braze.runtime.engine import Engine
    return Engine(artifact, backend="reference", num_kv_blocks=64)


@pytest.fixture(scope="module")
def reference(ref_engine):
    """Text the engine generates for one prompt on its own (in-process, greedy)."""
    from braze.runtime.sampler import SamplingParams

    from conftest import run_all

    def run(prompt, max_tokens, **kw):
        (out,) = run_all(ref_engine, [prompt], SamplingParams(max_tokens=max_tokens, **kw))
        return out.text, out.finish_reason, len(out.token_ids), len(out.prompt_token_ids)
    return run


def sse_events(lines) -> list:
    """The JSON payloads of an SSE stream, then "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- completions and chat -----------------------------------------------------------------

def test_completion_plain_and_streamed(server, reference):
    want, reason, n, n_prompt = reference("The quick brown fox", 12, ignore_eos=True)
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    r = server.client.completions.create(**kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n) == (n_prompt, 12)
    assert r.usage.total_tokens == n_prompt + 12 and r.model == MODEL
    assert r.object == "text_completion" and r.id.startswith("cmpl-")

    chunks = list(server.client.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_token_ids_and_stop_string(server, reference):
    ids = [1, 40, 41, 42, 43, 44]
    want, *_ = reference(ids, 8, ignore_eos=True)
    r = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(ids)
    # a stop string taken from the middle of the greedy continuation ends it there
    full, *_ = reference("Once upon a time", 24, ignore_eos=True)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    want, reason, *_ = reference("Once upon a time", 24, ignore_eos=True, stop=[stop])
    assert reason == "stop" and stop not in want
    for stream in (False, True):
        res = server.client.completions.create(model=MODEL, prompt="Once upon a time",
                                               max_tokens=24, temperature=0, stop=[stop],
                                               stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(res)
            text, last = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0]
        else:
            text, last = res.choices[0].text, res.choices[0]
        assert (text, last.finish_reason) == (want, "stop")


def test_stop_on_the_last_allowed_token(server, ref_engine):
    """A stop token or stop string landing on the max_tokens-th token: finish_reason
    "stop" (not "length"), and the stop string or the stop token's text cut from the text
    (vLLM's; kept with include_stop_str_in_output), streamed or not."""
    from braze.runtime.sampler import SamplingParams

    from conftest import last_token_stops, run_all
    prompt = "Once upon a time"
    (free,) = run_all(ref_engine, [prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    k, tok, stop = last_token_stops(ref_engine.tokenizer, free.token_ids)
    text = ref_engine.tokenizer.decode(free.token_ids[:k])
    before = ref_engine.tokenizer.decode(free.token_ids[:k - 1])
    assert text != before
    for extra, want in (({"stop_token_ids": [tok]}, before),
                        ({"stop_token_ids": [tok], "include_stop_str_in_output": True}, text),
                        ({"stop": [stop]}, text[:-len(stop)])):
        for stream in (False, True):
            res = server.client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=k, temperature=0, stream=stream,
                stop=extra.get("stop"), extra_body={"ignore_eos": True, **extra})
            if stream:
                chunks = list(res)
                got, last = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0]
            else:
                got, last = res.choices[0].text, res.choices[0]
            assert (got, last.finish_reason) == (want, "stop"), (extra, stream)


def test_chat_plain_and_streamed(server, reference, store):
    from transformers import AutoTokenizer
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, who are you?"}]
    hf = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    prompt_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    want, _, _, n_prompt = reference(list(prompt_ids), 10, ignore_eos=True)
    assert n_prompt == len(prompt_ids)

    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    r = server.client.chat.completions.create(**kw)
    c = r.choices[0]
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", want, "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 10)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")

    chunks = list(server.client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == n_prompt and chunks[-1].usage.completion_tokens == 10


def test_chat_continues_the_final_message(server, reference, store):
    """continue_final_message (add_generation_prompt false): the prompt ends inside the
    final assistant message, exactly as transformers' apply_chat_template renders it, and
    the reply continues it; asking for both is a 400 naming the field."""
    from transformers import AutoTokenizer
    messages = [{"role": "user", "content": "Count with me."},
                {"role": "assistant", "content": "One, two,"}]
    hf = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    prompt_ids = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                        continue_final_message=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    want, _, _, n_prompt = reference(list(prompt_ids), 6, ignore_eos=True)
    r = server.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "continue_final_message": True,
                    "add_generation_prompt": False})
    assert (r.choices[0].message.content, r.usage.prompt_tokens) == (want, n_prompt)
    r = server.http.post("/tokenize", json={"model": MODEL, "messages": messages,
                                            "continue_final_message": True,
                                            "add_generation_prompt": False,
                                            "add_special_tokens": False})
    text = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False,
                                  continue_final_message=True)
    assert text.endswith("One, two,")
    assert r.json()["tokens"] == hf(text, add_special_tokens=False)["input_ids"]
    bad = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "max_tokens": 2, "continue_final_message": True})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "continue_final_message"


def test_continuous_usage_stats_count_tokens_as_they_come(server):
    """stream_options.continuous_usage_stats (vLLM's, with include_usage): every chunk
    carries the usage so far; the last ones reach the final counts."""
    chunks = list(server.client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "stream_options": {"include_usage": True,
                                                           "continuous_usage_stats": True}}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts and all(c.usage is not None for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 5 and chunks[-1].usage.completion_tokens == 5
    plain = list(server.client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in plain if c.choices)


@pytest.mark.parametrize("n", [1, 2])
def test_continuous_usage_counts_only_the_tokens_sent_so_far(server, n):
    """Each chunk's usage.completion_tokens is the number of tokens the chunks so far
    carried (their `token_ids`), never tokens the engine has generated but the stream
    has not yet sent (the engine's output holds a live, still-growing list)."""
    for path, body in (
            ("/v1/completions", {"prompt": "Hello"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        with server.http.stream("POST", path, json={
                "model": MODEL, **body, "max_tokens": 24, "temperature": 0, "n": n,
                "stream": True, "ignore_eos": True, "return_token_ids": True,
                "stream_options": {"include_usage": True,
                                   "continuous_usage_stats": True}}) as r:
            events = sse_events(r.iter_lines())
        sent = 0
        for e in events[:-1]:
            sent += sum(len(c.get("token_ids") or []) for c in e["choices"])
            assert e["usage"]["completion_tokens"] == sent, (path, e)
        assert sent == 24 * n and events[-2]["usage"]["completion_tokens"] == sent


def test_chat_documents_reach_the_template_and_chat_echo_is_refused(server, store):
    """`documents` go to the chat template as transformers' apply_chat_template passes
    them (compared on a RAG template); chat `echo` is a 400 naming it, not ignored."""
    from transformers import AutoTokenizer

    from braze.serving.chat import ChatTemplate
    from braze.serving.protocol import ChatMessage
    rag = ("{% for d in documents %}[{{ d.title }}: {{ d.text }}]\n{% endfor %}"
           "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    docs = [{"title": "a", "text": "Paris is in France."}, {"title": "b", "text": "x"}]
    msgs = [{"role": "user", "content": "Where is Paris?"}]
    hf = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    want = hf.apply_chat_template(msgs, documents=docs, chat_template=rag, tokenize=False,
                                  add_generation_prompt=False)
    assert ChatTemplate(rag).render([ChatMessage(**m) for m in msgs], False,
                                    documents=docs) == want
    r = server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs,
                                                       "max_tokens": 2, "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_raw_sse_framing(server):
    with server.http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    parts = body.split("\n\n")
    assert parts[-1] == "" and parts[-2] == "data: [DONE]"
    assert all(p.startswith("data: {") for p in parts[:-2])
    events = sse_events(body.splitlines())
    assert events[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in events[0]


def test_models_version_health(server, artifact, ref_engine):
    import braze
    from pathlib import Path
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    # vLLM's card: `root` is what the model was loaded from (as LoRA cards' root is the
    # adapter's path), `parent` null for the base model
    (card,) = server.http.get("/v1/models").json()["data"]
    assert Path(card["root"]).resolve() == Path(artifact).resolve()
    assert card["parent"] is None and card["owned_by"] == "braze"
    assert card["max_model_len"] == ref_engine.max_model_len
    assert server.http.get("/version").json() == {"version": braze.__version__}
    assert server.http.get("/health").status_code == 200


def test_load_counts_the_requests_in_flight(artifact):
    """vLLM's GET /load, which load balancers poll: {"server_load": requests in flight}.
    In-process, the engine's steps held on an Event so that two requests stay in flight."""
    from fastapi.testclient import TestClient

    from braze.runtime.engine import Engine
    from braze.serving.app import Service, create_app
    from braze.serving.async_engine import AsyncEngine
    from braze.serving.metrics import Metrics
    engine = Engine(artifact, backend="reference", num_kv_blocks=64)
    go, step = threading.Event(), engine.step

    def held_step():
        go.wait(60)
        return step()
    engine.step = held_step
    metrics = Metrics(MODEL)
    svc = Service(AsyncEngine(engine, metrics=metrics), metrics, MODEL, engine.max_model_len,
                  engine.tokenizer, None)
    with TestClient(create_app(svc)) as client, ThreadPoolExecutor(2) as pool:
        assert client.get("/load").json() == {"server_load": 0}
        body = {"model": MODEL, "prompt": [1, 5, 6], "max_tokens": 3, "ignore_eos": True}
        replies = [pool.submit(client.post, "/v1/completions", json=body) for _ in range(2)]
        deadline = time.monotonic() + 30
        while client.get("/load").json()["server_load"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/load").json() == {"server_load": 2}
        go.set()
        assert [r.result(60).status_code for r in replies] == [200, 200]
        assert client.get("/load").json() == {"server_load": 0}


def test_32_concurrent_clients(server, reference):
    prompts = [f"Client {i % 4} says" for i in range(32)]      # 4 distinct, 8 clients each

    def one(i):
        kw = dict(model=MODEL, prompt=prompts[i], max_tokens=6, temperature=0,
                  extra_body={"ignore_eos": True})
        if i % 2:
            return "".join(c.choices[0].text for c in
                           server.client.completions.create(**kw, stream=True))
        return server.client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = [f.result(timeout=120) for f in [pool.submit(one, i) for i in range(32)]]
    want = {p: reference(p, 6, ignore_eos=True)[0] for p in set(prompts)}
    assert got == [want[p] for p in prompts]
    m = server.wait_metrics(lambda m: m["braze_requests_running"] == 0)
    assert m["braze_requests_running"] == 0 and m["braze_requests_waiting"] == 0


# ---- disconnects free the KV cache ----------------------------------------------------------

def test_streams_closed_early_free_the_kv_cache(server):
    before = server.metrics()
    for i in range(4):
        with server.http.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": f"Stream {i}", "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 2:
                    break                       # leaving the block closes the connection
    m = server.wait_metrics(lambda m: m["braze_kv_cache_usage"] == 0
                            and m["braze_requests_running"] == 0)
    assert m["braze_kv_cache_usage"] == 0 and m["braze_requests_running"] == 0
    aborted = 'braze_requests_total{finish_reason="abort"}'
    assert m[aborted] - before[aborted] == 4
    assert server.http.get("/health").status_code == 200
    # and it still serves
    r = server.client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_non_streamed_client_gone_aborts(server):
    aborted = 'braze_requests_total{finish_reason="abort"}'
    before = server.metrics()[aborted]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", timeout=0.15, json={
            "model": MODEL, "prompt": "Wait", "max_tokens": 240, "temperature": 0,
            "ignore_eos": True})
    m = server.wait_metrics(lambda m: m[aborted] > before and m["braze_kv_cache_usage"] == 0)
    assert m[aborted] == before + 1 and m["braze_kv_cache_usage"] == 0


def test_beam_search_client_gone_stops_the_search(server):
    """A beam search runs one engine request per beam per step; when its client goes away
    the search stops (its step's requests are aborted) rather than running every step to
    the end. Run whole, this one finishes beam width x max_tokens step requests."""
    total = ('braze_requests_total{finish_reason="stop"}',
             'braze_requests_total{finish_reason="length"}')
    aborted = 'braze_requests_total{finish_reason="abort"}'
    before = server.metrics()
    width, max_tokens = 4, 200
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", timeout=0.3, json={
            "model": MODEL, "prompt": "Search", "max_tokens": max_tokens, "n": width,
            "use_beam_search": True, "ignore_eos": True})
    m = server.wait_metrics(lambda m: m[aborted] > before[aborted]
                            and m["braze_requests_running"] == 0
                            and m["braze_requests_waiting"] == 0, timeout=60)
    assert m[aborted] > before[aborted], "the search was not aborted"
    done = sum(m[k] - before[k] for k in total)
    assert done < width * max_tokens
    # and the server goes on serving
    r = server.client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens <= 2
    assert server.metrics()[aborted] == m[aborted]


def test_metrics_text(server):
    """The exposition's families and kinds, and counts that agree with each other, after
    traffic of this test's own (it passes run alone, not only after the tests before it)."""
    from prometheus_client.parser import text_string_to_metric_families
    before = server.metrics()
    for prompt in ("metrics, one", "metrics, two"):
        r = server.http.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
    r = server.http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=")
    kinds = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for name, kind in [("braze_requests_running", "gauge"), ("braze_requests_waiting", "gauge"),
                       ("braze_kv_cache_usage", "gauge"), ("braze_prompt_tokens", "counter"),
                       ("braze_generation_tokens", "counter"),
                       ("braze_preemptions", "counter"),
                       ("braze_requests", "counter"),
                       ("braze_time_to_first_token_seconds", "histogram"),
                       ("braze_time_per_output_token_seconds", "histogram")]:
        assert kinds[name] == kind
    m = server.metrics()
    gen = "braze_generation_tokens_total"
    assert m[gen] - before.get(gen, 0) >= 12 and m["braze_prompt_tokens_total"] > 0
    n = m['braze_time_to_first_token_seconds_bucket{le="+Inf"}']
    assert n == m["braze_time_to_first_token_seconds_count"] > 0
    done = [f'braze_requests_total{{finish_reason="{r}"}}' for r in ("stop", "length")]
    assert n == sum(m[k] for k in done)           # every completed request had a first token


VLLM_KINDS = {           # vLLM's metric families (vllm/v1/metrics/loggers.py) and kinds
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter", "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram"}


def test_vllms_metric_names_count_a_known_workload(server):
    """A dashboard or alert written for vLLM reads braze's /metrics unchanged: vLLM's
    names, kinds and `model_name` label, with values that match the workload sent (token
    counts from the responses' usage, one finished request each)."""
    from prometheus_client.parser import text_string_to_metric_families
    label = f'{{model_name="{MODEL}"}}'
    before = server.metrics()
    usage = []
    for prompt, max_tokens in (([1, 40, 41, 42], 5), ([1, 50, 51, 52, 53, 54, 55], 7)):
        r = server.http.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"])
    m = server.wait_metrics(lambda m: m.get("vllm:num_requests_running" + label) == 0)
    kinds = {f.name: f.type for f in text_string_to_metric_families(server.http.get(
        "/metrics").text)}
    assert {k: kinds.get(k) for k in VLLM_KINDS} == VLLM_KINDS

    def grew(name):
        return m[name] - before.get(name, 0)
    assert grew(f"vllm:prompt_tokens_total{label}") == sum(u["prompt_tokens"] for u in usage)
    assert grew(f"vllm:generation_tokens_total{label}") == \
        sum(u["completion_tokens"] for u in usage) == 12
    ok = f'vllm:request_success_total{{finished_reason="length",model_name="{MODEL}"}}'
    assert grew(ok) == 2
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert grew(f"vllm:{hist}_count{label}") == 2
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert m[f"vllm:{gauge}{label}"] == 0
    # the same facts as braze's own families
    assert m[f"vllm:prompt_tokens_total{label}"] == m["braze_prompt_tokens_total"]
    assert m[ok] == m['braze_requests_total{finish_reason="length"}']


# ---- bad input ---------------------------------------------------------------------------

def _assert_error(r: httpx.Response, status: int, *words: str):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err
    assert r.headers.get("x-request-id")
    return err


def test_bad_requests_get_openai_errors(server):
    post = server.http.post
    _assert_error(post("/v1/completions", content=b"{not json",
                       headers={"content-type": "application/json"}), 400, "JSON")
    err = _assert_error(post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400,
                        "temperature")
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    _assert_error(post("/v1/completions", json={"prompt": "x", "n": 0}), 400, "n")
    _assert_error(post("/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "x"}], "n": 500}), 400, "n")
    _assert_error(post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}), 400,
                  "max_tokens")
    _assert_error(post("/v1/completions", json={"max_tokens": 3}), 400, "prompt")
    _assert_error(post("/v1/completions", json=[1, 2]), 400)
    # a JSON body sent with another content type (curl -d's default) is told what to send
    _assert_error(post("/v1/completions", content=json.dumps({"prompt": "x"}),
                       headers={"content-type": "application/x-www-form-urlencoded"}),
                  400, "Content-Type: application/json")
    _assert_error(post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    _assert_error(post("/v1/completions", json={"prompt": [1, 99999]}), 400, "99999")
    # a prompt longer than the model allows names both lengths
    _assert_error(post("/v1/completions", json={"prompt": [1] * 300}), 400, "300", "256")
    err = _assert_error(post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404,
                        "gpt-9")
    assert err["code"] == "model_not_found"
    _assert_error(server.http.get("/v1/nothing"), 404)
    # through the openai client too
    with pytest.raises(openai.BadRequestError, match="suffix"):
        server.client.completions.create(model=MODEL, prompt="x", suffix="y")
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=MODEL, prompt="x", temperature=-0.5, stream=True)
    assert server.http.get("/health").status_code == 200


def test_an_empty_model_name_is_the_served_model(server):
    """vLLM takes a missing or empty "model" as the served model (some clients send ""):
    the same answer as with the model's name, not a 404."""
    for path, body in (("/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
                       ("/tokenize", {"prompt": "Hello"})):
        body = {**body, "temperature": 0, "ignore_eos": True} if path != "/tokenize" else body
        named = server.http.post(path, json={**body, "model": MODEL})
        assert named.status_code == 200, named.text
        for model in ("", None):
            r = server.http.post(path, json={**body, "model": model})
            assert r.status_code == 200, (path, model, r.text)
            want, got = named.json(), r.json()
            for d in (want, got):
                d.pop("id", None), d.pop("created", None)
            assert got == want, (path, model)


def test_request_id_echoed_or_generated(server):
    r = server.http.get("/health", headers={"X-Request-Id": "my-id-42"})
    assert r.headers["x-request-id"] == "my-id-42"
    r = server.http.post("/v1/completions", json={"prompt": "x", "n": 0},
                         headers={"X-Request-Id": "bad-one"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "bad-one"
    with server.http.stream("POST", "/v1/completions", headers={"X-Request-Id": "streamed"},
                            json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:
        assert r.headers["x-request-id"] == "streamed"
        r.read()
    ids = {server.http.get(p).headers["x-request-id"] for p in ("/metrics", "/version", "/nope")}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    resp = server.client.completions.with_raw_response.create(
        model=MODEL, prompt="x", max_tokens=1, extra_headers={"X-Request-Id": "via-openai"})
    assert resp.headers["x-request-id"] == "via-openai"
    assert resp.parse().id == "cmpl-via-openai"          # vLLM's id: cmpl-<X-Request-Id>
    assert re.search(r"request via-openai \(cmpl-via-openai\): \d+ prompt tokens, 1 output "
                     r"tokens, finish \w+, ttft [\d.]+ s, total [\d.]+ s", _wait_log(server,
                                                                                   "via-openai"))


@pytest.mark.parametrize("path, body, prefix", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 2}, "cmpl-"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 2}, "cmpl-"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 2}, "chatcmpl-"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 2}, "resp_"),
])
def test_the_response_id_is_built_on_the_clients_x_request_id(server, path, body, prefix):
    """vLLM's response ids are `cmpl-<X-Request-Id>`, `chatcmpl-<X-Request-Id>` (its
    `_base_request_id`), so a gateway's trace id finds the response, and every streamed
    chunk carries it; braze's ignored the header. Two requests with the same header (a
    retry) are both served: the engine's own ids stay distinct. Without the header: the
    prefix and a fresh id."""
    def ids_of(stream: bool, rid: str | None) -> set:
        headers = {"X-Request-Id": rid} if rid else {}
        r = server.http.post(path, json={"model": MODEL, **body, "stream": stream},
                             headers=headers)
        assert r.status_code == 200, r.text
        if not stream:
            return {r.json()["id"]}
        events = [e for e in sse_events(r.text.splitlines()) if e != "[DONE]"]
        assert events
        return {e["response"]["id"] if "response" in e else e["id"] for e in events
                if "response" in e or "id" in e}
    for stream in (False, True):
        assert ids_of(stream, "trace-7") == {prefix + "trace-7"}, stream
    with ThreadPoolExecutor(2) as pool:
        same = list(pool.map(lambda _: ids_of(False, "retry-1"), range(2)))
    assert same == [{prefix + "retry-1"}] * 2
    (fresh,) = ids_of(False, None)
    assert re.fullmatch(re.escape(prefix) + r"[0-9a-f]{32}", fresh), fresh


def _wait_log(server, needle, timeout=10.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in server.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.stderr()


# ---- overload and shutdown: a second server, one sequence at a time --------------------------

def test_full_queue_gets_503_then_sigterm_drains(artifact, tmp_path):
    # a drain limit far above the 240 tokens' time even on a loaded machine: this test is
    # about draining; the limit itself is test_drain_timeout_aborts_what_is_left's
    s = Server(artifact, tmp_path, "--max-num-seqs", "1", "--max-queue", "1",
               "--drain-timeout", "600")
    try:
        first_chunk = threading.Event()
        result = {}

        def stream_long():
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                    "model": MODEL, "prompt": "Long", "max_tokens": 240, "temperature": 0,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    first_chunk.set()
                result["events"] = sse_events(lines)

        t1 = threading.Thread(target=stream_long, daemon=True)
        t1.start()
        assert first_chunk.wait(30)                       # the long one is running
        # six more at once: the running batch (1) is full, one waits, the rest get 503
        barrier = threading.Barrier(6, timeout=30)

        def slam(i):
            barrier.wait()
            if i % 2:
                try:
                    r = s.client.completions.create(model=MODEL, prompt="Next", max_tokens=2,
                                                    temperature=0)
                    return 200, r.usage.completion_tokens
                except openai.APIStatusError as e:   # InternalServerError for a 503
                    return e.status_code, e.body
            r = httpx.post(s.url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "Next", "max_tokens": 2, "temperature": 0})
            return r.status_code, (r.json()["usage"]["completion_tokens"] if r.status_code == 200
                                   else _assert_error(r, 503, "--max-queue"))

        pool = ThreadPoolExecutor(6)
        futures = [pool.submit(slam, i) for i in range(6)]
        deadline = time.monotonic() + 30
        # five answered: the sixth is then the one waiting in the queue, already received;
        # with four, the sixth may still be on its way and would meet the drain's 503
        while sum(f.done() for f in futures) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = [f.result()[1] for f in futures if f.done() and f.result()[0] == 503]
        assert len(refused) >= 4 and all(e["code"] == "queue_full" for e in refused), refused
        assert s.metrics()["braze_requests_rejected_total"] >= len(refused)

        # SIGTERM: stop accepting, let the in-flight requests finish, exit 0
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        health = None
        while time.monotonic() < deadline and t1.is_alive():
            try:
                health = httpx.get(s.url + "/health", timeout=5)
            except httpx.TransportError:
                break
            if health.status_code == 503:
                break
            time.sleep(0.02)
        if t1.is_alive():     # still draining: new work is refused
            assert health is not None and health.status_code == 503
            _assert_error(httpx.post(s.url + "/v1/completions", timeout=30,
                                     json={"model": MODEL, "prompt": "Late"}), 503, "shutting down")
        t1.join(600)
        results = [f.result(timeout=60) for f in futures]
        pool.shutdown()
        assert s.proc.wait(timeout=60) == 0
        events = result["events"]
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 240
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        served = [n for code, n in results if code == 200]
        refused = [e for code, e in results if code == 503]
        assert 1 <= len(served) <= 2 and served == [2] * len(served), results
        assert len(served) + len(refused) == 6 and all(e["code"] == "queue_full" for e in refused)
        assert "draining" in s.stderr() and "Traceback" not in s.stderr()
    finally:
        s.stop()


def test_drain_timeout_aborts_what_is_left(artifact, tmp_path):
    s = Server(artifact, tmp_path, "--drain-timeout", "0")
    try:
        lines = []
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "Long", "max_tokens": 240, "temperature": 0,
                "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 1:
                    s.proc.send_signal(signal.SIGTERM)
        events = sse_events(lines)
        assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
        assert s.proc.wait(timeout=40) == 0
    finally:
        s.stop()


def test_serve_errors_are_one_line(artifact, tmp_path, server):
    port = server.url.rsplit(":", 1)[1]
    runs = [subprocess.Popen([sys.executable, "-m", "braze", "serve", str(a), "--port", p,
                              "--backend", "reference"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for a, p in ((artifact, port), (tmp_path / "missing", "0"))]
    (_, busy), (_, missing) = [r.communicate(timeout=60) for r in runs]
    assert [r.returncode for r in runs] == [1, 1]
    assert "already in use" in busy and port in busy
    for err in (busy, missing):
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("braze: error:"), err


# ---- pieces without a server ----------------------------------------------------------------

def test_chat_template_matches_transformers_and_is_sandboxed(store):
    from transformers import AutoTokenizer

    from braze.runtime.chat_template import template_source
    from braze.serving.chat import ChatTemplate
    from braze.serving.protocol import APIError, ChatMessage
    d = store.checkpoint("llama")
    config = json.loads((d / "tokenizer_config.json").read_text())
    t = ChatTemplate(template_source(d, config), config)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]
    hf = AutoTokenizer.from_pretrained(d)
    for gen in (True, False):
        assert t.render([ChatMessage(**m) for m in msgs], gen) == \
            hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    for last in ("Well,", "  Well, ", ""):      # continue_final_message, as transformers cuts
        open_ = msgs[:3] + [{"role": "assistant", "content": last}]
        assert t.render([ChatMessage(**m) for m in open_], False, continue_final=True) == \
            hf.apply_chat_template(open_, add_generation_prompt=False, tokenize=False,
                                   continue_final_message=True)
    parts = ChatMessage(role="user", content=[{"type": "text", "text": "a"},
                                              {"type": "text", "text": "b"}])
    # text parts are one text, a newline between parts (as vLLM joins them)
    assert t.render([parts]) == t.render([ChatMessage(role="user", content="a\nb")]) == \
        hf.apply_chat_template([{"role": "user", "content": "a\nb"}], tokenize=False,
                               add_generation_prompt=True)
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(APIError) as e:
        evil.render([ChatMessage(role="user", content="x")])
    assert e.value.status == 400
    raising = ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(APIError, match="only user turns"):
        raising.render([ChatMessage(role="user", content="x")])
    assert template_source(None, {}) is None
    assert template_source(None, {"chat_template": [{"name": "tool", "template": "t"},
                                                  {"name": "default", "template": "d"}]}) == "d"


def test_metrics_render_the_snapshot_and_the_observations():
    from braze.serving.metrics import Metrics

    from serve_helpers import parse_metrics
    m = Metrics("m")
    m.on_finished("length", {"ttft": 0.02, "tpot": 0.01, "queue_time": 0.0}, 0.5)
    m.on_finished("abort", {}, 0.1)
    m.on_finished("length", {"ttft": 3.0, "tpot": float("nan")}, 4.0)
    m.on_finished("weird", {}, None)
    got = parse_metrics(m.render({"running": 1, "waiting": 2, "kv_blocks_used": 3,
                                  "kv_blocks_total": 12, "kernels_cubin": 40,
                                  "kernels_jit": 2}))
    assert got["braze_kv_cache_usage"] == 0.25 and got["braze_requests_waiting"] == 2
    assert got['braze_kernels{source="cubin"}'] == 40 and got['braze_kernels{source="jit"}'] == 2
    assert got['braze_requests_total{finish_reason="abort"}'] == 1
    assert got['braze_requests_total{finish_reason="length"}'] == 2
    assert got['braze_requests_total{finish_reason="error"}'] == 1      # unknown reasons
    assert got['braze_requests_total{finish_reason="stop"}'] == 0
    ttft = "braze_time_to_first_token_seconds"
    assert got[ttft + "_count"] == 2 and got[ttft + "_sum"] == pytest.approx(3.02)
    assert got[ttft + '_bucket{le="0.02"}'] == 1 and got[ttft + '_bucket{le="2.5"}'] == 1
    assert got[ttft + '_bucket{le="+Inf"}'] == 2
    assert got["braze_time_per_output_token_seconds_count"] == 1       # NaN is skipped
    assert got["braze_e2e_request_latency_seconds_count"] == 3
    assert parse_metrics(Metrics("m").render({}))["braze_kv_cache_usage"] == 0


def test_protocol_checks():
    from braze.serving.protocol import (
        APIError,
        CompletionRequest,
        completion_prompt,
        completion_prompts,
        sampling_kwargs,
        validation_message,
    )
    assert completion_prompt(CompletionRequest(prompt=["hi"])) == "hi"
    assert completion_prompt(CompletionRequest(prompt=[[1, 2]])) == [1, 2]
    assert completion_prompt(CompletionRequest(prompt=[5, 6])) == [5, 6]
    assert completion_prompts(CompletionRequest(prompt=["a", "b"])) == ["a", "b"]
    assert completion_prompts(CompletionRequest(prompt=[[1], [2, 3]])) == [[1], [2, 3]]
    for bad, word in ((dict(prompt=""), "empty"), (dict(prompt=["a", ""]), "empty"),
                      (dict(prompt="a", suffix="b"), "suffix"),
                      (dict(prompt="a", n=2, best_of=1), "best_of"),
                      (dict(prompt="a", stop=[""]), "stop")):
        with pytest.raises(APIError, match=word):
            completion_prompts(CompletionRequest(**bad))
    req = CompletionRequest(prompt="a", top_k=-1, stop="x", ignore_eos=True, unknown_field=1)
    kw = sampling_kwargs(req, 7)
    assert kw["top_k"] == 0 and kw["stop"] == ["x"] and kw["ignore_eos"] and kw["max_tokens"] == 7
    assert kw["temperature"] == 1.0           # the OpenAI default
    msg, param = validation_message([{"type": "greater_than_equal", "loc": ("body", "top_k"),
                                      "msg": "Input should be greater than or equal to -1"}])
    assert param == "top_k" and msg.startswith("top_k: ")


def test_stream_options_without_stream_are_refused():
    """stream_options (include_usage, continuous_usage_stats) only shape a stream: on a
    whole response they were ignored without a word. OpenAI and vLLM answer 400 ("Stream
    options can only be defined when `stream=True`"); null is the default and is fine."""
    from braze.serving.protocol import (
        APIError,
        ChatCompletionRequest,
        CompletionRequest,
        chat_max_tokens,
        completion_prompts,
    )
    chat = [{"role": "user", "content": "hi"}]
    so = {"include_usage": True}
    with pytest.raises(APIError, match="stream_options .*stream: true") as e:
        completion_prompts(CompletionRequest(prompt="a", stream_options=so))
    assert e.value.param == "stream_options"
    with pytest.raises(APIError, match="stream_options .*stream: true"):
        chat_max_tokens(ChatCompletionRequest(messages=chat, stream=False, stream_options=so))
    assert completion_prompts(CompletionRequest(prompt="a", stream=True, stream_options=so))
    assert completion_prompts(CompletionRequest(prompt="a", stream_options=None))
    chat_max_tokens(ChatCompletionRequest(messages=chat, stream=True, stream_options=so))


def test_length_penalty_without_beam_search_is_refused():
    """length_penalty weighs beam search's score only: on a sampled request it was read by
    nothing, so a client that sent 0.5 got an unweighted answer without a word. 1.0 (the
    neutral value clients fill in) still passes; with use_beam_search it applies."""
    from braze.serving.protocol import (
        APIError,
        ChatCompletionRequest,
        CompletionRequest,
        chat_max_tokens,
        completion_prompts,
    )
    chat = [{"role": "user", "content": "x"}]
    for check, req in ((completion_prompts, CompletionRequest(prompt="a", length_penalty=0.5)),
                       (chat_max_tokens, ChatCompletionRequest(messages=chat,
                                                               length_penalty=2.0))):
        with pytest.raises(APIError) as e:
            check(req)
        assert e.value.param == "length_penalty" and "use_beam_search" in e.value.message
    completion_prompts(CompletionRequest(prompt="a", length_penalty=1.0))
    completion_prompts(CompletionRequest(prompt="a", length_penalty=0.5, use_beam_search=True))
    chat_max_tokens(ChatCompletionRequest(messages=chat, length_penalty=2.0,
                                          use_beam_search=True))


def test_validation_messages_name_fields_that_start_like_a_union_branch():
    """`stream`, `stream_options` and `structured_outputs` start with "str", the name
    pydantic gives a union's string branch: the message still names them."""
    from pydantic import ValidationError

    from braze.serving.protocol import ChatCompletionRequest, CompletionRequest, validation_message
    cases = [(CompletionRequest, {"prompt": "a", "stream": "maybe"}, "stream"),
             (CompletionRequest, {"prompt": "a", "stream_options": {"include_usage": "maybe"}},
              "stream_options.include_usage"),
             (ChatCompletionRequest, {"messages": [{"role": "user", "content": "a"}],
                                      "stream": [1]}, "stream"),
             (CompletionRequest, {"prompt": 5}, "prompt")]
    for model, body, where in cases:
        with pytest.raises(ValidationError) as e:
            model.model_validate(body)
        msg, param = validation_message(e.value.errors())
        assert param == where.split(".")[0] and msg.startswith(where + ": "), msg


def test_openai_nullable_fields_accept_null_as_their_default():
    """The OpenAI spec lets stream, echo and n be null (clients generated from it send
    null for what is unset); null reads as the default, as vLLM reads stream and echo."""
    from braze.serving.protocol import ChatCompletionRequest, CompletionRequest
    plain = CompletionRequest.model_validate({"prompt": "a"})
    req = CompletionRequest.model_validate({"prompt": "a", "stream": None, "echo": None,
                                            "n": None})
    assert (req.stream, req.echo, req.n) == (plain.stream, plain.echo, plain.n) == (False, False, 1)
    msgs = [{"role": "user", "content": "a"}]
    req = ChatCompletionRequest.model_validate({"messages": msgs, "stream": None, "n": None})
    assert (req.stream, req.n) == (False, 1)


def test_sse_framing():
    from braze.serving import responses as R
    chunk = R.chat_chunk("id1", 5, "m", {"role": "assistant", "content": ""})
    b = R.sse(chunk)
    assert b.startswith(b"data: {") and b.endswith(b"}\n\n") and b"\n" not in b[:-2]
    assert json.loads(b[6:]) == chunk and R.SSE_DONE == b"data: [DONE]\n\n"
    u = R.usage_chunk("id1", 5, "m", "text_completion", R.usage(3, 4))
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 7


def test_invocations_is_the_chat_or_completion_route_its_body_names(server):
    """SageMaker's /invocations (vLLM's): a body with messages is a chat completion, one
    with prompt a completion, answered as those routes answer the same body."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True}
    comp = {"model": MODEL, "prompt": "Once upon", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}
    for body, route, text in ((chat, "/v1/chat/completions", lambda c: c["message"]["content"]),
                              (comp, "/v1/completions", lambda c: c["text"])):
        want = server.http.post(route, json=body).json()
        got = server.http.post("/invocations", json=body)
        assert got.status_code == 200, got.text
        got = got.json()
        assert got["object"] == want["object"] and got["usage"] == want["usage"]
        assert text(got["choices"][0]) == text(want["choices"][0])
    streamed = server.http.post("/invocations", json={**comp, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")
    for bad, param in (({"input": "x"}, None), ({**chat, "max_tokens": 0}, "max_tokens")):
        r = server.http.post("/invocations", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = server.http.post("/invocations", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
