"""OpenAI's Responses API, `POST /v1/responses`, for text: what vLLM serves there without
tools. The request is read as the chat it is (`input`: a string, one user message, or a
list of messages whose content is a string or input_text/output_text parts;
`instructions`: a system message before them) and runs as /v1/chat/completions runs it
(the chat template, the same sampling fields, `max_output_tokens` as max_tokens). The
reply is one assistant message of one output_text part:

    {"id": "resp_...", "object": "response", "status": "completed" | "incomplete",
     "incomplete_details": null | {"reason": "max_output_tokens"}, "output": [message],
     "usage": {"input_tokens", "output_tokens", "total_tokens", ...}, ...}

Streamed (`stream: true`), the events are OpenAI's, each `event: TYPE` + `data: {...}` with
a `sequence_number`: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta (as text comes),
response.output_text.done, response.content_part.done, response.output_item.done, then
response.completed or response.incomplete (the whole response). `text.format`
json_schema or json_object constrains the text as the chat's `response_format` does
(serving/structured.py). `usage.input_tokens_details.cached_tokens` counts the prompt
tokens the prefix cache served. With --reasoning-parser (runtime/reasoning.py) a reply that
reasons gets a `reasoning` output item before its message, as vLLM's does, and
`reasoning_tokens` counts it. Fields that would need state or tools braze does not keep
(previous_response_id, tools, ...) are a 400 naming them, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from braze.runtime.chat_template import not_text_part
from braze.runtime.sampler import SamplingParams

from .async_engine import Aborted, Rejected, Unavailable
from .lora_routes import lora_for, response_model
from .protocol import (
    ROLES,
    APIError,
    ChatCompletionRequest,
    bad_request,
    chat_max_tokens,
    check_context,
    first_set,
    response_ids,
    sampling_kwargs,
    truncation,
    validation_message,
)
from .structured import request_constraint


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[Any]          # messages: each item is checked by _message
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: Any = None



# Responses fields that need what braze does not have (stored responses, tools, other
# output formats), with their neutral values: anything else is a 400 naming the field
_NOT_SUPPORTED: dict[str, tuple] = {
    "previous_response_id": (None,),
    "conversation": (None,),
    "prompt": (None,),
    "tools": (None, []),
    "tool_choice": (None, "auto", "none"),
    "background": (None, False),
    "include": (None, []),
    "truncation": (None, "disabled"),
    "top_logprobs": (None, 0),
    "n": (None, 1),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "logprobs": (None, False),      # chat's; the Responses API's is include + top_logprobs
    "echo": (None, False),
    # chat's extensions whose results a Responses reply has no place for
    "prompt_logprobs": (None,),
    "return_token_ids": (None, False),
}
# chat completions' fields that the Responses API spells its own way: a 400 saying so
# (dropped, `max_tokens: 3` ran the reply to the end of the context)
_CHAT_SPELLINGS = {"messages": "input", "max_tokens": "max_output_tokens",
                   "max_completion_tokens": "max_output_tokens"}
# Responses fields with nothing to do here (nothing is stored, there are no tools)
_NOT_PASSED = ("stream_options", "store", "parallel_tool_calls", "service_tier",
               "prompt_cache_key", "safety_identifier", "max_tool_calls")

_TEXT_PARTS = ("input_text", "output_text", "text")


def response_format(text: Any) -> dict | None:
    """`text` ({"format": {"type": "text" | "json_object" | "json_schema", ...}}) as the
    chat's response_format, or None for plain text; 400 naming `text` otherwise."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("text must be an object: {\"format\": {\"type\": ...}}", "text")
    other = sorted(set(text) - {"format", "verbosity"})
    if other:
        raise bad_request(f"text.{other[0]} is not supported by this server's /v1/responses; "
                          "leave it out", "text")
    if text.get("verbosity") not in (None, "medium"):
        raise bad_request(f"text.verbosity {json.dumps(text['verbosity'])[:40]} is not "
                          "supported by this server's /v1/responses; leave it out", "text")
    f = text.get("format")
    if f is None:
        return None
    kind = f.get("type") if isinstance(f, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(f.get("schema"), dict):
            raise bad_request("text.format json_schema needs a schema (a JSON Schema object) "
                              "and a name", "text")
        return {"type": "json_schema", "json_schema": {
            k: f[k] for k in ("name", "schema", "strict", "description") if k in f}}
    raise bad_request(f"text.format type {json.dumps(kind)[:40]} is not supported by this "
                      "server's /v1/responses; use text, json_object or json_schema", "text")


def constraint_of(body: ResponsesRequest, chat: ChatCompletionRequest):
    """The grammar the request asks for (text.format, or the chat's own fields sent as
    extras) and the field to name in its errors."""
    from_text = response_format(body.text) is not None
    try:
        constraint, field = request_constraint(chat)
    except APIError as e:
        if from_text and e.param == "response_format":
            e.param = "text"
        raise
    return constraint, "text" if from_text and field == "response_format" else field


def chat_of(body: ResponsesRequest, text_only_origin: str | None = None
            ) -> ChatCompletionRequest:
    """The chat completion request that `body` asks for; 400 naming what it cannot be.
    `text_only_origin`: the multimodal architecture a text-only artifact came from."""
    found = first_set(body, _NOT_SUPPORTED)
    if found is not None:
        name, v = found
        raise bad_request(f"{name} is not supported by this server's /v1/responses (got "
                          f"{name}={json.dumps(v, default=str)[:60]}); leave it out", name)
    for name, ours in _CHAT_SPELLINGS.items():
        if (body.model_extra or {}).get(name) is not None:
            raise bad_request(f"{name} is a chat completions field; /v1/responses takes "
                              f"{ours} instead", name)
    messages = [{"role": "system", "content": body.instructions}] \
        if body.instructions is not None else []
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        messages += _messages(body.input, text_only_origin)
    if not messages:
        raise bad_request("input is empty: give a string or a list of messages", "input")
    extra = {k: v for k, v in (body.model_extra or {}).items()
             if k not in _NOT_PASSED and k not in _NOT_SUPPORTED and k not in _CHAT_SPELLINGS}
    fmt = response_format(body.text)
    if fmt is not None:
        if extra.get("response_format") is not None:
            raise bad_request("give text.format or response_format, not both (text.format "
                              "is the Responses API's)", "text")
        extra["response_format"] = fmt
    effort = _effort(extra.pop("reasoning", None))
    if effort is not None:
        extra["reasoning_effort"] = effort
    fields = {**extra, "model": body.model, "messages": messages,
              "max_tokens": body.max_output_tokens, "temperature": body.temperature,
              "top_p": body.top_p, "stream": body.stream, "user": body.user}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise bad_request(message, param) from None


def _effort(reasoning: Any) -> str | None:
    """`reasoning` ({"effort": ...}): the effort, which goes to the chat template as chat's
    reasoning_effort does (vLLM's); a summary braze cannot write is a 400 naming it."""
    if reasoning is None:
        return None
    if not isinstance(reasoning, dict):
        raise bad_request("reasoning must be an object: {\"effort\": ...}", "reasoning")
    for key in sorted(set(reasoning) - {"effort"}):
        if reasoning[key] is not None:
            raise bad_request(f"reasoning.{key} is not supported by this server's "
                              f"/v1/responses (it writes no reasoning summaries); leave it "
                              f"out", "reasoning")
    return reasoning.get("effort")


def _messages(items: list, text_only_origin: str | None = None) -> list[dict]:
    """The input items as chat messages. A reasoning item (an earlier reply's, sent back
    as vLLM's clients do) goes with the assistant message after it, as its reasoning;
    with none after it, it is an assistant turn of its own, as vLLM renders it."""
    out, thought = [], None
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "reasoning":
            thought = (thought or "") + _reasoning_text(item, i)
            continue
        m = _message(item, i, text_only_origin)
        if thought is not None:
            if m["role"] == "assistant":
                m["reasoning"] = thought
            else:
                out.append({"role": "assistant", "content": "", "reasoning": thought})
            thought = None
        out.append(m)
    if thought is not None:
        out.append({"role": "assistant", "content": "", "reasoning": thought})
    return out


def _reasoning_text(item: dict, i: int) -> str:
    parts = item.get("content") or []
    if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
        raise bad_request(f"input[{i}] is a reasoning item whose content is not a list of "
                          "reasoning_text parts ({\"type\": \"reasoning_text\", \"text\": ...})",
                          "input")
    return "".join(p["text"] for p in parts)


def _message(item: Any, i: int, text_only_origin: str | None = None) -> dict:
    where = f"input[{i}]"
    if not isinstance(item, dict) or item.get("type", "message") != "message" \
            or not isinstance(item.get("role"), str):
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        raise bad_request(f"{where} is of type {kind!r}; this server's /v1/responses takes "
                          "messages ({\"role\", \"content\"}) only", "input")
    if item["role"] not in ROLES:
        raise bad_request(f"{where}.role is {json.dumps(item['role'])[:40]}; a role is one "
                          f"of {', '.join(ROLES)}", "input")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for j, p in enumerate(content):
            if isinstance(p, dict) and isinstance(p.get("type"), str) \
                    and p["type"] not in _TEXT_PARTS:
                raise bad_request(not_text_part(f"{where}.content[{j}]", p["type"],
                                                text_only_origin, "input_text"), "input")
            if not isinstance(p, dict) or p.get("type") not in _TEXT_PARTS \
                    or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise bad_request(f"{where}.content[{j}] is of type {kind!r}; send "
                                  "input_text parts", "input")
            texts.append(p["text"])
        content = [{"type": "text", "text": t} for t in texts]
    elif not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string or a list of input_text parts",
                          "input")
    return {"role": item["role"], "content": content}


