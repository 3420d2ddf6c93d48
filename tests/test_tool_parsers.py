"""Tool-call parsers on recorded-style model outputs of each family: the non-streamed
parse, and the stream split at every character boundary (the concatenated deltas must
equal the non-streamed parse)."""

from __future__ import annotations

import json

import pytest

from braze.serving.tool_parsers import ToolParser, detect, final_message
from tool_helpers import every_split, stream

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"tz": "Europe/Paris", "fmt": "24h \"quoted\" {braces}"}

# (parser, output, content, [(name, arguments dict)])
CASES = [
    ("hermes", 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
     '"arguments": {"tz": "Europe/Paris", "fmt": "24h \\"quoted\\" {braces}"}}\n</tool_call>',
     "I will check.", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris", "unit": "celsius"}, '
     '"name": "get_weather"}\n</tool_call>', None, [("get_weather", WEATHER)]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and "
     "<tool is not a tag.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
     '"unit": "celsius"}}; {"name": "get_time", "parameters": {"tz": "Europe/Paris", '
     '"fmt": "24h \\"quoted\\" {braces}"}}', None, [("get_weather", WEATHER), ("get_time", TIME)]),
    ("llama3_json", "The weather in Paris is mild.", "The weather in Paris is mild.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}, {"name": "get_time", "arguments": {"tz": "Europe/Paris", '
     '"fmt": "24h \\"quoted\\" {braces}"}}]', None, [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
     '[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris", "fmt": "24h \\"quoted\\" {braces}"}',
     "Sure.", [("get_weather", WEATHER), ("get_time", TIME)]),
    # v11 form with prose after the call (Devstral, ml-explore/mlx-lm#1448) and with the
    # [CALL_ID] of newer Mistral templates between the name and [ARGS]
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}\n\nLet me '
     'check [that].', "Let me check [that].", [("get_weather", WEATHER)]),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris", "unit": '
     '"celsius"} then [TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris", "fmt": "24h \\"quoted\\" '
     '{braces}"}', "then", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("deepseek_v3", "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
     'get_weather\n```json\n{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>\n'
     "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
     '{"tz": "Europe/Paris", "fmt": "24h \\"quoted\\" {braces}"}\n```<｜tool▁call▁end｜>'
     "<｜tool▁calls▁end｜>", "Let me look.", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
     '{"city": "Paris", "unit": "celsius"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None,
     [("get_weather", WEATHER)]),
    ("phi4_mini_json", 'functools[{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}]', None, [("get_weather", WEATHER)]),
    ("internlm", 'Checking the weather.<|action_start|><|plugin|>\n{"name": "get_weather", '
     '"parameters": {"city": "Paris", "unit": "celsius"}}<|action_end|>', "Checking the weather.",
     [("get_weather", WEATHER)]),
    ("gemma4", 'Looking it up.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,'
     'unit:<|"|>celsius<|"|>}<tool_call|><|tool_call>call:get_time{tz:<|"|>Europe/Paris<|"|>,'
     'fmt:<|"|>24h "quoted" {braces}<|"|>}<tool_call|>', "Looking it up.",
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("gemma4", '<|tool_call>call:plan{steps:[1,2,3],deep:{ok:true,note:null},mode:fast}'
     '<tool_call|>', None,
     [("plan", {"steps": [1, 2, 3], "deep": {"ok": True, "note": None}, "mode": "fast"})]),
]


def _assert_streams_as_whole(parser, text: str, every: int) -> None:
    """`text` streamed in pieces of `every` characters reads as parsed whole: the same
    calls, or (with none streamed) the same content. Parsing must not raise."""
    content, calls = final_message(parser.parse(text, final=True))
    whole = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in calls]
    s_content, s_calls = stream(parser, text, range(1, len(text), every))
    if calls:
        assert s_calls == whole, text
    elif not s_calls:
        assert s_content == content, text


@pytest.mark.parametrize("name,text,content,calls", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_parse_whole_and_streamed(name, text, content, calls):
    parser = ToolParser(name)
    got_content, got_calls = final_message(parser.parse(text, final=True))
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] \
        == calls
    whole = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in got_calls]
    # one character at a time, then every split into two pieces
    for cuts in every_split(text):
        s_content, s_calls = stream(parser, text, cuts)
        assert s_content == (content or ""), cuts
        assert s_calls == whole, cuts


def test_invalid_json_is_content():
    p = ToolParser("hermes")
    text = '<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>'
    assert final_message(p.parse(text)) == (text, [])


