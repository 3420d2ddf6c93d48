"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
one block per call, text allowed around them. Hermes 2 Pro and Hermes 3 make the tags
special tokens, so the request keeps special tokens in the text (as vLLM's hermes parser
asks); Qwen's are plain added tokens."""

from __future__ import annotations

from .base import Parsed, call_from_scan, held_back, plain, scan_call_object, skip_ws

START, END = "<tool_call>", "</tool_call>"
SKIP_SPECIAL_TOKENS = False


def parse(text: str, final: bool) -> Parsed:
    return parse_tagged(text, final, START, END)


def parse_tagged(text: str, final: bool, start: str, end: str, name_keys=("name",),
                 arg_keys=("arguments", "parameters")) -> Parsed:
    """Calls as JSON objects between `start` and `end` tags; content is the text outside."""
    content, calls, i = [], [], 0
    while True:
        k = text.find(start, i)
        if k < 0:
            rest = text[i:]
            content.append(rest if final else rest[:len(rest) - held_back(rest, (start,))])
            break
        content.append(text[i:k])
        j = skip_ws(text, k + len(start))
        if j >= len(text):
            break
        if text[j] != "{":
            return plain(text) if final else Parsed("".join(content), calls)
        s = scan_call_object(text, j, name_keys, arg_keys)
        call = call_from_scan(text, s, final)
        if call is None or not s.valid:
            return plain(text) if final else Parsed("".join(content), calls)
        calls.append(call)
        if s.end is None:
            break
        e = skip_ws(text, s.end)
        if text.startswith(end, e):
            i = e + len(end)
        elif final and e >= len(text):        # stopped right after the object
            i = e
        elif end.startswith(text[e:]) and not final:
            break
        else:
            return plain(text) if final else Parsed("".join(content), calls)
    return Parsed("".join(content), calls)