def install(app: FastAPI, svc, while_connected) -> None:
    """`while_connected(request, coroutine)`: app._while_connected (a non-streamed request
    is cancelled when its client goes away)."""

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        svc.check_model(body.model)
        chat = chat_of(body, svc.text_only_origin)
        max_tokens = chat_max_tokens(chat)
        try:
            ids = await svc.prompts.chat(chat, chat.add_special_tokens, for_model=True,
                                         keep=truncation(chat, svc.max_model_len))
        except APIError as e:        # the messages are this request's input
            if e.param == "messages":
                e.param = "input"
            raise
        if max_tokens is None:
            max_tokens = svc.unset_max_tokens(len(ids))
        elif len(ids) < svc.max_model_len:      # else the engine says the prompt is too long
            check_context(len(ids), max_tokens, svc.max_model_len, "max_output_tokens")
        constraint, field = constraint_of(body, chat)
        await svc.compile_grammar(constraint, field)
        kw = sampling_kwargs(chat, max_tokens, svc.sampling_defaults)
        reasoning = None
        if svc.reasoning is not None:   # a reasoning item before the message (vLLM's)
            reasoning = svc.reasoning.reply(ids)
            kw["skip_special_tokens"] = svc.reasoning.skip_special_tokens(kw["skip_special_tokens"])
        params = SamplingParams(**kw, structured_outputs=constraint)
        rid, engine_rid = response_ids(request.scope, "resp_")
        reply = _Reply(svc, body, len(ids), params, reasoning, rid)
        svc.admit()
        stream = await svc.submit(engine_rid, ids, params, prompt_param="input",
                                  lora=lora_for(svc, body.model), bounded=False,
                                  cache_salt=chat.cache_salt, priority=chat.priority)
        if body.stream:
            return StreamingResponse(reply.events(stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            whole = await while_connected(request, reply.whole(stream))
        finally:        # the client went away (a no-op once the request has finished)
            stream.abort("the client disconnected")
        return JSONResponse(whole)


class _Reply:
    """One response: its object as it stands, and its stream of events."""

    def __init__(self, svc, body: ResponsesRequest, num_prompt_tokens: int,
                 params: SamplingParams, reasoning=None, rid: str | None = None):
        self.body, self.params = body, params
        # with --reasoning-parser, the runtime/reasoning.Reply that splits the text
        self.reasoning = reasoning
        self.id = rid or "resp_" + uuid.uuid4().hex
        self.item_id = "msg_" + uuid.uuid4().hex
        self.reasoning_id = "rs_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = response_model(svc, body.model)
        self.num_prompt_tokens = num_prompt_tokens
        self.seq = 0

    def response(self, status: str, text: str | None = None, out=None) -> dict:
        """The response object; `text` and `out` (the final RequestOutput) once done."""
        done = out is not None
        incomplete = done and out.finish_reason == "length"
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "model": self.model, "output": self.output(text, status) if done else [],
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": self.reasoning_param(),
            "store": False, "temperature": self.params.temperature,
            "text": {"format": (b.text or {}).get("format") or {"type": "text"}},
            "tool_choice": "none", "tools": [],
            "top_p": self.params.top_p, "truncation": "disabled",
            "usage": self.usage(out) if done else None, "user": b.user,
            "metadata": b.metadata or {},
        }

    def reasoning_param(self) -> dict | None:
        """The request's `reasoning`, as OpenAI echoes it."""
        effort = _effort((self.body.model_extra or {}).get("reasoning"))
        return None if effort is None else {"effort": effort, "summary": None}

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, answer) of the reply's text; no reasoning without a parser."""
        return (None, text) if self.reasoning is None else self.reasoning.split(text)

    def output(self, text: str, status: str) -> list[dict]:
        """The output items: a reasoning item when the reply reasoned, then the message
        (none for a reply cut off while still reasoning)."""
        think, answer = self.split(text)
        done = "completed" if answer is not None else status     # the reasoning ended
        items = [self.reasoning_item(think, done)] if think else []
        return items + ([] if answer is None else [self.message(answer, status)])

    def reasoning_item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {"id": self.reasoning_id, "type": "reasoning", "summary": [],
                "content": content, "encrypted_content": None, "status": status}

    def message(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"id": self.item_id, "type": "message", "role": "assistant",
                "status": status, "content": content}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def usage(self, out) -> dict:
        n = len(out.token_ids)
        return {"input_tokens": self.num_prompt_tokens, "output_tokens": n,
                "total_tokens": self.num_prompt_tokens + n,
                "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens(out)}}

    def reasoning_tokens(self, out) -> int:
        return 0 if self.reasoning is None else self.reasoning.reasoning_tokens(out.token_ids)

    @staticmethod
    def status(out) -> str:
        return "incomplete" if out.finish_reason == "length" else "completed"

    async def whole(self, stream) -> dict:
        try:
            out = None
            async for out in stream:
                pass
        except Rejected as e:
            raise bad_request(str(e)) from None
        except (Aborted, Unavailable) as e:
            raise APIError(503, str(e), "service_unavailable", None, "aborted") from None
        except asyncio.CancelledError:     # its client went away (while_connected)
            stream.abort("the client disconnected")
            raise
        if out is None or out.finish_reason not in ("stop", "length"):
            raise APIError(503, f"the request ended with finish_reason "
                           f"{getattr(out, 'finish_reason', None)!r}", "service_unavailable",
                           None, "aborted")
        return self.response(self.status(out), out.text or "", out)

    def event(self, kind: str, **fields) -> bytes:
        d = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(d, separators=(',', ':'))}\n\n".encode()

    async def events(self, stream):
        done = False
        try:
            yield self.event("response.created", response=self.response("in_progress"))
            yield self.event("response.in_progress", response=self.response("in_progress"))
            items = _StreamItems(self)
            if self.reasoning is None:      # the message from the start
                for e in items.open_message():
                    yield e
            splitter = None if self.reasoning is None else self.reasoning.splitter()
            text, out = [], None
            async for out in stream:
                if not out.new_text:
                    continue
                text.append(out.new_text)
                if splitter is None:
                    said, think = out.new_text, ""
                else:
                    think, said = splitter.feed("".join(text), False)
                for e in items.deltas(think, said):
                    yield e
            if out is None or out.finish_reason not in ("stop", "length"):
                raise Aborted(f"the request ended with finish_reason "
                              f"{getattr(out, 'finish_reason', None)!r}")
            text = "".join(text)
            if splitter is not None:         # what the end of the text showed
                think, said = splitter.feed(text, True)
                for e in items.deltas(think, said, splitter.content is not None):
                    yield e
            status = self.status(out)
            for e in items.close(text, status):
                yield e
            yield self.event(f"response.{status}", response=self.response(status, text, out))
            done = True
        except (Aborted, Unavailable, Rejected) as e:
            kind = "invalid_request_error" if isinstance(e, Rejected) else "server_error"
            yield self.event("error", code=kind, message=str(e), param=None)
            done = True
        finally:
            if not done:           # the client went away
                stream.abort()


