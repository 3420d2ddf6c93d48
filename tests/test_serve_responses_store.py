"""Stored responses (`braze serve --enable-responses-store`, serving/responses_store.py):
previous_response_id continues a conversation exactly as sending it whole does (checked
against the chat completion of that conversation, which test_serve.py checks against
transformers), background responses run while the client polls and can be cancelled, GET /
DELETE / input_items answer as OpenAI's do, the store forgets the oldest beyond its size,
and without the flag every one of these says how to turn it on."""

from __future__ import annotations

import time

import pytest

openai = pytest.importorskip("openai")

from serve_helpers import MODEL, Server  # noqa: E402

SIZE = 4


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    s = Server(store.artifact("llama"), tmp_path_factory.mktemp("responses-store"),
               "--enable-responses-store", "--responses-store-size", str(SIZE))
    try:
        yield s
    finally:
        s.stop()


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def _chat(server, messages, max_tokens):
    r = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                              max_tokens=max_tokens,
                                              extra_body={"ignore_eos": True})
    return r.choices[0].message.content, r.usage.prompt_tokens


def _poll(server, rid, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        r = server.http.get(f"/v1/responses/{rid}")
        assert r.status_code == 200, r.text
        if r.json()["status"] not in ("queued", "in_progress") or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.05)


def test_previous_response_id_goes_on_with_the_conversation(server):
    first = server.client.responses.create(model=MODEL, input="Hi there",
                                           instructions="Be brief.", max_output_tokens=4,
                                           **GREEDY)
    assert first.store is True
    second = server.client.responses.create(model=MODEL, input="Go on",
                                            previous_response_id=first.id,
                                            max_output_tokens=5, **GREEDY)
    # the same conversation sent whole; OpenAI does not carry `instructions` over
    want, n_prompt = _chat(server, [{"role": "user", "content": "Hi there"},
                                    {"role": "assistant", "content": first.output_text},
                                    {"role": "user", "content": "Go on"}], 5)
    assert (second.output_text, second.usage.input_tokens) == (want, n_prompt)
    assert second.previous_response_id == first.id
    third = server.client.responses.create(model=MODEL, input="And?",
                                           previous_response_id=second.id,
                                           max_output_tokens=3, **GREEDY)
    want, _ = _chat(server, [{"role": "user", "content": "Hi there"},
                             {"role": "assistant", "content": first.output_text},
                             {"role": "user", "content": "Go on"},
                             {"role": "assistant", "content": second.output_text},
                             {"role": "user", "content": "And?"}], 3)
    assert third.output_text == want


