"""Structured output and tool choice in requests: which grammar a request asks for.

`response_format` (OpenAI: {"type": "json_object"} or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}), vLLM's `structured_outputs` ({"json" |
"regex" | "choice" | "grammar": ...}) and its older `guided_json` / `guided_regex` /
`guided_choice` / `guided_grammar` fields all become one
runtime.structured.StructuredOutputsParams; more than one is a 400. `tool_choice`
"required" and a named function are enforced the same way (tools.py builds their schema).
"""

from __future__ import annotations

from typing import Any

from braze.ir.errors import BrazeError
from braze.runtime.structured import StructuredOutputsParams

from .protocol import bad_request

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


def _extra(req, name: str) -> Any:
    return (req.model_extra or {}).get(name, getattr(req, name, None))


def from_response_format(rf: Any) -> StructuredOutputsParams | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad_request("response_format must be an object with a type: text, json_object, "
                          "json_schema or structural_tag", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("response_format json_schema needs a json_schema object with "
                              "a schema", "response_format")
        schema = js.get("schema", js.get("json_schema"))
        if schema is None:           # OpenAI allows a missing schema: any JSON object
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":     # vLLM's: structures + triggers, or xgrammar's format
        return StructuredOutputsParams(structural_tag={k: v for k, v in rf.items()
                                                       if k != "type"})
    raise bad_request(f"response_format type {kind!r} is not supported; use text, "
                      "json_object, json_schema or structural_tag", "response_format")


def request_constraint(req) -> tuple[StructuredOutputsParams | None, str | None]:
    """The one constraint a completion or chat request asks for and the field it came in,
    or (None, None) (400 for several, or for a malformed one)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = from_response_format(_extra(req, "response_format"))
    if rf is not None:
        found.append(("response_format", rf))
    so = _extra(req, "structured_outputs")
    if so is not None:
        try:
            p = StructuredOutputsParams.of(so)
        except BrazeError as e:
            raise bad_request(str(e), "structured_outputs") from None
        found.append(("structured_outputs", p))
    for field, kind in GUIDED.items():
        v = _extra(req, field)
        if v is not None:
            found.append((field, StructuredOutputsParams(**{kind: v})))
    if len(found) > 1:
        raise bad_request("give at most one of response_format, structured_outputs and "
                          f"guided_*; got {', '.join(f for f, _ in found)}", found[1][0])
    if not found:
        return None, None
    field, p = found[0]
    try:
        p.validate()
    except BrazeError as e:
        raise bad_request(str(e), field) from None
    return p, field