def test_detect_from_template():
    assert detect("{% if tools %}<tool_call>{{ x }}</tool_call>{% endif %}") == "hermes"
    assert detect("<|python_tag|>") == "llama3_json"
    assert detect("[TOOL_CALLS]") == "mistral"
    assert detect("{{ bos_token }}{% for m in messages %}{% endfor %}") is None
    with pytest.raises(ValueError):
        ToolParser("nope")


def test_required_and_named_plans_stream_like_they_parse():
    """tool_choice required (a JSON array of {name, parameters}) and named (the arguments
    alone): the same deltas contract as the parsers, and vLLM's schema for required."""
    from types import SimpleNamespace

    from braze.serving.tools import plan, required_schema
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}},
        {"type": "function", "function": {"name": "g"}}]
    schema = required_schema(tools, parallel=False)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [["f"], ["g"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object",
                                                                      "properties": {}}

    def body(choice):
        return SimpleNamespace(model_extra={"tools": tools, "tool_choice": choice})
    req = plan(body("required"), None)
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'
    content, calls = final_message(req.parse(text, True))
    assert content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [("f", '{"a": 1}'), ("g", "{}")]
    named = plan(body({"type": "function", "function": {"name": "f"}}), None)
    for p, text in ((req, text), (named, '{"a": 12}')):
        whole = final_message(p.parse(text, True))[1]
        want = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in whole]
        for cuts in every_split(text):
            s_content, s_calls = stream(SimpleNamespace(streamer=p.streamer), text, cuts)
            assert (s_content, s_calls) == ("", want)


def test_stream_cut_by_max_tokens_keeps_what_was_sent():
    p = ToolParser("hermes")
    text = 'Hi <tool_call>\n{"name": "f", "arguments": {"a": [1, 2'
    content, calls = stream(p, text, range(1, len(text)))
    assert content == "Hi" and calls == [{"name": "f", "arguments": '{"a": [1, 2'}]


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_malformed_output_is_content_not_an_error(name):
    """A model's output with a stray bracket anywhere (a small model's slip) never makes a
    parser raise (a 500, or a stream cut off), and streamed it reads as it does whole: the
    same calls, or the same content. (Gemma 4's `call:f{a:1}}` raised IndexError; Llama 3's
    stream garbled a JSON answer followed by text.)"""
    parser = ToolParser(name)
    for _, text, _, _ in (c for c in CASES if c[0] == name):
        for i in range(len(text) + 1):
            for stray in "}]":
                bad = text[:i] + stray + text[i:]
                _assert_streams_as_whole(parser, bad, 5)


def test_llama3_json_answer_is_content_streamed_too():
    """A Llama 3 reply that is a JSON object but not a call, then prose: content, the same
    streamed as whole (the stream sent the prose, then the whole text over it)."""
    p = ToolParser("llama3_json")
    for text in ('{"answer": 42} is the result.', '{"city": "Paris", "temp": 21}\n\nThat is all.'):
        assert final_message(p.parse(text, final=True)) == (text, [])
        for cuts in every_split(text):
            assert stream(p, text, cuts) == (text, []), cuts


# the tool-call turns of Mistral-7B-Instruct-v0.3's published chat template: it refuses a
# tool call id other than 9 characters, in assistant tool_calls and in tool messages
MISTRAL_TOOL_TURNS = """{%- for message in messages %}
    {%- if message["role"] == "user" %}
        {{- "[INST] " + message["content"] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}"""


@pytest.mark.parametrize("choice", ["auto", "required", "named"])
def test_mistral_call_ids_go_back_through_its_template(choice):
    """With the mistral parser, the calls a reply carries have ids Mistral's own chat
    template takes back in the next turn (9 letters and digits, as vLLM gives them): the
    client's history with the calls and their results renders. (OpenAI-shaped ids made the
    template refuse every second turn: a 400.)"""
    import re
    from types import SimpleNamespace

    from braze.serving.chat import ChatTemplate
    from braze.serving.protocol import ChatMessage
    from braze.serving.tools import plan
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    tool_choice = {"named": {"type": "function", "function": {"name": "get_weather"}}}.get(
        choice, choice)
    p = plan(SimpleNamespace(model_extra={"tools": tools, "tool_choice": tool_choice}),
             "mistral")
    text = {"auto": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
            "required": '[{"name": "get_weather", "parameters": {"city": "Paris"}}]',
            "named": '{"city": "Paris"}'}[choice]
    _, calls = p.message(text)
    streamed = [tc for d in p.streamer().feed(text, True) for tc in d.get("tool_calls", [])
                if "id" in tc]
    ids = [c["id"] for c in calls] + [tc["id"] for tc in streamed]
    assert len(ids) == 2 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids), ids
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temp": 21}'}]
    out = ChatTemplate(MISTRAL_TOOL_TURNS, {"eos_token": "</s>"}).render(
        [ChatMessage(**m) for m in history], add_generation_prompt=False)
    assert f'"call_id": "{calls[0]["id"]}"' in out


