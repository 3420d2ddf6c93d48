"""Function tools on /v1/responses (serving/responses_tools.py, responses_stream.py): each
reply is checked against the chat completion of the same request (same seed), which
test_serve_structured.py checks against the tool-call parser and the grammar; streamed
events against OpenAI's sequence; function_call / function_call_output items in the input
against the chat's tool_calls / tool messages (the same prompt tokens, the same greedy
reply); and with stored responses, a tool's output sent after previous_response_id."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

from serve_helpers import MODEL, Server  # noqa: E402
from test_serve_structured import MSGS, SCHEMA, TOOLS, validate  # noqa: E402

# the same tools, as the Responses API spells them (flat)
FLAT = [{"type": "function", **t["function"]} for t in TOOLS]
HERMES = (r'Checking\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}'
          r'\n</tool_call>')
# a chat template that renders tool calls and outputs tersely (the tiny model's context is
# 256 tokens): the prompts compared below differ when a call's name, arguments or output do
TERSE = """{%- for m in messages %}{%- if m.tool_calls %}{%- for c in m.tool_calls %}
{%- if c.function is defined %}{%- set c = c.function %}{%- endif %}
<c>{{ c.name }}{{ c.arguments | tojson }}</c>{%- endfor %}
{%- elif m.role == "tool" %}<r>{{ m.tool_call_id }}:{{ m.content }}</r>
{%- else %}<{{ m.role }}>{{ m.content }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}<assistant>{%- endif %}"""


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    d = tmp_path_factory.mktemp("responses-tools")
    (d / "tools.jinja").write_text(TERSE)
    s = Server(store.artifact("llama"), d, "--tool-call-parser", "hermes",
               "--enable-responses-store", "--chat-template", str(d / "tools.jinja"))
    try:
        yield s
    finally:
        s.stop()


def _chat(server, **kw):
    return server.client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS,
                                                 **kw).choices[0]


def _respond(server, **kw):
    return server.client.responses.create(model=MODEL, input=MSGS, tools=FLAT, **kw)


def _calls(output) -> list[tuple[str, str]]:
    return [(o.name, o.arguments) for o in output if o.type == "function_call"]


def _stream(server, **kw):
    events = list(server.client.responses.create(model=MODEL, input=MSGS, tools=FLAT,
                                                 stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_auto_returns_the_text_then_the_call_as_chat_does(server):
    kw = dict(temperature=1.0, extra_body={"seed": 3, "structured_outputs": {"regex": HERMES}})
    want = _chat(server, tool_choice="auto", max_tokens=120, **kw)
    r = _respond(server, tool_choice="auto", max_output_tokens=120, **kw)
    assert r.status == "completed" and r.tool_choice == "auto" and len(r.tools) == 2
    msg, call = r.output
    assert (msg.type, msg.content[0].text) == ("message", want.message.content)
    (c,) = want.message.tool_calls
    assert call.type == "function_call" and call.status == "completed"
    assert (call.name, call.arguments) == (c.function.name, c.function.arguments)
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")

    events = _stream(server, tool_choice="auto", max_output_tokens=120, **kw)
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    at = types.index("response.output_text.done")
    assert types[at:at + 4] == ["response.output_text.done", "response.content_part.done",
                                "response.output_item.done", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    args = "".join(e.delta for e in events
                   if e.type == "response.function_call_arguments.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (text, args) == (msg.content[0].text, call.arguments)
    final = events[-1].response
    assert [(o.type, o.id) for o in final.output] == \
        [(e.item.type, e.item.id) for e in events if e.type == "response.output_item.done"]
    assert _calls(final.output) == _calls(r.output)


@pytest.mark.parametrize("choice, chat_choice", [
    ("required", "required"),
    ({"type": "function", "name": "get_weather"},
     {"type": "function", "function": {"name": "get_weather"}}),
])
def test_required_and_named_return_only_calls_as_chat_does(server, choice, chat_choice):
    kw = dict(temperature=1.0, extra_body={"seed": 4, "parallel_tool_calls": False})
    want = _chat(server, tool_choice=chat_choice, max_tokens=120, **kw)
    r = _respond(server, tool_choice=choice, max_output_tokens=120, **kw)
    assert [o.type for o in r.output] == ["function_call"]
    assert _calls(r.output) == [(c.function.name, c.function.arguments)
                                for c in want.message.tool_calls]
    name, args = _calls(r.output)[0]
    if name == "get_weather":
        validate(json.loads(args), SCHEMA)
    events = _stream(server, tool_choice=choice, max_output_tokens=120, **kw)
    assert _calls(events[-1].response.output) == _calls(r.output)
    assert "response.output_text.delta" not in {e.type for e in events}


HISTORY_CHAT = MSGS + [
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]
HISTORY_ITEMS = MSGS + [
    {"type": "function_call", "call_id": "call_1", "name": "get_weather",
     "arguments": '{"city": "Paris"}'},
    {"type": "function_call", "call_id": "call_2", "name": "get_time",
     "arguments": '{"tz": "CET"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'},
    {"type": "function_call_output", "call_id": "call_2", "output": "12:00"}]


def test_calls_and_their_outputs_in_the_input_are_the_chats_tool_turns(server):
    want = server.client.chat.completions.create(model=MODEL, messages=HISTORY_CHAT,
                                                 tools=TOOLS, tool_choice="none", max_tokens=6,
                                                 temperature=0)
    r = server.client.responses.create(model=MODEL, input=HISTORY_ITEMS, tools=FLAT,
                                       tool_choice="none", max_output_tokens=6, temperature=0)
    assert r.usage.input_tokens == want.usage.prompt_tokens
    assert r.output_text == want.choices[0].message.content


def test_a_tools_output_goes_on_after_previous_response_id(server):
    first = _respond(server, tool_choice={"type": "function", "name": "get_time"},
                     max_output_tokens=60, temperature=1.0, extra_body={"seed": 1})
    (call,) = [o for o in first.output if o.type == "function_call"]
    second = server.client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=FLAT, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}],
        max_output_tokens=5, temperature=0)
    want = server.client.chat.completions.create(
        model=MODEL, tools=TOOLS, tool_choice="none", max_tokens=5, temperature=0,
        messages=MSGS + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "12:00"}])
    assert second.usage.input_tokens == want.usage.prompt_tokens
    assert second.output_text == want.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools"),
    ({"tools": TOOLS}, "tools"),                       # the chat's nested shape
    ({"tools": FLAT, "tool_choice": {"type": "web_search"}}, "tool_choice"),
    ({"tools": FLAT, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": FLAT, "tool_choice": "required",
      "text": {"format": {"type": "json_object"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}, "input"),
])
def test_what_tools_cannot_be_is_refused_by_name(server, body, param):
    r = server.http.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_an_output_answers_a_call_made_before_it(server):
    r = server.http.post("/v1/responses", json={"model": MODEL, "tools": FLAT, "input": [
        *MSGS, {"type": "function_call_output", "call_id": "call_9", "output": "1"}]})
    assert r.status_code == 400 and "call_9" in r.json()["error"]["message"], r.text


def test_logprobs_with_tools_are_refused_by_name(server):
    r = server.http.post("/v1/responses", json={
        "model": MODEL, "input": "x", "tools": FLAT, "include": ["message.output_text.logprobs"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "include", r.text
