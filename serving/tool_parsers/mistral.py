"""Mistral: `[TOOL_CALLS]` (a special token: the request keeps it in the text), then either a
JSON array `[{"name": ..., "arguments": {...}}, ...]` (tokenizer v3..v7) or, from tokenizer
v11, `name[ARGS]{...}` per call, each call after its own `[TOOL_CALLS]` (newer templates put
`[CALL_ID]id` before `[ARGS]`). Text after the calls is content.

Call ids are 9 letters and digits, as vLLM gives Mistral's: Mistral's chat templates refuse
any other id in the history ("Tool call IDs should be alphanumeric strings with length 9!"),
so a client sending back the calls it got, with their results, gets the next turn."""

from __future__ import annotations

import json
import secrets
import string

from .base import (Call, Parsed, call_from_scan, held_back, plain, scan_call_object, skip_ws,
                   value_end)

MARKER, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
SKIP_SPECIAL_TOKENS = False
_ID_CHARS = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


def parse(text: str, final: bool) -> Parsed:
    k = text.find(MARKER)
    if k >= 0 and not text[skip_ws(text, k + len(MARKER)):].startswith("["):
        j = skip_ws(text, k + len(MARKER))
        if j < len(text) or final:
            return _parse_v11(text, final, k)
    return parse_array_after(text, final, MARKER)


def parse_array_after(text: str, final: bool, marker: str) -> Parsed:
    """Content, then `marker`, then a JSON array of call objects; text after the array's
    closing bracket is content too (Mistral 7B and Phi-4-mini sometimes go on talking)."""
    k = text.find(marker)
    if k < 0:
        return plain(text) if final else Parsed(text[:len(text) - held_back(text, (marker,))])
    content = text[:k]
    j = skip_ws(text, k + len(marker))
    if j >= len(text):
        return plain(text) if final else Parsed(content)
    if text[j] != "[":
        return plain(text) if final else Parsed(content)
    calls = []
    j = skip_ws(text, j + 1)
    while j < len(text):
        if text[j] == "]" and (calls or final):
            return Parsed(content + text[j + 1:], calls)
        if text[j] != "{":
            return plain(text) if final else Parsed(content, calls)
        s = scan_call_object(text, j)
        call = call_from_scan(text, s, final)
        if call is None or not s.valid:
            return plain(text) if final else Parsed(content, calls)
        calls.append(call)
        if s.end is None:
            break
        j = skip_ws(text, s.end)
        if j < len(text) and text[j] == ",":
            j = skip_ws(text, j + 1)
    return plain(text) if final else Parsed(content, calls)


def _parse_v11(text: str, final: bool, k: int) -> Parsed:
    content, calls = text[:k], []
    i = k
    while i < len(text):
        if not text.startswith(MARKER, i):            # prose after a call
            m = text.find(MARKER, i)
            if m < 0:
                rest = text[i:]
                content += rest if final else rest[:len(rest) - held_back(rest, (MARKER,))]
                break
            content, i = content + text[i:m], m
        i += len(MARKER)
        a = text.find(ARGS, i)
        if a < 0:
            if final:
                return plain(text)
            break
        name = text[i:a].split(CALL_ID)[0].strip()      # NAME[CALL_ID]ID[ARGS]: the id is ours
        if not name:                                    # a call names its function
            return plain(text) if final else Parsed(content, calls)
        j = skip_ws(text, a + len(ARGS))
        if j >= len(text):
            calls.append(Call(name, ""))
            break
        end = value_end(text, j)
        args = text[j:end if end is not None else len(text)]
        calls.append(Call(name, args))
        if end is None:
            if final:
                return plain(text)
            break
        i = end
    if final:
        try:
            if not all(isinstance(json.loads(c.arguments), dict) for c in calls):
                return plain(text)
        except ValueError:
            return plain(text)
    return Parsed(content, calls)

