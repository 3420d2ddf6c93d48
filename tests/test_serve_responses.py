"""OpenAI's Responses API (`POST /v1/responses`), text in and text out, talked to with the
`openai` package (whose models parse every object and event): input as a string or as
messages, `instructions`, `max_output_tokens`, the streamed event sequence, usage, and the
fields braze does not implement refused by name. The text is checked against the chat
completion of the same conversation (greedy), which test_serve.py checks against
transformers' chat template and the engine run in-process."""

from __future__ import annotations

import json

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
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}}, "text"),
    ({"input": "x", "text": {"verbosity": "high"}}, "text"),
    ({"input": "x", "text": {"format": {"type": "json_object"}},
      "response_format": {"type": "json_object"}}, "text"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 10_000}, "max_output_tokens"),
    ({"input": "x", "model": "nope"}, "model"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "input"),
    ({"input": "Hi " * 300}, "input"),
    # chat completions' spellings, which this route would otherwise drop without a word
    ({"input": "x", "max_tokens": 3}, "max_tokens"),
    ({"input": "x", "max_completion_tokens": 3}, "max_completion_tokens"),
    ({"input": "x", "messages": [{"role": "user", "content": "y"}]}, "messages"),
    ({"input": "x", "logprobs": True}, "logprobs"),
    ({"input": "x", "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"input": "x", "return_token_ids": True}, "return_token_ids"),
])
def test_what_braze_does_not_do_is_refused_by_name(server, body, param):
    r = server.http.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.text
    if param in ("max_tokens", "max_completion_tokens"):
        assert "max_output_tokens" in r.json()["error"]["message"]


def test_input_that_is_not_messages_names_the_item(server):
    """A list of strings (or numbers) is not a list of messages: the 400 names the item and
    what it is, not a pydantic union error saying a string was expected."""
    for items, kind in ((["hi"], "str"), ([{"role": "user", "content": "x"}, 3], "int")):
        r = server.http.post("/v1/responses", json={"model": MODEL, "input": items})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        i = len(items) - 1
        assert err["param"] == "input" and f"input[{i}]" in err["message"], err
        assert repr(kind) in err["message"] and "messages" in err["message"], err


def test_usage_counts_the_input_tokens_read_from_the_prefix_cache(server):
    """usage.input_tokens_details.cached_tokens is what the prefix cache served (vLLM's),
    the same count the server's prefix-cache metric adds, not always 0."""
    text = "Tell me everything about prefix caches, please. " * 2
    server.client.responses.create(model=MODEL, input=text, max_output_tokens=1)
    hits = "braze_prefix_cache_hit_tokens_total"
    before = server.metrics()[hits]
    r = server.client.responses.create(model=MODEL, input=text, max_output_tokens=1)
    cached = server.metrics()[hits] - before
    assert cached > 0
    assert r.usage.input_tokens_details.cached_tokens == cached
    events = list(server.client.responses.create(model=MODEL, input=text, stream=True,
                                                 max_output_tokens=1))
    assert events[-1].response.usage.input_tokens_details.cached_tokens == cached