def test_hermes_reads_tags_the_tokenizer_marks_special(tmp_path):
    """Hermes 2 Pro and Hermes 3 have <tool_call> and </tool_call> as special tokens: with
    tool_choice auto and the hermes parser the reply keeps them (as vLLM's hermes parser
    asks), so the parser sees the call. (They were skipped as special tokens: the call came
    back as bare JSON content.)"""
    from types import SimpleNamespace

    from tokenizers import Tokenizer as HF

    from braze.runtime.detokenizer import IncrementalDetokenizer
    from braze.runtime.tokenizer import Tokenizer
    from braze.serving.tools import plan
    from braze.tiny import make_tokenizer
    make_tokenizer(tmp_path)
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))
    hf.add_special_tokens(["<tool_call>", "</tool_call>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = tok.encode(text, add_special_tokens=False)
    assert hf.token_to_id("<tool_call>") in ids and hf.token_to_id("</tool_call>") in ids
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    p = plan(SimpleNamespace(model_extra={"tools": tools, "tool_choice": "auto"}), "hermes")
    dt = IncrementalDetokenizer(tok, [], skip_special_tokens=p.skip_special_tokens)
    dt.update(ids)
    content, calls = p.message(dt.text)
    assert content == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"})]


def test_required_schema_keeps_recursive_parameters_recursive():
    """A tool whose parameters refer to their own root ("$ref": "#", a tree) under
    tool_choice required: the array schema holds the same arguments the tool's schema does
    (checked with jsonschema). The "#" pointed at the array of calls, so a node's children
    had to be arrays of tool calls."""
    jsonschema = pytest.importorskip("jsonschema")
    from braze.serving.tools import required_schema
    tree = {"type": "object", "properties": {
        "v": {"type": "integer"},
        "kids": {"type": "array", "items": {"$ref": "#"}},
        "first": {"$ref": "#/properties/v"},
        "label": {"$ref": "#/$defs/Label"}},
        "required": ["v", "kids"], "additionalProperties": False,
        "$defs": {"Label": {"type": "string", "maxLength": 3}}}
    tools = [{"type": "function", "function": {"name": "other", "parameters": {
                 "type": "object", "properties": {}}}},
             {"type": "function", "function": {"name": "tree", "parameters": tree}}]
    schema = required_schema(tools)
    good = {"v": 1, "first": 2, "label": "ab", "kids": [{"v": 2, "kids": [{"v": 3, "kids": []}]}]}
    calls_as_kids = {"v": 1, "kids": [[{"name": "tree", "parameters": {"v": 2, "kids": []}}]]}
    for args in (good, calls_as_kids, {"v": 1, "kids": [], "first": "x"}, {"v": 1, "kids": [],
                                                                          "label": "long"}):
        ok = jsonschema.Draft202012Validator(tree).is_valid(args)
        assert jsonschema.Draft202012Validator(schema).is_valid(
            [{"name": "tree", "parameters": args}]) == ok, args


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_edited_output_streams_as_it_reads_whole(name):
    """Replies edited at random (a character put in or taken out, as a small model slips):
    no parser raises, and streamed they read as whole: the same calls, or the same content;
    no call goes out without a name (the stream helper checks). A hermes block whose object
    names no function, then text, streamed as content without the block (the whole reply
    showed it), and `{"name": ""...` went out as a call with an empty name."""
    import random
    rng = random.Random(name)
    parser = ToolParser(name)
    for _, text, _, _ in (c for c in CASES if c[0] == name):
        for _ in range(150):
            t = text
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(t) + 1)
                t = t[:i] + rng.choice('{}[]",: \nx<>|;\\') + t[i:] if rng.random() < 0.5 \
                    else t[:i] + t[i + 1:]
            _assert_streams_as_whole(parser, t, 3)
    text = ('I will check.\n<tool_call>\n{"function": "get_weather"}\n</tool_call>\nDone.')
    assert stream(ToolParser("hermes"), text, range(1, len(text))) == (text, [])
