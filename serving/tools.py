"""Tool calling in chat requests: `tools`, `tool_choice`, and how the reply is read back.

tool_choice (vLLM's rules): absent means "auto" when tools are given, else "none".
  "none"      the reply is text; the tools still go into the chat template.
  "auto"      the model decides; its text is parsed for calls by the server's tool-call
              parser (`--tool-call-parser`, or the one the chat template points to); with
              parallel_tool_calls false only the first call is returned (as vLLM does).
  "required"  the reply is constrained to a JSON array of {"name", "parameters"} objects,
              each naming one of the tools with arguments valid for its schema (one item
              when parallel_tool_calls is false); finish_reason "tool_calls".
  {"type": "function", "function": {"name": N}}
              the reply is constrained to N's arguments (its parameters schema);
              finish_reason "stop", as OpenAI answers a forced function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from braze.ir.errors import BrazeError
from braze.runtime.chat_template import template_tool_calls
from braze.runtime.structured import StructuredOutputsParams

from .protocol import bad_request
from .tool_parsers import ToolParser
from .tool_parsers.base import Call, Parsed, ToolStreamer, final_message, new_call_id
from .tool_parsers.mistral import parse_array_after

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """How one chat request uses tools."""
    mode: str                                   # none, auto, required, named
    tools: list[dict]                           # for the chat template
    constraint: StructuredOutputsParams | None = None
    parser: ToolParser | None = None            # auto
    name: str | None = None                     # named
    parallel: bool = True                       # parallel_tool_calls
    new_call_id: Any = new_call_id              # the server's parser's ids, in every mode

    @property
    def skip_special_tokens(self) -> bool:
        return self.parser.skip_special_tokens if self.parser is not None else True

    def parse(self, text: str, final: bool) -> Parsed:
        if self.mode == "auto":
            p = self.parser.parse(text, final)
            return p if self.parallel else Parsed(p.content, p.calls[:1])
        if self.mode == "required":
            return parse_array_after(text, final, "")
        if self.mode == "named":
            return Parsed("", [Call(self.name, text)])
        return Parsed(text, [])

    def streamer(self) -> ToolStreamer:
        return ToolStreamer(self.parse, self.new_call_id)

    def message(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a whole reply (base.final_message)."""
        return final_message(self.parse(text, True), self.new_call_id)

    def finish_reason(self, calls: int, reason: str) -> str:
        if calls and self.mode in ("auto", "required") and reason == "stop":
            return "tool_calls"
        return reason


def held_to(tool_plan: ToolPlan | None, constraint, field: str | None):
    """(constraint, field) of a request: its tool plan's grammar (tool_choice required or
    named), else its own (response_format, ...); both at once is a 400."""
    if tool_plan is None or tool_plan.constraint is None:
        return constraint, field
    if constraint is not None:
        raise bad_request("tool_choice required or a named function cannot be combined "
                          f"with {field}", "tool_choice")
    return tool_plan.constraint, "tools"


def _tool_list(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list of {\"type\": \"function\", "
                          "\"function\": {...}}", "tools")
    out = []
    for t in tools:
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" \
                or not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise bad_request("each tool must be {\"type\": \"function\", \"function\": "
                              "{\"name\": ..., \"parameters\": {...}}}", "tools")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"tool {f['name']!r}: parameters must be a JSON schema object",
                              "tools")
        out.append({"type": "function", "function": f})
    return out


def _schema(f: dict) -> dict:
    return f.get("parameters") or EMPTY_PARAMETERS


# where JSON schemas keep definitions that "$ref": "#/<key>/Name" points to
DEFS_KEYS = ("$defs", "definitions")


def _rebase_refs(value, base: str):
    """`value` with its "$ref"s to the parameters' own root ("#", "#/properties/...") made to
    point at `base`, where the parameters now sit; "#/$defs/..." and "#/definitions/..."
    stay (the definitions move to the root)."""
    if isinstance(value, list):
        return [_rebase_refs(v, base) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _rebase_refs(v, base) for k, v in value.items()}
    ref = value.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) \
            and not any(ref.startswith(f"#/{key}/") for key in DEFS_KEYS):
        out["$ref"] = base + ref[1:]
    return out