class _StreamItems:
    """A streamed response's output items as they open and close: the reasoning item (with
    --reasoning-parser, once the reply reasons), then the message (once it answers)."""

    def __init__(self, reply: _Reply):
        self.reply = reply
        self.next_index = 0
        self.reasoning_at = self.message_at = None
        self.thought = ""               # the reasoning text streamed so far
        self.reasoning_closed = False

    def _where(self, at: int, item_id: str) -> dict:
        return {"item_id": item_id, "output_index": at, "content_index": 0}

    def open_message(self) -> list[bytes]:
        r = self.reply
        self.message_at, self.next_index = self.next_index, self.next_index + 1
        return [r.event("response.output_item.added", output_index=self.message_at,
                        item=r.message(None, "in_progress")),
                r.event("response.content_part.added",
                        **self._where(self.message_at, r.item_id), part=r.part(""))]

    def deltas(self, think: str, said: str, answering: bool = False) -> list[bytes]:
        """Events for new reasoning text `think` and answer text `said` (`answering`: the
        reply has reached its answer, even with no text of it yet)."""
        r, ev = self.reply, []
        if think:
            if self.reasoning_at is None:
                self.reasoning_at, self.next_index = self.next_index, self.next_index + 1
                ev.append(r.event("response.output_item.added", output_index=self.reasoning_at,
                                  item=r.reasoning_item(None, "in_progress")))
            ev.append(r.event("response.reasoning_text.delta",
                              **self._where(self.reasoning_at, r.reasoning_id), delta=think))
            self.thought += think
        if (said or answering) and self.message_at is None:
            ev += self.close_reasoning("completed") + self.open_message()
        if said:
            ev.append(r.event("response.output_text.delta",
                              **self._where(self.message_at, r.item_id), delta=said,
                              logprobs=[]))
        return ev

    def close_reasoning(self, status: str) -> list[bytes]:
        """The reasoning item's done events (once, and only if it opened): before the
        message opens, or at the end."""
        r = self.reply
        if self.reasoning_at is None or self.reasoning_closed:
            return []
        self.reasoning_closed = True
        return [r.event("response.reasoning_text.done",
                        **self._where(self.reasoning_at, r.reasoning_id), text=self.thought),
                r.event("response.output_item.done", output_index=self.reasoning_at,
                        item=r.reasoning_item(self.thought, status))]

    def close(self, text: str, status: str) -> list[bytes]:
        """The done events of the items still open, with the whole text of each."""
        r = self.reply
        _, answer = r.split(text)
        ev = self.close_reasoning(status)
        if self.message_at is not None:
            where = self._where(self.message_at, r.item_id)
            answer = answer or ""
            ev += [r.event("response.output_text.done", **where, text=answer, logprobs=[]),
                   r.event("response.content_part.done", **where, part=r.part(answer)),
                   r.event("response.output_item.done", output_index=self.message_at,
                           item=r.message(answer, status))]
        return ev


__all__ = ["ResponsesRequest", "chat_of", "install"]
