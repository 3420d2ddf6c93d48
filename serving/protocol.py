"""Request bodies and errors of the OpenAI API as braze serves them (pydantic).

Requests allow extra fields (clients send many; braze reads `ignore_eos`, `top_k`,
`stop_token_ids`, `add_generation_prompt`, `chat_template_kwargs`, `repetition_penalty`,
`min_tokens`, `bad_words`, `allowed_token_ids`, `return_token_ids` among them) and ignore the ones they do not
know, except the fields of NOT_YET_SUPPORTED: options of the OpenAI or vLLM API that change
the output and that braze does not implement yet, which a request may send only at their
neutral value. Checks pydantic cannot express as field bounds (unsupported options, the
prompts' shape) live in `check_*` and `completion_prompts` and raise `APIError`, which the
app turns into an OpenAI-shaped JSON error: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from braze.runtime.chat_template import RESERVED_TEMPLATE_KWARGS
from braze.runtime.sampler import prompt_keep


class APIError(Exception):
    """An error the client caused (or overload); becomes an OpenAI-shaped JSON response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def send_error(send, status: int, message: str, type: str, code: str | None = None,
                     close: bool = False, headers: list | None = None) -> None:
    """An OpenAI-shaped error straight through ASGI `send`: for middleware, which runs outside
    FastAPI's exception handlers. `close` asks the server to close the connection after it;
    `headers`: more (name, value) byte pairs."""
    body = json.dumps(error_body(message, type, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(headers or ())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, None)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False    # vLLM's: the usage so far on every chunk


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    # vLLM's: prefix-cache hits only among requests of the same salt (a tenant's)
    cache_salt: str | None = Field(None, min_length=1)
    # vLLM's: lower runs first under --scheduling-policy priority; 0 only under fcfs
    priority: int | None = None
    # vLLM's: keep only the prompt's last N tokens (-1: the model's max_model_len)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)          # -1 or 0: no limit
    min_p: float | None = Field(None, ge=0, le=1)   # vLLM's: 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    # the n of highest cumulative logprob among best_of samples (vLLM's, chat too)
    best_of: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)   # vLLM extension
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)                                 # vLLM extension
    bad_words: list[str] | None = None                               # vLLM extension
    allowed_token_ids: list[int] | None = None                       # vLLM extension
    return_token_ids: bool = False                                   # vLLM extension
    prompt_logprobs: int | None = Field(None, ge=0, le=20)           # vLLM extension
    user: str | None = None
    # vLLM's: {"max_load_tokens": N, "store": bool} for the lower KV tiers (docs/serving.md)
    kv_transfer_params: dict | None = None
    skip_special_tokens: bool = True                                 # vLLM extension
    include_stop_str_in_output: bool = False                         # vLLM extension
    return_tokens_as_token_ids: bool = False     # vLLM's: logprobs name tokens "token_id:N"
    # vLLM's beam search (serving/beam.py): n beams, returned best first
    use_beam_search: bool = False
    length_penalty: float = 1.0

    @field_validator("stream", "n", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, v, info):
        """The OpenAI spec lets these be null (clients generated from it send null for
        what is unset): null reads as the field's default."""
        return cls.model_fields[info.field_name].default if v is None else v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)    # 0: with echo only (vLLM's prompt scoring)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    add_special_tokens: bool = True     # vLLM's: the tokenizer's BOS/EOS around a text prompt


class TextPart(BaseModel):
    """A content part: {"type": "text", "text": ...}, or another type (image_url, ...)
    that check_messages refuses by name."""
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, v):
        if not isinstance(v, dict) or not isinstance(v.get("type"), str):
            got = "an object without a \"type\"" if isinstance(v, dict) else \
                f"of type {type(v).__name__!r}"
            raise PydanticCustomError("content_part", "{m}", {
                "m": f"is {got}, not a content part: give {{\"type\": \"text\", "
                     f"\"text\": ...}} parts (or the whole content as one string)"})
        if v["type"] == "text" and not isinstance(v.get("text"), str):
            raise PydanticCustomError("content_part", "{m}", {
                "m": "is a text part without a \"text\" string"})
        return v


ROLES = ("system", "user", "assistant", "tool", "developer")

