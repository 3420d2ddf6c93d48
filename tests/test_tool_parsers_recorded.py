"""Each tool-call parser on real model outputs recorded in public issues, model cards and docs
(tests/data/tool_outputs.json: the raw text, where it was published, what it shows, and the
parse read off it by hand). The whole-output parse must give that content and those calls,
and streaming the output split at every character boundary (so at every token boundary of
any tokenizer) must send the same content and calls in deltas."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tool_helpers import every_split, parser_text, recorded_outputs, stream

from braze.serving.tool_parsers import ToolParser, final_message

RECORDED = recorded_outputs()


def ids():
    seen = {}
    out = []
    for rec in RECORDED:
        seen[rec["parser"]] = seen.get(rec["parser"], 0) + 1
        out.append(f"{rec['parser']}-{seen[rec['parser']]}")
    return out


def test_every_parser_has_recorded_outputs():
    from braze.serving.tool_parsers import PARSERS
    counts = {name: sum(r["parser"] == name for r in RECORDED) for name in PARSERS}
    assert min(counts.values()) >= 2, counts
    for rec in RECORDED:
        assert rec["source"] and rec["note"] and rec["model"]


@pytest.mark.parametrize("rec", RECORDED, ids=ids())
def test_recorded_output_parses_as_read(rec):
    text = parser_text(rec)
    content, calls = final_message(ToolParser(rec["parser"]).parse(text, final=True))
    assert content == rec["content"]
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert got == [(c["name"], c["arguments"]) for c in rec["calls"]]
    for c in calls:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


@pytest.mark.parametrize("rec", RECORDED, ids=ids())
def test_recorded_output_streams_like_it_parses(rec):
    parser = ToolParser(rec["parser"])
    text = parser_text(rec)
    content, calls = final_message(parser.parse(text, final=True))
    want = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in calls]
    for cuts in every_split(text):
        s_content, s_calls = stream(parser, text, cuts)
        assert (s_content, s_calls) == (content or "", want), cuts


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.data())
def test_recorded_outputs_stream_alike_in_any_chunks(data):
    """Beyond one and two pieces: any chunking of any recorded output (several cuts at once,
    so a marker, an escape or a multi-byte character can be split more than once)."""
    rec = data.draw(st.sampled_from(RECORDED), label="recorded output")
    parser = ToolParser(rec["parser"])
    text = parser_text(rec)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12),
                            label="cuts"))
    content, calls = final_message(parser.parse(text, final=True))
    want = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in calls]
    assert stream(parser, text, cuts) == (content or "", want)
