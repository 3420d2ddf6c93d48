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
`reasoning_tokens` counts it. With --enable-responses-store, responses are kept
(serving/responses_store.py): `previous_response_id` goes on with a stored conversation,
`background` runs a reply while the client polls, and GET / DELETE /v1/responses/{id},
/input_items and /cancel answer. Function `tools` and `tool_choice` work as on chat
(serving/responses_tools.py): calls come back as function_call items, and function_call /
function_call_output items in the input are the chat's tool turns. Fields that would need
what braze does not have (hosted tools, ...) are a 400 naming them, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from braze.runtime.chat_template import not_text_part
from braze.runtime.sampler import SamplingParams

from .async_engine import Aborted, Rejected, Unavailable
from .lora_routes import lora_for, response_model
from . import responses_store as stored
from . import responses_tools
from .responses_stream import StreamItems, ToolStreamItems
from . import responses as R
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
from .tools import held_to
from .tools import plan as tools_plan

log = logging.getLogger("braze.serving")


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
    store: bool | None = None               # OpenAI's default: true (kept if the server keeps any)
    background: bool | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # OpenAI's: "auto" drops the conversation's oldest turns until the prompt fits
    truncation: Literal["auto", "disabled"] | None = None


# Responses fields that need what braze does not have (conversations objects, tools, other
# output formats), with their neutral values: anything else is a 400 naming the field
_NOT_SUPPORTED: dict[str, tuple] = {
    "conversation": (None,),
    "prompt": (None,),
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
# Responses fields with nothing to do here
_NOT_PASSED = ("stream_options", "service_tier",
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


def chat_of(body: ResponsesRequest, text_only_origin: str | None = None,
            history: list | None = None) -> ChatCompletionRequest:
    """The chat completion request that `body` asks for; 400 naming what it cannot be.
    `text_only_origin`: the multimodal architecture a text-only artifact came from;
    `history`: the stored items that previous_response_id continues, before the input."""
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
    called: set = set()
    messages += _messages(history or [], text_only_origin, called)
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        messages += _messages(body.input, text_only_origin, called)
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
    tools = responses_tools.chat_tools(extra.pop("tools", None))
    if tools is not None:
        extra["tools"] = tools
    choice = extra.pop("tool_choice", None)
    if tools is not None or choice not in (None, "auto", "none"):   # else nothing to choose
        extra["tool_choice"] = responses_tools.chat_tool_choice(choice)
    effort = _effort(extra.pop("reasoning", None))
    if effort is not None:
        extra["reasoning_effort"] = effort
    if wants_logprobs(body):            # the chat's logprobs, for the message's text
        extra.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
    fields = {**extra, "model": body.model, "messages": messages,
              "max_tokens": body.max_output_tokens, "temperature": body.temperature,
              "top_p": body.top_p, "stream": body.stream, "user": body.user}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        message, param = validation_message(list(e.errors()))
        raise bad_request(message, param) from None


# what `include` may ask for: the rest (reasoning.encrypted_content, file_search_call.results,
# ...) needs what braze does not have
INCLUDABLE = ("message.output_text.logprobs",)


def wants_logprobs(body: ResponsesRequest) -> bool:
    """Whether the message's output_text carries logprobs: `include` asks for them (as
    OpenAI's), or top_logprobs asks for alternatives; 400 naming what cannot be included."""
    for x in body.include or []:
        if x not in INCLUDABLE:
            raise bad_request(f"include {x!r} is not supported by this server's /v1/responses; "
                              f"it can include {', '.join(INCLUDABLE)}", "include")
    return "message.output_text.logprobs" in (body.include or []) or bool(body.top_logprobs)


def _drop_turn(messages: list) -> list | None:
    """`messages` less the conversation's oldest turn (its first user message and what
    answered it, up to the next user message: calls and their outputs go together), the
    system message kept; None when only the last turn is left."""
    first = next((i for i, m in enumerate(messages) if m.role != "system"), None)
    if first is None:
        return None
    nxt = next((i for i in range(first + 1, len(messages)) if messages[i].role == "user"),
               None)
    return None if nxt is None else messages[:first] + messages[nxt:]


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


def _messages(items: list, text_only_origin: str | None = None,
              called: set | None = None) -> list[dict]:
    """The input items as chat messages. A reasoning item (an earlier reply's, sent back
    as vLLM's clients do) goes with the assistant message after it, as its reasoning;
    with none after it, it is an assistant turn of its own, as vLLM renders it."""
    out, thought = [], None
    calling = None          # the assistant turn that a function_call item next joins
    called = set() if called is None else called   # call ids an output may answer (grows)
    for i, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "reasoning":
            thought = (thought or "") + _reasoning_text(item, i)
            continue
        if kind == "function_call":     # an assistant's call: its turn's tool_calls
            call = responses_tools.call_of(item, i)
            called.add(call["id"])
            if calling is None or thought is not None:
                calling = {"role": "assistant", "content": "", "tool_calls": []}
                if thought is not None:
                    calling["reasoning"], thought = thought, None
                out.append(calling)
            calling.setdefault("tool_calls", []).append(call)
            continue
        m = responses_tools.output_of(item, i, called) if kind == "function_call_output" \
            else _message(item, i, text_only_origin)
        calling = m if m["role"] == "assistant" else None
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
                          "messages ({\"role\", \"content\"}), reasoning, function_call and "
                          "function_call_output items", "input")
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
    store = getattr(svc, "responses_store", None)       # serving/responses_store.py

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        svc.check_model(body.model)
        keep = store is not None and body.store is not False
        if body.background:
            if not keep:
                raise bad_request("background needs the response stored, to be fetched "
                                  "later: " + ("leave store true" if store is not None else
                                               "start the server with "
                                               "--enable-responses-store"), "background")
            if body.stream:
                raise bad_request("background with stream is not supported by this "
                                  "server: poll GET /v1/responses/{id} instead", "stream")
        history = [] if body.previous_response_id is None else \
            stored.previous(store, body.previous_response_id)
        chat = chat_of(body, svc.text_only_origin, history)
        max_tokens = chat_max_tokens(chat)
        tool_plan = tools_plan(chat, svc.tool_call_parser)
        if chat.logprobs and tool_plan is not None and tool_plan.mode != "none":
            raise bad_request("logprobs (include message.output_text.logprobs, top_logprobs) "
                              "with function tools is not supported by this server's "
                              "/v1/responses: leave one out", "include")
        constraint, field = held_to(tool_plan, *constraint_of(body, chat))
        await svc.compile_grammar(constraint, field,
                                  tool_plan.tools if field == "tools" else None)
        auto = body.truncation == "auto"    # the oldest turns dropped until it fits
        while True:
            try:
                ids = await svc.prompts.chat(chat, chat.add_special_tokens, for_model=not auto,
                                             tools=tool_plan.tools if tool_plan else None,
                                             keep=truncation(chat, svc.max_model_len))
            except APIError as e:        # the messages are this request's input
                if e.param == "messages":
                    e.param = "input"
                raise
            if not auto or len(ids) + (max_tokens or 1) <= svc.max_model_len:
                break
            shorter = _drop_turn(chat.messages)
            if shorter is None:         # the last turn alone: too long is the usual 400
                svc.prompts.check_length(len(ids), "input")
                break
            chat = chat.model_copy(update={"messages": shorter})
        if max_tokens is None:
            max_tokens = svc.unset_max_tokens(len(ids))
        elif len(ids) < svc.max_model_len:      # else the engine says the prompt is too long
            check_context(len(ids), max_tokens, svc.max_model_len, "max_output_tokens")
        kw = sampling_kwargs(chat, max_tokens, svc.sampling_defaults)
        if tool_plan is not None:       # a tool parser that reads special tokens keeps them
            kw["skip_special_tokens"] = kw["skip_special_tokens"] and tool_plan.skip_special_tokens
        reasoning = None
        if svc.reasoning is not None:   # a reasoning item before the message (vLLM's)
            reasoning = svc.reasoning.reply(ids)
            kw["skip_special_tokens"] = svc.reasoning.skip_special_tokens(kw["skip_special_tokens"])
        params = SamplingParams(**kw, structured_outputs=constraint)
        rid, engine_rid = response_ids(request.scope, "resp_")
        reply = _Reply(svc, body, len(ids), params, reasoning, rid, stored=keep,
                       tools=tool_plan)
        items = stored.input_items(body.input)
        if keep:
            store.check_free(reply.id)
        svc.admit()
        stream = await svc.submit(engine_rid, ids, params, prompt_param="input",
                                  lora=lora_for(svc, body.model), bounded=False,
                                  cache_salt=chat.cache_salt, priority=chat.priority)
        if body.background:
            return JSONResponse(_background(store, reply, stream, history + items, items))
        if keep:
            def kept(response: dict) -> None:
                store.put(reply.id, stored.Stored(response, history + items, items))
            reply.on_done = kept
        if body.stream:
            return StreamingResponse(reply.events(stream), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            whole = await while_connected(request, reply.whole(stream))
        finally:        # the client went away (a no-op once the request has finished)
            stream.abort("the client disconnected")
        return JSONResponse(whole)

    def _kept(rid: str) -> stored.Stored:
        if store is None:
            raise stored.not_found(rid, None)
        return store.get(rid)

    @app.get("/v1/responses/{rid}")
    async def retrieve(rid: str, stream: bool = False):
        s = _kept(rid)
        if stream:
            raise bad_request("stream=true (replaying a response's events) is not supported "
                              "by this server: GET it without stream", "stream")
        return JSONResponse(s.response)

    @app.get("/v1/responses/{rid}/input_items")
    async def input_items(rid: str, limit: int = 20, order: str = "desc",
                          after: str | None = None):
        return JSONResponse(stored.page(_kept(rid).input_items, limit, order, after))

    @app.post("/v1/responses/{rid}/cancel")
    async def cancel(rid: str):
        s = _kept(rid)
        if not s.response.get("background"):
            raise bad_request(f"{rid} is not a background response; only those can be "
                              "cancelled (a foreground one ends when its client "
                              "disconnects)", None)
        await s.cancel()
        return JSONResponse(s.response)

    @app.delete("/v1/responses/{rid}")
    async def delete(rid: str):
        _kept(rid)
        await store.delete(rid).cancel()
        return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})


