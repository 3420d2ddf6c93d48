"""OpenAI's Responses API (`POST /v1/responses`), text in and text out, talked to with the
`openai` package (whose models parse every object and event): input as a string or as
messages, `instructions`, `max_output_tokens`, the streamed event sequence, usage, and the
fields braze does not implement refused by name. The text is checked against the chat
completion of the same conversation (greedy), which test_serve.py checks against
transformers' chat template and the engine run in-process."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from serve_helpers import MODEL, Server  # noqa: E402


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    s = Server(store.artifact("llama"), tmp_path_factory.mktemp("responses"))
    try:
        yield s
    finally:
        s.stop()


def _chat(server, messages, max_tokens):
    r = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                              max_tokens=max_tokens,
                                              extra_body={"ignore_eos": True})
    return r.choices[0].message.content, r.usage.prompt_tokens


def test_a_string_input_answers_as_the_chat_of_one_user_message(server):
    want, n_prompt = _chat(server, [{"role": "user", "content": "Hi there"}], 6)
    r = server.client.responses.create(model=MODEL, input="Hi there", max_output_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == want
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (msg,) = r.output
    assert (msg.type, msg.role, msg.status) == ("message", "assistant", "incomplete")
    assert [c.type for c in msg.content] == ["output_text"]
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == \
        (n_prompt, 6, n_prompt + 6)
    assert r.max_output_tokens == 6 and r.model == MODEL


def test_messages_and_instructions_are_the_chat_with_a_system_message(server):
    history = [{"role": "user", "content": [{"type": "input_text", "text": "Count:"}]},
               {"role": "assistant", "content": [{"type": "output_text", "text": "one"}]},
               {"type": "message", "role": "user", "content": "go on"}]
    want, n_prompt = _chat(server, [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Count:"},
                                    {"role": "assistant", "content": "one"},
                                    {"role": "user", "content": "go on"}], 5)
    r = server.client.responses.create(model=MODEL, input=history, instructions="Be brief.",
                                       max_output_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert (r.output_text, r.usage.input_tokens) == (want, n_prompt)
    assert r.instructions == "Be brief."


def test_the_stream_is_openais_event_sequence(server):
    want, n_prompt = _chat(server, [{"role": "user", "content": "Hello"}], 8)
    events = list(server.client.responses.create(model=MODEL, input="Hello", stream=True,
                                                 max_output_tokens=8, temperature=0,
                                                 extra_body={"ignore_eos": True}))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == want == events[-4].text
    final = events[-1].response
    assert final.output_text == want and final.usage.input_tokens == n_prompt
    assert events[0].response.status == "in_progress" and final.status == "incomplete"
    assert len({e.item_id for e in events if hasattr(e, "item_id")}) == 1


def test_a_reply_that_ends_by_itself_is_completed(server):
    r = server.client.responses.create(model=MODEL, input="Hi", max_output_tokens=30,
                                       temperature=0, extra_body={"stop": [" "]})
    assert r.status == "completed" and r.incomplete_details is None
    assert " " not in r.output_text


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input"),
    ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10_000}, "max_output_tokens"),
    ({"input": "x", "model": "nope"}, "model"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input"),
    ({"input": "Hi " * 300}, "input"),
])
def test_what_braze_does_not_do_is_refused_by_name(server, body, param):
    r = server.http.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.text


def test_a_client_gone_from_a_non_streamed_response_aborts_it(server):
    """As for chat and completions: the client of a non-streamed /v1/responses request
    goes away while it generates, and the engine request is aborted (its KV blocks freed),
    not run to max_output_tokens for nobody."""
    import json
    import socket
    aborted = 'braze_requests_total{finish_reason="abort"}'
    gen, prompt = "braze_generation_tokens_total", "braze_prompt_tokens_total"
    before = server.metrics()
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "input": "Wait", "max_output_tokens": 220,
                       "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        # the engine took it (220 tokens take it a while yet): leave
        server.wait_metrics(lambda m: m[prompt] > before[prompt])
    m = server.wait_metrics(lambda m: m[aborted] > before[aborted]
                            and m["braze_requests_running"] == 0, timeout=30)
    assert m[aborted] == before[aborted] + 1
    assert m["braze_kv_cache_usage"] == 0 and m[gen] - before[gen] < 220
    length = 'braze_requests_total{finish_reason="length"}'
    assert m[length] == before[length]
