"""Structured output and tool calling through `braze serve` with the `openai` client (tiny
random llama, reference backend), and the chat template's view of tools and tool history."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

from serve_helpers import MODEL, Server  # noqa: E402

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 6},
                         "unit": {"enum": ["C", "F"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "get_time",
                                           "parameters": {"type": "object", "properties": {
                                               "tz": {"enum": ["UTC", "CET"]}},
                                               "required": ["tz"],
                                               "additionalProperties": False}}}]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    # vLLM's command line for tool calling (--enable-auto-tool-choice was refused)
    s = Server(store.artifact("llama"), tmp_path_factory.mktemp("serve-structured"),
               "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    try:
        yield s
    finally:
        s.stop()


def validate(value, schema):
    try:
        import jsonschema
    except ImportError:
        assert set(value) == set(schema["required"])
        return
    jsonschema.validate(value, schema)


def streamed_chat(server, **kw):
    content, calls, reasons = "", [], []
    for chunk in server.client.chat.completions.create(model=MODEL, messages=MSGS, stream=True,
                                                       **kw):
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            if tc.index == len(calls):
                assert tc.id and tc.type == "function" and tc.function.name
                calls.append({"name": tc.function.name, "arguments": ""})
            calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert set(reasons[:-1]) <= {None}
    return content, calls, reasons[-1]


def test_response_format_json_schema(server):
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA,
                                                 "strict": True}}
    for seed in (0, 1, 2):
        r = server.client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=60,
                                                  temperature=1.0, seed=seed, response_format=rf)
        assert r.choices[0].finish_reason == "stop"
        validate(json.loads(r.choices[0].message.content), SCHEMA)
    content, calls, reason = streamed_chat(server, max_tokens=60, temperature=1.0, seed=0,
                                           response_format=rf)
    r = server.client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=60,
                                              temperature=1.0, seed=0, response_format=rf)
    assert (content, calls, reason) == (r.choices[0].message.content, [], "stop")
    # json_object, and the completions endpoint with vLLM's fields
    r = server.client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40,
                                              temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length"
                                     or isinstance(json.loads(text), dict))
    r = server.client.completions.create(model=MODEL, prompt="Pick", max_tokens=10,
                                         extra_body={"guided_choice": ["left", "right"]})
    assert r.choices[0].text in ("left", "right")
    r = server.client.completions.create(model=MODEL, prompt="Pick", max_tokens=10,
                                         extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert r.choices[0].text.isdigit() and len(r.choices[0].text) == 4


def test_response_format_structural_tag(server):
    """vLLM's two structural_tag shapes in response_format: structures + triggers (free
    text here: a random model never writes the trigger), and xgrammar's format, which can
    demand the tag."""
    import re
    legacy = {"type": "structural_tag", "triggers": ["<function="],
              "structures": [{"begin": "<function=get_weather>", "schema": SCHEMA,
                              "end": "</function>"}]}
    r = server.client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8,
                                              temperature=1.0, seed=0, response_format=legacy)
    assert r.choices[0].finish_reason in ("stop", "length")
    fmt = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<function="], "at_least_one": True,
        "stop_after_first": True,
        "tags": [{"type": "tag", "begin": "<function=get_weather>", "end": "</function>",
                  "content": {"type": "json_schema", "json_schema": SCHEMA,
                              "max_whitespace_cnt": 1}}]}}
    done = 0
    for seed in (0, 1, 2):
        r = server.client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=160,
                                                  temperature=1.0, seed=seed,
                                                  response_format=fmt)
        text = r.choices[0].message.content
        assert text.startswith("<function=get_weather>"), text
        if r.choices[0].finish_reason == "stop":
            m = re.fullmatch(r"<function=get_weather>(.*)</function>", text, re.S)
            # (raw control characters may sit in its strings: docs/serving.md)
            validate(json.loads(m.group(1), strict=False), SCHEMA)
            done += 1
    assert done
    r = server.client.completions.create(model=MODEL, prompt="Call", max_tokens=8,
                                         extra_body={"structured_outputs": {
                                             "structural_tag": json.dumps(legacy)}})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_required(server):
    for parallel, seed in ((False, 0), (False, 1), (True, 2)):
        kw = dict(max_tokens=120, temperature=1.0, seed=seed, tools=TOOLS,
                  tool_choice="required", parallel_tool_calls=parallel)
        r = server.client.chat.completions.create(model=MODEL, messages=MSGS, **kw)
        choice = r.choices[0]
        if choice.finish_reason == "length":      # a random model may not close the array
            assert parallel
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (len(calls) == 1 or parallel)
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        for c in calls:
            assert c.type == "function" and c.id.startswith("call_")
            validate(json.loads(c.function.arguments), schemas[c.function.name])
        content, s_calls, reason = streamed_chat(server, **kw)
        assert reason == "tool_calls" and not content
        assert s_calls == [{"name": c.function.name, "arguments": c.function.arguments}
                           for c in calls]


def test_tool_choice_named(server):
    kw = dict(max_tokens=60, temperature=1.0, seed=4, tools=TOOLS,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = server.client.chat.completions.create(model=MODEL, messages=MSGS, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    validate(json.loads(call.function.arguments), SCHEMA)
    content, calls, reason = streamed_chat(server, **kw)
    assert (content, reason) == ("", "stop")
    assert calls == [{"name": "get_weather", "arguments": call.function.arguments}]


def test_tool_history_auto_and_none(server):
    """Assistant tool_calls and tool results are accepted in the history; with "auto" the
    (random) reply is parsed by the hermes parser: plain text here, so content."""
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    for choice in ("auto", "none", None):
        kw = {} if choice is None else {"tool_choice": choice}
        r = server.client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                                  max_tokens=8, temperature=0, **kw)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length") and not c.message.tool_calls
        assert isinstance(c.message.content, str)


def test_bad_structured_requests(server):
    h = server.http
    cases = [
        {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
        {"response_format": {"type": "xml"}},
        {"structured_outputs": {"regex": "(("}},
        {"response_format": {"type": "structural_tag", "structures": [], "triggers": ["<"]}},
        {"structured_outputs": {"structural_tag": "{oops"}},
        {"response_format": {"type": "structural_tag", "format": {"type": "no_such_format"}}},
        {"structured_outputs": {"regex": "a", "choice": ["a"]}},
        {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [{"type": "function"}]},
        {"tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        {"messages": MSGS + [{"role": "assistant", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}]},
    ]
    for extra in cases:
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS,
                                                 "max_tokens": 4, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_auto_without_a_parser_is_400(store, tmp_path):
    s = Server(store.artifact("llama"), tmp_path)
    try:
        r = s.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS,
                                                      "tools": TOOLS, "max_tokens": 4})
        assert r.status_code == 400 and "--tool-call-parser" in r.json()["error"]["message"]
        r = s.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS,
                                                      "tools": TOOLS, "tool_choice": "none",
                                                      "max_tokens": 4})
        assert r.status_code == 200
    finally:
        s.stop()


# a Qwen2.5-style template: tools in the system turn, tool calls and results in the history
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_chat_template_gets_tools_like_transformers(store):
    from transformers import AutoTokenizer

    from braze.serving.chat import ChatTemplate
    from braze.serving.protocol import ChatMessage
    from braze.serving.tool_parsers import detect
    tok = AutoTokenizer.from_pretrained(store.checkpoint("llama"))
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    ours = ChatTemplate(TOOL_TEMPLATE).render([ChatMessage(**m) for m in history], True,
                                              tools=TOOLS)
    # transformers takes the arguments as an object (vLLM converts them the same way)
    hf_history = json.loads(json.dumps(history))
    hf_history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "days": 2}
    hf_history[1]["content"] = ""
    want = tok.apply_chat_template(hf_history, tools=TOOLS, chat_template=TOOL_TEMPLATE,
                                   tokenize=False, add_generation_prompt=True)
    assert ours == want
    assert '"name": "get_weather", "arguments": {"city": "Paris", "days": 2}' in ours
    assert detect(TOOL_TEMPLATE) == "hermes"


def test_auto_parses_tool_calls_from_the_reply(server):
    """tool_choice auto with the hermes parser: a reply forced (by a regex) into the hermes
    format comes back as tool_calls, streamed as argument deltas, finish_reason tool_calls."""
    regex = (r'Checking\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}'
             r'\n</tool_call>')
    kw = dict(max_tokens=120, temperature=1.0, seed=3, tools=TOOLS, tool_choice="auto",
              extra_body={"structured_outputs": {"regex": regex}})
    r = server.client.chat.completions.create(model=MODEL, messages=MSGS, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) in ({"tz": "UTC"}, {"tz": "CET"})
    content, calls, reason = streamed_chat(server, **kw)
    assert (content, reason) == ("Checking.", "tool_calls")
    assert calls == [{"name": "get_time", "arguments": call.function.arguments}]


def test_unknown_parser_is_a_startup_error(store):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "braze", "serve", str(store.artifact("llama")),
                        "--port", "0", "--tool-call-parser", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "--tool-call-parser 'nope'" in p.stderr
    assert "Traceback" not in p.stderr


def test_enable_auto_tool_choice_without_a_parser_is_a_startup_error(store):
    """vLLM's --enable-auto-tool-choice is accepted (it was 'unrecognized arguments'); with
    no parser to read the calls (none given, none in this model's chat template) the server
    says so at start rather than answering every tools request with a 400."""
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "braze", "serve", str(store.artifact("llama")),
                        "--port", "0", "--backend", "reference", "--enable-auto-tool-choice"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "--enable-auto-tool-choice" in p.stderr and "--tool-call-parser" in p.stderr
    assert "Traceback" not in p.stderr


def test_auto_parses_a_recorded_reply(server):
    """A real model's reply (SmolLM3's, from tests/data/tool_outputs.json) forced through the
    server by a regex: the non-streamed and the streamed response carry the call read off it."""
    import re

    from tool_helpers import parser_text, recorded_outputs
    rec = next(r for r in recorded_outputs()      # short enough for the tiny model's context
               if r["model"].startswith("SmolLM3") and r["content"] is None and len(r["raw"]) < 100)
    text = parser_text(rec)
    kw = dict(max_tokens=150, temperature=1.0, seed=5, tools=TOOLS, tool_choice="auto",
              extra_body={"structured_outputs": {"regex": re.escape(text)}})
    choice = server.client.chat.completions.create(model=MODEL, messages=MSGS, **kw).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    want = [(c["name"], c["arguments"]) for c in rec["calls"]]
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == want
    content, calls, reason = streamed_chat(server, **kw)
    assert (content, reason) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want


def _raw_stream(server, body):
    chunks = []
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_streamed_tool_calls_carry_logprobs_and_token_ids(server, choice):
    """With tools, a stream's chunks carry the logprobs and token ids of the tokens they
    hold, as without tools: together they are the whole response's (none were dropped
    where the parser held text back)."""
    regex = r'<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}\n</tool_call>'
    body = {"model": MODEL, "messages": MSGS, "tools": TOOLS, "max_tokens": 80,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "return_token_ids": True,
            "prompt_logprobs": 1}
    if choice == "auto":
        body["structured_outputs"] = {"regex": regex}
    elif choice == "required":         # one call: the array a random model writes is endless
        body.update(tool_choice="required", parallel_tool_calls=False)
    else:
        body["tool_choice"] = {"type": "function", "function": {"name": "get_time"}}
    whole = server.http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert whole["message"]["tool_calls"]
    chunks = _raw_stream(server, body)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    streamed_lp = [t for ch in choices for t in (ch.get("logprobs") or {}).get("content", [])]
    streamed_ids = [t for ch in choices for t in ch.get("token_ids") or []]
    assert streamed_ids == whole["token_ids"]
    assert streamed_lp == whole["logprobs"]["content"]
    assert len(streamed_lp) == len(whole["token_ids"])
    assert choices[-1]["finish_reason"] == whole["finish_reason"]
    assert choices[-1].get("stop_reason") == whole.get("stop_reason")
    # vLLM's prompt_logprobs: on the first chunk of the choice, as without tools
    whole_body = server.http.post("/v1/chat/completions", json=body).json()
    plps = [c["prompt_logprobs"] for c in chunks if c.get("prompt_logprobs")]
    assert plps == [whole_body["prompt_logprobs"]]


def _strict_json(text: str):
    """JSON as strict parsers (JavaScript's, Go's) read it: no NaN or Infinity."""
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_logprobs_of_tokens_a_grammar_masks_are_json(server):
    """A grammar masks most tokens to -inf; logprobs that list them (top_logprobs) give them
    vLLM's floor, -9999.0, so the body is JSON (it was a 500, and streams sent -Infinity)."""
    h = server.http
    for stream in (False, True):
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "Pick", "max_tokens": 5,
                                            "logprobs": 3, "guided_choice": ["left", "right"],
                                            "stream": stream})
        assert r.status_code == 200, r.text
        bodies = [_strict_json(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")] if stream else [_strict_json(r.text)]
        lps = [ch["logprobs"] for b in bodies for ch in b["choices"] if ch["logprobs"]]
        text = "".join(ch["text"] for b in bodies for ch in b["choices"])
        assert text in ("left", "right")
        tops = [v for lp in lps for top in lp["top_logprobs"] for v in top.values()]
        assert -9999.0 in tops and min(tops) == -9999.0
        assert all(-9999.0 < v <= 0 for lp in lps for v in lp["token_logprobs"])
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 5,
                                                 "logprobs": True, "top_logprobs": 3,
                                                 "guided_choice": ["left", "right"],
                                                 "stream": stream})
        assert r.status_code == 200, r.text
        bodies = [_strict_json(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")] if stream else [_strict_json(r.text)]
        items = [t for b in bodies for ch in b["choices"] for t in (ch["logprobs"] or {})
                 .get("content", [])]
        assert items and all(-9999.0 < t["logprob"] <= 0 for t in items)
        assert min(a["logprob"] for t in items for a in t["top_logprobs"]) == -9999.0


def test_a_schema_that_does_not_compile_names_its_field(server):
    """The 400 for a schema, regex or grammar xgrammar cannot compile names the field it
    came in (param), and for tool_choice required or named, the tool whose parameters it is."""
    h = server.http
    bad = {"type": "object", "properties": {"x": {"type": "wat"}}}
    for extra, param in [
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "n",
                                                                         "schema": bad}}},
             "response_format"),
            ({"guided_json": bad}, "guided_json"),
            ({"guided_regex": "(("}, "guided_regex"),
            ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs")]:
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS,
                                                 "max_tokens": 4, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4,
                                            **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    tools = TOOLS + [{"type": "function", "function": {"name": "broken", "parameters": bad}}]
    for choice in ("required", {"type": "function", "function": {"name": "broken"}}):
        r = h.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS,
                                                 "max_tokens": 4, "tools": tools,
                                                 "tool_choice": choice})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "tools", r.text
        assert "tools[2] ('broken')" in err["message"] and '"wat"' in err["message"]