def _background(store, reply: "_Reply", stream, context: list, items: list) -> dict:
    """Keep `reply` as a background response, "queued", and run it: the stored object
    follows it to its end (completed, incomplete, failed or cancelled)."""
    s = stored.Stored(reply.response("queued"), context, items, abort=stream.abort)

    async def run() -> None:
        s.response = reply.response("in_progress")
        try:
            s.response = await reply.whole(stream)
        except asyncio.CancelledError:
            stream.abort("the response was cancelled")
            s.response = reply.response("cancelled")
        except APIError as e:
            s.response = reply.response("failed", error={"code": e.code or "server_error",
                                                         "message": e.message})
        except Exception as e:         # never lost silently: the stored object says so
            log.exception("background response %s failed", reply.id)
            s.response = reply.response("failed", error={"code": "server_error",
                                                         "message": str(e)})

    s.task = asyncio.get_running_loop().create_task(run())
    store.put(reply.id, s)
    return s.response


class _Reply:
    """One response: its object as it stands, and its stream of events."""

    def __init__(self, svc, body: ResponsesRequest, num_prompt_tokens: int,
                 params: SamplingParams, reasoning=None, rid: str | None = None,
                 stored: bool = False, tools=None):
        self.body, self.params = body, params
        self.tool_plan = tools          # the request's serving/tools.ToolPlan, if any
        self.want_logprobs = params.logprobs is not None
        self.lp_next = 0                # a stream's logprobs sent so far (output positions)
        self.tokenizer = svc.tokenizer
        self.stored = stored            # kept in the server's responses store
        self.on_done = None             # called with the final response object
        # with --reasoning-parser, the runtime/reasoning.Reply that splits the text
        self.reasoning = reasoning
        self.id = rid or "resp_" + uuid.uuid4().hex
        self.item_id = "msg_" + uuid.uuid4().hex
        self.reasoning_id = "rs_" + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = response_model(svc, body.model)
        self.num_prompt_tokens = num_prompt_tokens
        self.seq = 0

    def response(self, status: str, text: str | None = None, out=None,
                 error: dict | None = None, output: list | None = None) -> dict:
        """The response object; `text` and `out` (the final RequestOutput) once done;
        `output`: its items as streamed (else they are read off `text`)."""
        done = out is not None
        if done and output is None:
            output = self.output(text, status, out)
        incomplete = done and out.finish_reason == "length"
        b = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "error": error, "background": bool(b.background),
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "model": self.model, "output": output if done else [],
            "parallel_tool_calls": self.tool_plan.parallel if self.tool_plan else True,
            "previous_response_id": b.previous_response_id,
            "reasoning": self.reasoning_param(),
            "store": self.stored, "temperature": self.params.temperature,
            "text": {"format": (b.text or {}).get("format") or {"type": "text"}},
            "tool_choice": self.tool_choice(), "tools": (b.model_extra or {}).get("tools") or [],
            "top_p": self.params.top_p, "truncation": b.truncation or "disabled",
            "usage": self.usage(out) if done else None, "user": b.user,
            "metadata": b.metadata or {},
        }

    @property
    def tools(self):
        """The tool plan when the reply may call a function (not tool_choice none)."""
        p = self.tool_plan
        return p if p is not None and p.mode != "none" else None

    def tool_choice(self):
        """The request's tool_choice, as OpenAI echoes it (auto with tools, else none)."""
        if self.tool_plan is None:
            return "none"
        choice = (self.body.model_extra or {}).get("tool_choice")
        return choice if choice is not None else "auto"

    def reasoning_param(self) -> dict | None:
        """The request's `reasoning`, as OpenAI echoes it."""
        effort = _effort((self.body.model_extra or {}).get("reasoning"))
        return None if effort is None else {"effort": effort, "summary": None}

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, answer) of the reply's text; no reasoning without a parser."""
        return (None, text) if self.reasoning is None else self.reasoning.split(text)

    def _answer_entries(self, out, since: int) -> list | None:
        """The answer's TokenLogprobs from output position `since`; None while the reply
        still reasons (or none were asked for)."""
        if not self.want_logprobs or not out.logprobs:
            return None
        start = 0 if self.reasoning is None else self.reasoning.answer_start(out.token_ids)
        return None if start is None else out.logprobs[max(start, since):]

    def _openai_logprobs(self, entries) -> list[dict]:
        if not entries:
            return []
        return R.chat_logprobs(entries, lambda t: R.token_text(self.tokenizer, t))["content"]

    def answer_logprobs(self, out) -> list[dict]:
        """OpenAI's logprobs of the answer's tokens (none unless asked for)."""
        return self._openai_logprobs(self._answer_entries(out, 0))

    def stream_logprobs(self, out) -> list[dict]:
        """The answer's logprobs not yet sent in a stream, for its next text delta."""
        entries = self._answer_entries(out, self.lp_next)
        if entries is not None:
            self.lp_next = len(out.logprobs)
        return self._openai_logprobs(entries)

    def output(self, text: str, status: str, out=None) -> list[dict]:
        """The output items: a reasoning item when the reply reasoned, then the message
        (none for a reply cut off while still reasoning)."""
        think, answer = self.split(text)
        done = "completed" if answer is not None else status     # the reasoning ended
        items = [self.reasoning_item(think, done)] if think else []
        if answer is None:
            return items
        if self.tools is None:
            lp = [] if out is None else self.answer_logprobs(out)
            return items + [self.message(answer, status, logprobs=lp)]
        content, calls = self.tools.message(answer)      # the parser reads the answer alone
        if content or not calls:
            items.append(self.message(content or "", status))
        return items + [responses_tools.call_item(c["id"], c["function"]["name"],
                                                  c["function"]["arguments"], status)
                        for c in calls]

    def reasoning_item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {"id": self.reasoning_id, "type": "reasoning", "summary": [],
                "content": content, "encrypted_content": None, "status": status}

    def message(self, text: str | None, status: str, item_id: str | None = None,
                logprobs: list | None = None) -> dict:
        content = [] if text is None else [self.part(text, logprobs)]
        return {"id": item_id or self.item_id, "type": "message", "role": "assistant",
                "status": status, "content": content}

    @staticmethod
    def part(text: str, logprobs: list | None = None) -> dict:
        return {"type": "output_text", "text": text, "annotations": [],
                "logprobs": logprobs or []}

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
        return self.done(self.response(self.status(out), out.text or "", out))

    def done(self, response: dict) -> dict:
        if self.on_done is not None:
            self.on_done(response)
        return response

    def event(self, kind: str, **fields) -> bytes:
        d = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(d, separators=(',', ':'))}\n\n".encode()

    async def events(self, stream):
        done = False
        try:
            yield self.event("response.created", response=self.response("in_progress"))
            yield self.event("response.in_progress", response=self.response("in_progress"))
            items = StreamItems(self) if self.tools is None else ToolStreamItems(self)
            if self.reasoning is None and self.tools is None:   # the message from the start
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
                lp = self.stream_logprobs(out) if said else []
                for e in items.deltas(think, said, logprobs=lp):
                    yield e
            if out is None or out.finish_reason not in ("stop", "length"):
                raise Aborted(f"the request ended with finish_reason "
                              f"{getattr(out, 'finish_reason', None)!r}")
            text = "".join(text)
            think, said = ("", "") if splitter is None else splitter.feed(text, True)
            answering = splitter is None or splitter.content is not None
            for e in items.deltas(think, said, answering, final=True):  # the text's end
                yield e
            status = self.status(out)
            for e in items.close(text, status, self.answer_logprobs(out)):
                yield e
            yield self.event(f"response.{status}", response=self.done(
                self.response(status, text, out, output=items.output())))
            done = True
        except (Aborted, Unavailable, Rejected) as e:
            kind = "invalid_request_error" if isinstance(e, Rejected) else "server_error"
            yield self.event("error", code=kind, message=str(e), param=None)
            done = True
        finally:
            if not done:           # the client went away
                stream.abort()


__all__ = ["ResponsesRequest", "chat_of", "install"]
