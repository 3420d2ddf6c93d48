"""Feeding a tool-call parser's streamer a model output in pieces, as the server does."""

from __future__ import annotations

import re


def stream(parser, text: str, cuts) -> tuple[str, list[dict]]:
    """Feed the output in pieces ending at `cuts`; the concatenated content and calls."""
    s = parser.streamer()
    content, calls = "", []
    prev = 0
    for end in list(cuts) + [len(text)]:
        if end <= prev and end != len(text):
            continue
        prev = end
        for d in s.feed(text[:end], end == len(text)):
            content += d.get("content", "")
            for tc in d.get("tool_calls", []):
                i = tc["index"]
                if i == len(calls):
                    # OpenAI's call_... ids; Mistral's 9 letters and digits (its template's)
                    assert (tc["id"].startswith("call_") or re.fullmatch(
                        "[A-Za-z0-9]{9}", tc["id"])) and tc["type"] == "function"
                    assert tc["function"]["name"]
                    calls.append({"name": tc["function"]["name"], "arguments": ""})
                else:
                    assert "name" not in tc.get("function", {}) and "id" not in tc
                calls[i]["arguments"] += tc["function"].get("arguments", "")
    return content, calls


def every_split(text: str):
    """Chunkings of `text`: one character at a time, then every split into two pieces."""
    yield range(1, len(text))
    for k in range(len(text) + 1):
        yield [k]


def recorded_outputs() -> list[dict]:
    """Real model outputs with their sources and hand-read parses (tests/data/tool_outputs.json)."""
    import json
    from pathlib import Path
    return json.loads((Path(__file__).parent / "data" / "tool_outputs.json").read_text())


def parser_text(rec: dict) -> str:
    """The text a parser sees of a recorded output: the output less the stop token that ended
    it (the engine stops on it and leaves it out of the text)."""
    raw, stop = rec["raw"], rec["stop"]
    if stop is None:
        return raw
    assert raw.endswith(stop), rec["source"]
    return raw[:-len(stop)]
