"""Gemma 4: `<|tool_call>call:NAME{key:value,...}<tool_call|>` per call. Arguments are not
JSON: keys are bare words and strings are quoted with the `<|"|>` token, e.g.
`<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>`; they are
converted to JSON, so a call's arguments are sent in one delta once the call is complete.
Gemma 4 follows its calls with `<|tool_response>` (its turn to wait for the results); that
token right after a call is not content.

The format is the one Gemma 4's chat template writes for assistant tool calls, and the one
of a Gemma 4 reply recorded in transformers' chat-parsing tests (tests/data/tool_outputs.json)."""

from __future__ import annotations

import json
import re

from .base import Call, Parsed, held_back, plain

START, END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
RESPONSE = "<|tool_response>"
SKIP_SPECIAL_TOKENS = False
_NAME = re.compile(r"call:([A-Za-z0-9_.\-]+)\{")


def parse(text: str, final: bool) -> Parsed:
    content, calls, i, after_call = [], [], 0, -1
    while True:
        k = text.find(START, i)
        if k < 0:
            rest = text[i:]
            held = (START, RESPONSE) if calls and i == after_call else (START,)
            content.append(rest if final else rest[:len(rest) - held_back(rest, held)])
            break
        content.append(text[i:k])
        m = _NAME.match(text, k + len(START))
        if m is None:
            if final:
                return plain(text)
            break
        e = text.find(END, m.end())
        if e < 0:
            if final:
                return plain(text)
            calls.append(Call(m.group(1), ""))
            break
        try:
            args = _to_json("{" + text[m.end():e])
        except ValueError:
            if final:
                return plain(text)
            break
        calls.append(Call(m.group(1), args))
        i = after_call = e + len(END)
        if text.startswith(RESPONSE, i):
            i = after_call = i + len(RESPONSE)
    return Parsed("".join(content), calls)


_TOKEN = re.compile(r'\s*(<\|"\|>.*?<\|"\|>|"(?:\\.|[^"\\])*"|[{}\[\],:]|[^\s{}\[\],:]+)', re.S)


def _to_json(src: str) -> str:
    """Gemma's argument syntax -> JSON text (ValueError when it does not parse)."""
    out, pos, expect_key = [], 0, []
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            if src[pos:].strip():
                raise ValueError("bad token")
            break
        tok, pos = m.group(1), m.end()
        if tok.startswith(QUOTE):
            out.append(json.dumps(tok[len(QUOTE):-len(QUOTE)], ensure_ascii=False))
        elif tok in "{[":
            out.append(tok)
            expect_key.append(tok == "{")
        elif tok in "}]":
            if not expect_key:       # a closing bracket with none open: not Gemma's syntax
                raise ValueError("unbalanced brackets")
            out.append(tok)
            expect_key.pop()
        elif tok in ",:":
            out.append(tok)
        elif expect_key and expect_key[-1] and (not out or out[-1] in "{,"):
            out.append(json.dumps(tok if not tok.startswith('"') else json.loads(tok)))
        else:                        # a number, true/false/null, or a bare word: a string
            try:
                json.loads(tok)
                out.append(tok)
            except ValueError:
                out.append(json.dumps(tok, ensure_ascii=False))
    text = "".join(out)
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("arguments are not an object")
    return json.dumps(value, ensure_ascii=False)