@pytest.mark.parametrize("field, value", [("guided_choice", ["left", "right"]),
                                          ("guided_regex", "[0-9]+"),
                                          ("guided_json", {"type": "object"}),
                                          ("guided_grammar", 'root ::= "a"')])
def test_beam_search_refuses_guided_fields(server, field, value):
    """Beam search cannot hold its beams to a grammar: vLLM's guided_* fields are refused by
    name, as response_format and structured_outputs are (they were silently ignored)."""
    for path, extra in (("/v1/completions", {"prompt": "Pick"}),
                        ("/v1/chat/completions", {"messages": MSGS})):
        r = server.http.post(path, json={"model": MODEL, "max_tokens": 4, "n": 2,
                                         "use_beam_search": True, field: value, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field


def test_tool_choice_required_with_defs_and_refs(server):
    """Tools whose parameters use $defs and $ref (as pydantic writes them): with
    tool_choice required their definitions move to the root of the array schema, where
    "#/$defs/..." points (they were a 400: "Cannot find field '$defs'")."""
    loc = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
           "required": ["city"], "additionalProperties": False}
    weather = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"}},
               "required": ["where"], "additionalProperties": False, "$defs": {"Loc": loc}}
    trip = {"type": "object", "properties": {"to": {"$ref": "#/definitions/Loc"},
                                             "days": {"type": "integer", "minimum": 1,
                                                      "maximum": 9}},
            "required": ["to", "days"], "additionalProperties": False,
            "definitions": {"Loc": loc}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": weather}},
             {"type": "function", "function": {"name": "trip", "parameters": trip}}]
    schemas = {"weather": weather, "trip": trip}
    seen = set()
    for seed in range(4):
        r = server.client.chat.completions.create(
            model=MODEL, messages=MSGS, tools=tools, tool_choice="required", max_tokens=80,
            temperature=1.0, seed=seed, parallel_tool_calls=False)
        choice = r.choices[0]
        assert choice.finish_reason in ("tool_calls", "length")
        for c in choice.message.tool_calls or []:
            validate(json.loads(c.function.arguments), schemas[c.function.name])
            seen.add(c.function.name)
    assert seen
    # two tools defining one name differently cannot share the root: a 400 naming both
    other = json.loads(json.dumps(weather))
    other["$defs"]["Loc"]["properties"]["city"] = {"enum": ["Oslo"]}
    r = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MSGS, "max_tokens": 4, "tool_choice": "required",
        "tools": [tools[0], {"type": "function", "function": {"name": "trip",
                                                              "parameters": other}}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "tools"
    assert "'Loc'" in err["message"] and "'weather'" in err["message"] \
        and "'trip'" in err["message"]


def test_parallel_tool_calls_false_returns_the_first_call_with_auto(server):
    """tool_choice auto with parallel_tool_calls false: only the reply's first call comes
    back, whole and streamed (as vLLM does; both came back). A value that is not a bool is
    a 400 naming the field (it read as true)."""
    import re
    regex = (r'<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}\n'
             r'</tool_call>\n<tool_call>\n\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"'
             r'\}\}\n</tool_call>')
    base = dict(max_tokens=200, temperature=1.0, seed=3, tools=TOOLS, tool_choice="auto",
                extra_body={"structured_outputs": {"regex": regex}})
    r = server.client.chat.completions.create(model=MODEL, messages=MSGS, **base)
    text_calls = [(c.function.name, json.loads(c.function.arguments))
                  for c in r.choices[0].message.tool_calls]
    raw = server.client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=200,
                                                temperature=1.0, seed=3,
                                                extra_body={"structured_outputs": {
                                                    "regex": regex}}).choices[0].message.content
    want = [(m["name"], m["arguments"]) for m in
            (json.loads(b) for b in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", raw))]
    assert text_calls == want and len(want) == 2
    r = server.client.chat.completions.create(model=MODEL, messages=MSGS,
                                              parallel_tool_calls=False, **base)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == want[:1]
    content, calls, reason = streamed_chat(server, parallel_tool_calls=False, **base)
    assert (content, reason) == ("", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want[:1]
    r = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MSGS, "max_tokens": 4, "tools": TOOLS,
        "tool_choice": "required", "parallel_tool_calls": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls"