# Fields of the OpenAI and vLLM APIs that braze accepts but does not implement yet, with
# the values that mean "off" (sent by clients that fill in every field). A request setting
# one to anything else gets a 400 naming it, never a silently different answer. Whoever
# implements a field removes its line.
_OFF = (None, False, 0, "", [], {})
NOT_YET_SUPPORTED: dict[str, tuple] = {
    "suffix": _OFF,
    # vLLM's extra request fields braze does not implement yet
    "spaces_between_special_tokens": (None, True),
    "logits_processors": _OFF,
    "vllm_xargs": _OFF,
    "functions": _OFF,
    "function_call": (None, "none"),
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    # vLLM's: the prompt ends inside the final message, which the model continues
    continue_final_message: bool = False
    # vLLM's: the tokenizer's special tokens around the rendered chat too (None: exactly
    # one BOS, whether the template or the tokenizer writes it)
    add_special_tokens: bool | None = None
    # for RAG chat templates, as transformers' apply_chat_template(documents=...)
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None     # a Jinja template instead of the tokenizer's
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: with --reasoning-parser, whether the reply's reasoning is returned (the
    # content is the answer either way)
    include_reasoning: bool = True
    # OpenAI's (vLLM passes it to the chat template, as gpt-oss's and others' read it)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None




def first_set(req: BaseModel, table: dict[str, tuple]):
    """(name, value) of the first field of `table` (name -> its neutral values) that `req`
    sends with another value (an absent field reads as None), or None."""
    values = {**req.__dict__, **(req.model_extra or {})}
    for name, off in table.items():
        v = values.get(name)
        # 0 == False in Python: a bool is neutral only where a bool is listed
        if not any(v is o or (v == o and isinstance(v, bool) == isinstance(o, bool))
                   for o in off):
            return name, v
    return None


def check_supported(req: BaseModel) -> None:
    """400 for a field of NOT_YET_SUPPORTED set to a value other than its neutral ones."""
    found = first_set(req, NOT_YET_SUPPORTED)
    if found is not None:
        name, v = found
        off = NOT_YET_SUPPORTED[name]
        hint = "" if off is _OFF else f" or send {name}={_short(off[-1])}"
        raise bad_request(f"{name} is not supported by this server yet (got "
                          f"{name}={_short(v)}); leave it out{hint}", name)


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_common(req: _GenerationRequest) -> None:
    """Options braze does not implement get a clear 400 rather than being silently ignored."""
    check_supported(req)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options shape a stream: send them with stream: true, or "
                          "leave them out", "stream_options")
    if req.length_penalty != 1.0 and not req.use_beam_search:
        raise bad_request(f"length_penalty ({req.length_penalty}) weighs beam search's score "
                          "only: send use_beam_search: true with it, or leave it out",
                          "length_penalty")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    for k in req.logit_bias or {}:
        if not k.strip().isdigit():
            raise bad_request(f"logit_bias keys must be token ids, got {k!r}", "logit_bias")


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request, each text or token ids: a string, a list of
    strings, a list of token ids, or a list of token-id lists."""
    check_common(req)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be at least 1; 0 only with echo: true, which "
                          "returns the prompt (and its logprobs) and generates nothing",
                          "max_tokens")
    check_best_of(req)
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    elif not p:
        raise bad_request("the prompt is empty", "prompt")
    elif not isinstance(p[0], (str, list)):
        p = [p]
    out: list[str | list[int]] = []
    for one in p:
        if not one:
            raise bad_request("the prompt is empty" if len(p) == 1 else
                              "a prompt in the list is empty", "prompt")
        out.append(one if isinstance(one, str) else [int(t) for t in one])
    return out


def check_best_of(req: _GenerationRequest) -> None:
    best_of = req.best_of
    if best_of is not None and best_of < req.n:
        raise bad_request(f"best_of ({best_of}) must be at least n ({req.n})", "best_of")
    if best_of is not None and best_of > req.n and req.stream:
        raise bad_request("best_of > n cannot be streamed (the best samples are known only "
                          "at the end)", "best_of")


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The first prompt of a completion request (completion_prompts for all)."""
    return completion_prompts(req)[0]


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    check_common(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    check_best_of(req)
    check_chat(req)
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def check_chat(req: ChatCompletionRequest) -> None:
    if (req.model_extra or {}).get("echo") not in (None, False):
        raise bad_request("echo is not supported by this server's chat completions yet (got "
                          "echo=true); leave it out", "echo")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise bad_request(f"messages[{i}].role is {_short(m.role)}; a role is one of "
                              f"{', '.join(ROLES)}", "messages")
    bad = [k for k in (req.chat_template_kwargs or {}) if k in RESERVED_TEMPLATE_KWARGS]
    if bad:
        raise bad_request(f"chat_template_kwargs must not set {bad[0]!r}: braze passes "
                          f"{', '.join(RESERVED_TEMPLATE_KWARGS)} to the template itself"
                          + (f" (send {bad[0]} as a request field)"
                             if bad[0] in ("add_generation_prompt", "continue_final_message")
                             else ""),
                          "chat_template_kwargs")


def truncation(req, max_model_len: int) -> int | None:
    """How many of the prompt's last tokens the request keeps (vLLM's
    truncate_prompt_tokens; -1 is max_model_len); None: all of them."""
    return prompt_keep(getattr(req, "truncate_prompt_tokens", None), max_model_len)


def check_text(text: str, param: str, where: str | None = None) -> None:
    """A string that the tokenizer can take: no lone UTF-16 surrogates ("\\ud800"), which
    JSON can carry but UTF-8 cannot. `where` names the spot (default: `param`)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{where or param} holds a lone UTF-16 surrogate "
                          f"({text[e.start]!r} at character {e.start}), which is not valid "
                          "Unicode text; send each such pair whole or drop it", param) from None


def check_context(num_prompt: int, max_tokens: int, max_model_len: int, param: str) -> None:
    """The prompt plus the tokens asked for must fit the model (vLLM's message): a
    completion silently cut at the end of the context would look like finish "length"."""
    if num_prompt + max_tokens > max_model_len:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has "
            f"{num_prompt} input tokens ({max_tokens} > {max_model_len} - {num_prompt})", param)


# the API's default for what a request leaves unset, when the model gives none
API_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def sampling_kwargs(req: _GenerationRequest, max_tokens: int,
                    defaults: dict | None = None) -> dict:
    """Keyword arguments for runtime.sampler.SamplingParams. `defaults`: the model's
    sampling defaults (runtime/sampling_defaults.py) for the fields the request leaves
    unset, before the API's."""
    defaults = {**API_DEFAULTS, **(defaults or {})}

    def pick(name):
        v = getattr(req, name)
        return defaults.get(name) if v is None else v
    kw: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": pick("temperature"),
        "top_p": pick("top_p"),
        "top_k": 0 if req.top_k == -1 else pick("top_k"),
        "min_p": pick("min_p"),
        "seed": req.seed,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        # a non-streamed response needs only the final report: less work per engine step
        "output_kind": "delta" if req.stream else "final",
    }
    if req.stop:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        kw["stop_token_ids"] = list(req.stop_token_ids)
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = pick(name)
        if v is not None:
            kw[name] = v
    if req.logit_bias:
        kw["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
    if req.min_tokens:
        kw["min_tokens"] = req.min_tokens
    if req.bad_words:
        kw["bad_words"] = list(req.bad_words)
    if req.allowed_token_ids:      # [] as null: clients send it for "unset"
        kw["allowed_token_ids"] = list(req.allowed_token_ids)
    kw["n"] = req.n
    kw["best_of"] = req.best_of
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            kw["logprobs"] = req.top_logprobs or 0
    else:
        kw["logprobs"] = req.logprobs
    plp = req.prompt_logprobs
    if getattr(req, "echo", False) and req.logprobs is not None:   # echo shows the prompt's too
        plp = max(plp or 0, req.logprobs)
    if plp is not None:
        kw["prompt_logprobs"] = plp
    return kw


_UNION_BRANCHES = ("str", "int", "float", "bool")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for FastAPI's RequestValidationError errors, as one line."""
    if not errors:
        return "invalid request", None
    # a union reports one error per branch: the deepest says most (a content part's own
    # error rather than "should be a valid string" for the content as a whole)
    e = max(errors, key=lambda x: len(x.get("loc", ())))
    loc = [str(x) if isinstance(x, str) else f"[{x}]" for x in e.get("loc", ())
           if x != "body"]
    kind = e.get("type", "")
    if kind == "json_invalid":
        ctx = e.get("ctx") or {}
        return f"the request body is not valid JSON ({ctx.get('error', e.get('msg'))})", None
    if kind == "missing" and not loc:
        return "the request body is missing: send a JSON object", None
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return "the request body must be a JSON object", None
    # a union (prompt: str | list...) reports one error per branch, named by its type
    # ("str", "list[int]"): the field is what matters (not a field that starts like one:
    # "stream", "structured_outputs")
    param = loc[0] if loc else None
    where = ".".join(x for x in loc if x not in _UNION_BRANCHES
                     and not x.startswith(("list[", "dict[", "function-"))).replace(".[", "[")
    msg = e.get("msg", "invalid value")
    sep = " " if kind == "content_part" else ": "      # "messages[0].content[1] is a str, ..."
    return (f"{where}{sep}{msg}" if where else msg), param



def client_request_id(scope) -> str | None:
    """The request's X-Request-Id header (stripped, at most 256 characters), or None."""
    for k, v in scope.get("headers", ()):
        if k == b"x-request-id":
            return v.decode("latin-1").strip()[:256] or None
    return None


def response_ids(scope: dict, prefix: str) -> tuple[str, str]:
    """A response's id, vLLM's way: `prefix` ("cmpl-", "chatcmpl-", "resp_") and the
    client's X-Request-Id header (as app.RequestIdMiddleware read it), else a fresh id; and
    the base of its engine requests' ids, distinct even when two requests bring the same
    header (a retry)."""
    fresh = uuid.uuid4().hex
    given = scope.get("braze.client_request_id")
    if given is None:
        return prefix + fresh, prefix + fresh
    return prefix + given, f"{prefix}{given}-{fresh}"