def test_get_returns_the_stored_object_and_delete_forgets_it(server):
    r = server.http.post("/v1/responses", json={"model": MODEL, "input": "Hello",
                                                "max_output_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    made = r.json()
    got = server.http.get(f"/v1/responses/{made['id']}")
    assert got.status_code == 200 and got.json() == made
    gone = server.http.delete(f"/v1/responses/{made['id']}")
    assert gone.json() == {"id": made["id"], "object": "response.deleted", "deleted": True}
    for r in (server.http.get(f"/v1/responses/{made['id']}"),
              server.http.delete(f"/v1/responses/{made['id']}")):
        assert r.status_code == 404 and made["id"] in r.json()["error"]["message"]
    r = server.http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                "previous_response_id": made["id"]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


def test_store_false_keeps_nothing(server):
    r = server.client.responses.create(model=MODEL, input="Hello", max_output_tokens=2,
                                       store=False, **GREEDY)
    assert r.store is False
    assert server.http.get(f"/v1/responses/{r.id}").status_code == 404


def test_a_streamed_response_is_stored_as_its_last_event_says(server):
    events = list(server.client.responses.create(model=MODEL, input="Hello", stream=True,
                                                 max_output_tokens=4, **GREEDY))
    final = events[-1].response
    got = server.http.get(f"/v1/responses/{final.id}").json()
    assert (got["id"], got["status"], got["usage"]["output_tokens"]) == \
        (final.id, final.status, final.usage.output_tokens)
    assert got["output"][0]["content"][0]["text"] == final.output_text and got["store"]


def test_input_items_list_the_request_input_newest_first_in_pages(server):
    items = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
             {"role": "user", "content": "three"}]
    r = server.client.responses.create(model=MODEL, input=items, max_output_tokens=2,
                                       **GREEDY)
    page = server.http.get(f"/v1/responses/{r.id}/input_items").json()
    assert page["object"] == "list" and not page["has_more"]
    assert [i["content"] for i in page["data"]] == ["three", "two", "one"]
    assert all(i["id"].startswith("msg_") for i in page["data"])
    first = server.http.get(f"/v1/responses/{r.id}/input_items",
                            params={"order": "asc", "limit": 2}).json()
    assert [i["content"] for i in first["data"]] == ["one", "two"] and first["has_more"]
    rest = server.http.get(f"/v1/responses/{r.id}/input_items",
                           params={"order": "asc", "after": first["last_id"]}).json()
    assert [i["content"] for i in rest["data"]] == ["three"] and not rest["has_more"]
    bad = server.http.get(f"/v1/responses/{r.id}/input_items", params={"limit": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


def test_a_background_response_runs_while_the_client_polls(server):
    want = server.client.responses.create(model=MODEL, input="Tell me", max_output_tokens=12,
                                          store=False, **GREEDY)
    r = server.client.responses.create(model=MODEL, input="Tell me", max_output_tokens=12,
                                       background=True, **GREEDY)
    assert r.background is True and r.status in ("queued", "in_progress") and r.output == []
    done = _poll(server, r.id)
    assert done["status"] == want.status
    assert done["output"][0]["content"][0]["text"] == want.output_text
    assert done["usage"]["output_tokens"] == 12
    # a finished one cannot be cancelled any more: it stays as it ended
    c = server.http.post(f"/v1/responses/{r.id}/cancel")
    assert c.status_code == 200 and c.json()["status"] == want.status


def test_cancel_stops_a_background_response_and_frees_the_engine(server):
    n = server.http.get("/v1/models").json()["data"][0]["max_model_len"] - 20
    r = server.client.responses.create(model=MODEL, input="Count", max_output_tokens=n,
                                       background=True, **GREEDY)
    c = server.http.post(f"/v1/responses/{r.id}/cancel")
    assert c.status_code == 200, c.text
    assert c.json()["status"] == "cancelled"
    assert _poll(server, r.id)["status"] == "cancelled"
    m = server.wait_metrics(lambda m: m.get(f'vllm:num_requests_running{{model_name="{MODEL}"}}') == 0)
    assert m[f'vllm:num_requests_running{{model_name="{MODEL}"}}'] == 0
    r = server.http.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                "previous_response_id": r.id,
                                                "max_output_tokens": 2})
    assert r.status_code == 200, r.text     # a cancelled one can be continued


def test_a_foreground_response_cannot_be_cancelled(server):
    r = server.client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, **GREEDY)
    c = server.http.post(f"/v1/responses/{r.id}/cancel")
    assert c.status_code == 400 and "background" in c.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"background": True, "stream": True}, "stream"),
    ({"background": True, "store": False}, "background"),
    ({"previous_response_id": "resp_nope"}, "previous_response_id"),
])
def test_what_cannot_be_kept_is_refused_by_name(server, body, param):
    r = server.http.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.text


def test_the_store_forgets_the_oldest_beyond_its_size(server):
    ids = [server.client.responses.create(model=MODEL, input=f"n{i}", max_output_tokens=1,
                                          **GREEDY).id for i in range(SIZE + 1)]
    first = server.http.get(f"/v1/responses/{ids[0]}")
    assert first.status_code == 404
    assert "--responses-store-size" in first.json()["error"]["message"]
    assert all(server.http.get(f"/v1/responses/{i}").status_code == 200 for i in ids[1:])


def test_an_x_request_id_sent_again_does_not_overwrite_a_stored_response(server):
    """Response ids are built on the client's X-Request-Id (as vLLM's): a second request
    with the same one would replace the stored first; it is a 409 instead."""
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, "temperature": 0}
    first = server.http.post("/v1/responses", json=body, headers={"X-Request-Id": "same-1"})
    assert first.status_code == 200 and first.json()["id"] == "resp_same-1", first.text
    again = server.http.post("/v1/responses", json={**body, "input": "Other"},
                             headers={"X-Request-Id": "same-1"})
    assert again.status_code == 409 and "X-Request-Id" in again.json()["error"]["message"]
    assert server.http.get("/v1/responses/resp_same-1").json() == first.json()
    unstored = server.http.post("/v1/responses", json={**body, "store": False},
                                headers={"X-Request-Id": "same-1"})
    assert unstored.status_code == 200, unstored.text