def required_schema(tools: list[dict], parallel: bool = True) -> dict:
    """vLLM's schema for tool_choice "required": an array of {name, parameters}. Each
    tool's definitions ($defs, definitions) move to the array schema's root, where its
    "#/$defs/..." references point once the parameters sit inside the array (as vLLM does);
    one name defined differently by two tools is a 400. References to the parameters' own
    root ("#": a recursive schema) are made to point where the parameters now sit (they
    pointed at the array of calls)."""
    items, defs, owner = [], {}, {}
    for i, t in enumerate(tools):
        f = t["function"]
        params = _rebase_refs(dict(_schema(f)), f"#/items/anyOf/{i}/properties/parameters")
        for key in DEFS_KEYS:
            for name, d in (params.pop(key, None) or {}).items():
                got = defs.setdefault(key, {})
                if name in got and got[name] != d:
                    raise bad_request(f"tools {owner[key, name]!r} and {f['name']!r} both define "
                                      f"{name!r} in {key}, differently; tool_choice required "
                                      f"puts every tool's definitions in one schema, so give "
                                      f"them different names", "tools")
                got[name] = d
                owner.setdefault((key, name), f["name"])
        items.append({"properties": {"name": {"type": "string", "enum": [f["name"]]},
                                     "parameters": params},
                      "required": ["name", "parameters"]})
    schema = {"type": "array", "minItems": 1,
              "items": {"type": "object", "anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema | defs


def template_tools(body) -> list[dict] | None:
    """The request's `tools` as the chat template gets them (None without); 400 for bad
    ones. For requests that only render the chat (/tokenize), where tool_choice is moot."""
    tools = (body.model_extra or {}).get("tools")
    return None if tools is None else _tool_list(tools)


def plan(body, parser_name: str | None) -> ToolPlan | None:
    """The request's tool plan (None without tools and tool_choice); 400 for bad ones."""
    extra = body.model_extra or {}
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    tools = template_tools(body)
    parallel = extra.get("parallel_tool_calls")
    parallel = True if parallel is None else parallel      # OpenAI's default
    if not isinstance(parallel, bool):
        raise bad_request(f"parallel_tool_calls must be true or false, got {parallel!r}",
                          "parallel_tool_calls")
    parser = ToolParser(parser_name) if parser_name is not None else None
    ids = dict(parallel=parallel, new_call_id=parser.new_call_id if parser else new_call_id)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return ToolPlan("none", tools, **ids)
    if choice == "auto":
        if parser_name is None:
            raise bad_request('tool_choice "auto" needs a tool-call parser: start the server '
                              "with --tool-call-parser NAME (this model's chat template does "
                              'not name one), or use tool_choice "required" or a named '
                              "function", "tool_choice")
        return ToolPlan("auto", tools, parser=parser, **ids)
    if choice == "required":
        return ToolPlan("required", tools, StructuredOutputsParams(
            json=required_schema(tools, parallel)), **ids)
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        for t in tools:
            if t["function"]["name"] == name:
                return ToolPlan("named", tools, StructuredOutputsParams(
                    json=_schema(t["function"])), name=name, **ids)
        raise bad_request(f"tool_choice names the function {name!r}, which is not in tools",
                          "tool_choice")
    raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", '
                      '"function": {"name": ...}}', "tool_choice")


def tool_at_fault(compile_fn, tools: list[dict]) -> str | None:
    """Which tool's parameters schema does not compile (`compile_fn` raising BrazeError),
    as the message of a 400; None when each compiles alone."""
    for i, t in enumerate(tools):
        f = t["function"]
        try:
            compile_fn(StructuredOutputsParams(json=_schema(f)))
        except BrazeError as e:
            return (f"tools[{i}] ({f['name']!r}): its parameters are not a JSON schema the "
                    f"reply can be held to (tool_choice required or named): {e}")
    return None


def template_messages(messages) -> list[dict]:
    """Chat messages as the template sees them: assistant tool_calls with their arguments
    as objects (what templates expect, as vLLM passes them), tool results with their id,
    and a reply's reasoning as reasoning_content."""
    out = []
    for m in messages:
        d = {}
        calls = (m.model_extra or {}).get("tool_calls")
        if calls:
            d["tool_calls"] = template_tool_calls(calls)
        tcid = (m.model_extra or {}).get("tool_call_id")
        if tcid is not None:
            d["tool_call_id"] = tcid
        # an earlier reply's reasoning, sent back under vLLM's name or the older one:
        # templates read it as reasoning_content (Qwen3's drops it from old turns)
        extra = m.model_extra or {}
        think = extra.get("reasoning", extra.get("reasoning_content"))
        if isinstance(think, str):
            d["reasoning_content"] = think
        out.append(d)
    return out
