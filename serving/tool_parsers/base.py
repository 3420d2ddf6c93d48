"""What every tool-call parser shares: the parse result, JSON scanning that works on
unfinished text, and the streamer that turns successive parses into OpenAI deltas.

A parser is one function `parse(text, final) -> Parsed`. With `final=False` the text is
a prefix of the model's output (while it streams) and the result must only ever grow as
more text comes: `content` is the text outside tool calls that can no longer turn out to
be part of a call marker, each call's `name` appears once complete, and `arguments` is a
prefix of the call's final arguments text. With `final=True` the text is the whole output
and the result is what a non-streamed response carries; output that does not parse as
tool calls comes back as plain content. `ToolStreamer` diffs successive parses into
deltas, so the concatenated deltas equal the final parse whenever the output parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass
class Call:
    name: str | None = None          # None until the whole name has been generated
    arguments: str = ""              # JSON text of the arguments (a prefix while streaming)


@dataclass
class Parsed:
    content: str = ""
    calls: list[Call] = field(default_factory=list)


def plain(text: str) -> Parsed:
    return Parsed(text, [])


def new_call_id() -> str:
    """A tool call's id, as OpenAI writes them. A parser module whose model's chat template
    wants another shape back in the history defines its own `new_call_id`."""
    return "call_" + uuid.uuid4().hex[:24]


# ---- scanning JSON in unfinished text -----------------------------------------------------

_WS = " \t\r\n"


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """Index just past the JSON value starting at text[i], or None if it is not finished
    in `text` (strings and brackets are matched; escapes inside strings respected)."""
    n = len(text)
    if i >= n:
        return None
    c = text[i]
    if c == '"':
        j = i + 1
        while j < n:
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    if c in "{[":
        depth, j, in_str = 0, i, False
        while j < n:
            ch = text[j]
            if in_str:
                if ch == "\\":
                    j += 2
                    continue
                if ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i                       # number, true, false, null: ends at a delimiter
    while j < n and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < n else None


@dataclass
class ObjectScan:
    """A JSON object `{"name": ..., "arguments": {...}}` scanned so far."""
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None      # None while the arguments value is unfinished
    end: int | None = None           # index past the closing brace, once there
    valid: bool = True               # False: not an object of this shape


def scan_call_object(text: str, i: int, name_keys=("name",),
                     arg_keys=("arguments", "parameters")) -> ObjectScan:
    """Scan the object starting at text[i] == "{" for its name and arguments value."""
    out = ObjectScan()
    n = len(text)
    j = skip_ws(text, i + 1)
    while True:
        if j >= n:
            return out
        if text[j] == "}":
            out.end = j + 1
            return out
        if text[j] != '"':
            out.valid = False
            return out
        k_end = value_end(text, j)
        if k_end is None:
            return out
        try:
            key = json.loads(text[j:k_end])
        except ValueError:
            out.valid = False
            return out
        j = skip_ws(text, k_end)
        if j >= n:
            return out
        if text[j] != ":":
            out.valid = False
            return out
        j = skip_ws(text, j + 1)
        if j >= n:
            return out
        v_end = value_end(text, j)
        if key in arg_keys and out.args_start is None:
            out.args_start, out.args_end = j, v_end
        elif key in name_keys and v_end is not None and out.name is None:
            try:
                name = json.loads(text[j:v_end])
            except ValueError:
                name = None
            if not isinstance(name, str) or not name:      # a call names its function
                out.valid = False
                return out
            out.name = name
        if v_end is None:
            return out
        j = skip_ws(text, v_end)
        if j < n and text[j] == ",":
            j = skip_ws(text, j + 1)


def call_from_scan(text: str, s: ObjectScan, final: bool) -> Call | None:
    """The Call an object scan gives; None when a finished object is not a valid call. A
    finished object is judged the same while the output streams (`final` False) as in the
    whole output, so a stream never sends as a call, or leaves out of its content, what the
    whole response shows as text."""
    if s.args_start is None:
        args = "{}" if s.end is not None else ""
    elif text[s.args_start] == '"':
        # arguments written as a JSON string holding JSON: sent once it is complete
        args = ""
        if s.args_end is not None:
            try:
                args = json.loads(text[s.args_start:s.args_end])
            except ValueError:
                return None
    else:
        args = text[s.args_start:s.args_end if s.args_end is not None else len(text)]
    if final or s.end is not None:
        if s.end is None or s.name is None or not s.valid:
            return None
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except ValueError:
            return None
    return Call(s.name, args)


def held_back(text: str, markers) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker (it may
    become the marker, so it must not be sent as content yet)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


# ---- streaming -------------------------------------------------------------------------

class ToolStreamer:
    """Turns a growing output into OpenAI chat deltas with a parser.

    `feed(text, finished)` takes the whole output so far and returns the delta dicts to
    send (`{"content": ...}` or `{"tool_calls": [...]}`); `calls` counts the tool calls
    sent, so the caller knows to finish with "tool_calls".
    """

    def __init__(self, parse, new_id=new_call_id):
        self.parse, self.new_id = parse, new_id
        self.content_sent = 0
        self.sent: list[tuple[str, int]] = []     # per call: (id, argument chars sent)

    @property
    def calls(self) -> int:
        return len(self.sent)

    def feed(self, text: str, finished: bool) -> list[dict]:
        p = self.parse(text, finished)
        if finished and self.sent and not p.calls:
            # calls went out but the whole output does not parse (cut by max_tokens, say):
            # keep what was sent rather than resend it all as text
            p = self.parse(text, False)
        deltas = []
        content = p.content.strip() if finished else p.content.lstrip().rstrip()
        if len(content) > self.content_sent:
            deltas.append({"content": content[self.content_sent:]})
            self.content_sent = len(content)
        for i, call in enumerate(p.calls):
            if call.name is None:
                break                            # calls go out in order, names first
            if i == len(self.sent):
                cid = self.new_id()
                self.sent.append((cid, 0))
                deltas.append({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                               "function": {"name": call.name,
                                                            "arguments": ""}}]})
            cid, n = self.sent[i]
            if len(call.arguments) > n:
                deltas.append({"tool_calls": [{"index": i, "function": {
                    "arguments": call.arguments[n:]}}]})
                self.sent[i] = (cid, len(call.arguments))
        return deltas


def final_message(parsed: Parsed, new_id=new_call_id) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) for a non-streamed response. The content is trimmed at both ends
    with or without calls, as `ToolStreamer` sends it, so both responses carry the same text."""
    calls = [{"id": new_id(), "type": "function",
              "function": {"name": c.name, "arguments": c.arguments}} for c in parsed.calls]
    content = parsed.content.strip()
    return (content or None) if calls else content, calls
