"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the reply starts with `{"name": ..., "parameters":
{...}}` (optionally after `<|python_tag|>`), several separated by `;`. Text after the last
call is content (Llama 3 goes on to explain the call now and then). A reply that does not
start that way is plain content."""

from __future__ import annotations

from .base import Parsed, call_from_scan, plain, scan_call_object, skip_ws

TAG = "<|python_tag|>"
SKIP_SPECIAL_TOKENS = False


def parse(text: str, final: bool) -> Parsed:
    j = skip_ws(text, 0)
    if text.startswith(TAG, j):
        j = skip_ws(text, j + len(TAG))
    elif TAG.startswith(text[j:]) and not final:
        return Parsed("", [])                 # could still become the tag
    if j >= len(text):
        return plain(text) if final else Parsed("", [])
    if text[j] != "{":
        return plain(text)
    calls = []
    while True:
        s = scan_call_object(text, j, arg_keys=("parameters", "arguments"))
        call = call_from_scan(text, s, final)
        if call is None or not s.valid:
            return plain(text) if final or not calls and not s.valid else Parsed("", calls)
        calls.append(call)
        if s.end is None:
            break
        j = skip_ws(text, s.end)
        if j >= len(text):
            break
        if text[j] != ";":
            return Parsed(text[s.end:], calls)        # prose after the calls
        j = skip_ws(text, j + 1)
        if j >= len(text):
            break
        if text[j] != "{":
            return plain(text) if final else Parsed("", calls)
    return Parsed("", calls)
