"""Function tools in OpenAI's Responses API, as the chat route's tools (serving/tools.py).

A Responses request spells tools flat, `{"type": "function", "name", "description",
"parameters", "strict"}`, and a named tool_choice `{"type": "function", "name": N}`; chat
nests them under "function". The conversation carries calls as items of their own:

    {"type": "function_call", "call_id", "name", "arguments"}   an assistant's call
    {"type": "function_call_output", "call_id", "output"}       the tool's result

which are the chat's assistant `tool_calls` and `tool` messages. A reply's calls come back
as function_call output items, after the message (when the reply also wrote text), each
with its own `id` (fc_...) and the `call_id` the tool's output names. Hosted tools
(web_search, file_search, code_interpreter, mcp, ...) are a 400 naming them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .protocol import bad_request

_ROUTE = "this server's /v1/responses"


def chat_tools(tools: Any) -> list[dict] | None:
    """The request's `tools` in the chat's shape (None for none); 400 naming the tool that
    is not a function tool."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list of {\"type\": \"function\", \"name\": ..., "
                          "\"parameters\": {...}}", "tools")
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else type(t).__name__
        if kind != "function":
            raise bad_request(f"tools[{i}] is of type {kind!r}; {_ROUTE} runs function tools "
                              "only ({\"type\": \"function\", \"name\": ..., \"parameters\": "
                              "{...}}): hosted tools are not supported", "tools")
        if "function" in t and "name" not in t:
            raise bad_request(f"tools[{i}] is in the chat completions shape; /v1/responses "
                              "takes it flat: {\"type\": \"function\", \"name\": ..., "
                              "\"parameters\": {...}}", "tools")
        f = {k: t[k] for k in ("name", "description", "parameters", "strict")
             if t.get(k) is not None}
        out.append({"type": "function", "function": f})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """`tool_choice` in the chat's shape; 400 naming what is not a function choice."""
    if choice is None or isinstance(choice, str):
        return choice                   # none, auto, required: the chat route checks them
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(f"tool_choice must be \"none\", \"auto\", \"required\" or "
                      f"{{\"type\": \"function\", \"name\": ...}} on {_ROUTE}, got "
                      f"{json.dumps(choice, default=str)[:80]}", "tool_choice")


def call_of(item: dict, i: int) -> dict:
    """A function_call input item as a chat tool call; 400 naming the item otherwise."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str) or (key != "arguments" and not item[key]):
            raise bad_request(f"input[{i}] is a function_call without a string {key!r} "
                              "(it takes call_id, name and arguments, a JSON text)", "input")
    return {"id": item["call_id"], "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]}}


def output_of(item: dict, i: int, called: set) -> dict:
    """A function_call_output input item as the chat's tool message; `called`: the call ids
    of the conversation's function_call items so far, one of which it must answer."""
    if not isinstance(item.get("call_id"), str) or not item["call_id"]:
        raise bad_request(f"input[{i}] is a function_call_output without a call_id", "input")
    if item["call_id"] not in called:
        raise bad_request(f"input[{i}] is the output of call {item['call_id']!r}, which no "
                          "function_call item before it made (send the call too, or "
                          "previous_response_id of the response that made it)", "input")
    out = item.get("output")
    if isinstance(out, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                     for p in out):
        out = "".join(p["text"] for p in out)
    if not isinstance(out, str):
        raise bad_request(f"input[{i}].output must be a string (or input_text parts)", "input")
    return {"role": "tool", "tool_call_id": item["call_id"], "content": out}


def call_item(call_id: str, name: str, arguments: str, status: str,
              item_id: str | None = None) -> dict:
    """A reply's call as a function_call output item."""
    return {"id": item_id or "fc_" + uuid.uuid4().hex, "type": "function_call",
            "call_id": call_id, "name": name, "arguments": arguments, "status": status}


__all__ = ["call_item", "call_of", "chat_tool_choice", "chat_tools", "output_of"]
