"""DeepSeek-V3 / R1: content, then

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {...}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

and DeepSeek-V3.1's `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`."""

from __future__ import annotations

import json

from .base import Call, Parsed, held_back, plain, skip_ws, value_end

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
SKIP_SPECIAL_TOKENS = False


def parse(text: str, final: bool) -> Parsed:
    k = text.find(CALLS_BEGIN)
    if k < 0:
        return plain(text) if final else Parsed(text[:len(text) - held_back(text, (CALLS_BEGIN,))])
    content, calls = text[:k], []
    i = k + len(CALLS_BEGIN)
    while True:
        i = skip_ws(text, i)
        if text.startswith(CALLS_END, i) or (final and i >= len(text)):
            break
        if i >= len(text) or (not final and CALL_BEGIN.startswith(text[i:])) \
                or (not final and CALLS_END.startswith(text[i:])):
            return Parsed(content, calls)
        if not text.startswith(CALL_BEGIN, i):
            return plain(text) if final else Parsed(content, calls)
        i += len(CALL_BEGIN)
        s = text.find(SEP, i)
        if s < 0:
            return plain(text) if final else Parsed(content, calls)
        kind = text[i:s]
        j = s + len(SEP)
        if kind == "function":                   # V3: the name on its own line, then ```json
            nl = text.find("\n", j)
            if nl < 0:
                return plain(text) if final else Parsed(content, calls)
            name = text[j:nl].strip()
            if not name:                         # a call names its function
                return plain(text) if final else Parsed(content, calls)
            fence = skip_ws(text, nl)
            if not text.startswith("```json", fence):
                if final or not "```json".startswith(text[fence:]):
                    return plain(text) if final else Parsed(content, calls + [Call(name, "")])
                return Parsed(content, calls + [Call(name, "")])
            j = skip_ws(text, fence + len("```json"))
        else:                                    # V3.1: NAME<｜tool▁sep｜>{...}
            name = kind.strip()
            j = skip_ws(text, j)
        if not name:                             # a call names its function
            return plain(text) if final else Parsed(content, calls)
        end = value_end(text, j) if j < len(text) else None
        if end is None:
            if final:
                return plain(text)
            calls.append(Call(name, text[j:] if j < len(text) and text[j] == "{" else ""))
            return Parsed(content, calls)
        args = text[j:end]
        calls.append(Call(name, args))
        i = skip_ws(text, end)
        if kind == "function":
            if text.startswith("```", i):
                i += 3
            elif not final and "```".startswith(text[i:]):
                return Parsed(content, calls)
            else:
                return plain(text) if final else Parsed(content, calls)
            i = skip_ws(text, i)
        if text.startswith(CALL_END, i):
            i += len(CALL_END)
        elif not final and CALL_END.startswith(text[i:]):
            return Parsed(content, calls)
        elif not (final and i >= len(text)):
            return plain(text) if final else Parsed(content, calls)
    if final:
        try:
            if not all(isinstance(json.loads(c.arguments), dict) for c in calls) or not calls:
                return plain(text)
        except ValueError:
            return plain(text)
    return Parsed(content, calls)