def test_text_format_json_schema_constrains_as_chat_response_format(server):
    """text.format (json_schema, json_object) is the chat's response_format: the same
    constrained text, streamed too, echoed in the response's `text`."""
    import json
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]},
                                               "days": {"type": "integer", "minimum": 1,
                                                        "maximum": 7}},
              "required": ["unit", "days"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "w", "schema": schema, "strict": True}
    msgs = [{"role": "user", "content": "Weather?"}]
    want = server.client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema,
                                                                "strict": True}})
    want = want.choices[0].message.content
    assert set(json.loads(want)) == {"unit", "days"}
    r = server.client.responses.create(model=MODEL, input="Weather?", max_output_tokens=40,
                                       temperature=0, text={"format": fmt})
    assert r.output_text == want and r.status == "completed"
    assert r.text.format.type == "json_schema" and r.text.format.name == "w"
    events = list(server.client.responses.create(model=MODEL, input="Weather?", stream=True,
                                                 max_output_tokens=40, temperature=0,
                                                 text={"format": fmt}))
    assert events[-1].response.output_text == want
    want = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20,
                                                 temperature=0,
                                                 response_format={"type": "json_object"})
    r = server.client.responses.create(model=MODEL, input="Weather?", max_output_tokens=20,
                                       temperature=0, text={"format": {"type": "json_object"}})
    assert r.output_text == want.choices[0].message.content and r.output_text.startswith("{")
    # a schema that does not compile is the client's error, named by the field it came in
    bad = server.http.post("/v1/responses", json={
        "model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "b",
                                                          "schema": {"type": 5}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text", bad.text


def test_a_client_gone_before_the_response_aborts_its_request(server):
    """A non-streamed response whose client goes away stops generating (its KV freed),
    as a chat completion does, rather than running to the end of the context for no one.
    The client sends its request and closes the connection at once, so the server learns
    it is gone before the reply could be ready."""
    import json
    import socket
    from urllib.parse import urlsplit
    aborted = 'braze_requests_total{finish_reason="abort"}'
    before = server.metrics()[aborted]
    url = urlsplit(server.url)
    body = json.dumps({"model": MODEL, "input": "Wait", "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: " + url.netloc.encode()
                     + b"\r\nAuthorization: Bearer x\r\nContent-Type: application/json\r\n"
                     + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    m = server.wait_metrics(lambda m: m[aborted] > before and m["braze_kv_cache_usage"] == 0
                            and m["braze_requests_running"] == 0)
    assert m[aborted] == before + 1 and m["braze_kv_cache_usage"] == 0


def test_without_the_store_nothing_is_kept_and_each_route_says_how_to_keep_it(server):
    """vLLM's default: `store: true` (OpenAI's default) keeps nothing and says so in the
    object; what needs a stored response names --enable-responses-store."""
    r = server.client.responses.create(model=MODEL, input="Hi", max_output_tokens=2,
                                       temperature=0)
    assert r.store is False
    for route in (server.http.get(f"/v1/responses/{r.id}"),
                  server.http.delete(f"/v1/responses/{r.id}"),
                  server.http.post(f"/v1/responses/{r.id}/cancel")):
        assert route.status_code == 404, route.text
        assert "--enable-responses-store" in route.json()["error"]["message"]
    for body, param in (({"background": True}, "background"),
                        ({"previous_response_id": r.id}, "previous_response_id")):
        got = server.http.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
        assert got.status_code == 400 and got.json()["error"]["param"] == param, got.text
        assert "--enable-responses-store" in got.json()["error"]["message"]


def test_logprobs_are_the_chats_whole_and_streamed(server):
    """include message.output_text.logprobs (with top_logprobs): the message's tokens with
    their alternatives, as chat's logprobs of the same greedy reply; streamed, the text
    deltas' logprobs add up to the same."""
    chat = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 3}).json()
    want = chat["choices"][0]["logprobs"]["content"]
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 5, "temperature": 0,
            "ignore_eos": True, "top_logprobs": 3, "include": ["message.output_text.logprobs"]}
    r = server.http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["logprobs"] == want and len(want) == 5
    assert all(len(e["top_logprobs"]) == 3 for e in want)
    events = []
    with server.http.stream("POST", "/v1/responses", json={**body, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    streamed = [e for ev in events if ev["type"] == "response.output_text.delta"
                for e in ev["logprobs"]]
    done = next(ev for ev in events if ev["type"] == "response.output_text.done")
    assert streamed == done["logprobs"] == want
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == want
    plain = server.http.post("/v1/responses", json={**body, "include": None,
                                                    "top_logprobs": None}).json()
    assert plain["output"][0]["content"][0]["logprobs"] == []


def test_truncation_auto_drops_the_oldest_turns_until_the_prompt_fits(server):
    """OpenAI's truncation "auto": a conversation longer than the context loses its oldest
    turns (the instructions kept) until the prompt and max_output_tokens fit; the reply is
    the chat completion of the turns kept, which /tokenize finds independently."""
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"Tell me more about item number {i}, please."},
                  {"role": "assistant", "content": f"Item {i} is a fine item indeed."}]
    turns.append({"role": "user", "content": "Which was best?"})
    system = [{"role": "system", "content": "Be brief."}]
    limit = server.http.get("/v1/models").json()["data"][0]["max_model_len"]
    out = 6

    def n_tokens(messages):
        r = server.http.post("/tokenize", json={"model": MODEL, "messages": messages,
                                                "add_generation_prompt": True})
        assert r.status_code == 200, r.text
        return r.json()["count"]
    assert n_tokens(system + turns) + out > limit          # it does not fit whole
    k = next(k for k in range(0, len(turns), 2) if n_tokens(system + turns[k:]) + out <= limit)
    assert k > 0
    body = {"model": MODEL, "input": turns, "instructions": "Be brief.",
            "max_output_tokens": out, "temperature": 0, "ignore_eos": True}
    refused = server.http.post("/v1/responses", json=body)
    assert refused.status_code == 400, refused.text
    r = server.http.post("/v1/responses", json={**body, "truncation": "auto"})
    assert r.status_code == 200, r.text
    got = r.json()
    want, n_prompt = _chat(server, system + turns[k:], out)
    assert (got["usage"]["input_tokens"], got["output"][0]["content"][0]["text"]) == \
        (n_prompt, want)
    assert got["truncation"] == "auto"
    # one turn that does not fit alone is still refused
    alone = server.http.post("/v1/responses", json={**body, "truncation": "auto",
                                                    "input": "Hi " * 300})
    assert alone.status_code == 400, alone.text
