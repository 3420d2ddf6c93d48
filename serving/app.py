"""The FastAPI application: OpenAI routes, health, version, metrics, and error shaping.

Every response carries `X-Request-Id` (the client's, else a new one) and every error is
OpenAI-shaped ({"error": {"message", "type", "param", "code"}}): FastAPI's 422 for a bad
body becomes 400, unknown routes 404, unexpected exceptions 500 (logged with traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from braze import __version__
from braze.ir.errors import BrazeError
from braze.runtime.sampler import SamplingParams

from . import beam
from . import responses as R
from .async_engine import (
    Aborted,
    AsyncEngine,
    QueueFull,
    Rejected,
    RequestStream,
    Unavailable,
)
from .auth import APIKeyCheck
from .body_limit import BodyLimit
from .chat import ChatTemplate
from .hosts import HostCheck
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .options import ServerOptions
from .prompts import Prompts
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    chat_max_tokens,
    check_context,
    client_request_id,
    completion_prompts,
    error_body,
    response_ids,
    sampling_kwargs,
    send_error,
    truncation,
    validation_message,
)
from .lora_routes import lora_for, model_cards, response_model
from .read_timeouts import BodyTimeout
from .structured import request_constraint
from .tools import held_to
from .tools import plan as tools_plan

log = logging.getLogger("braze.serving")



@dataclass
class Service:
    """What the routes need: the engine thread, the model's name, tokenizer and template."""
    aengine: AsyncEngine
    metrics: Metrics
    model_name: str
    max_model_len: int
    tokenizer: object | None              # runtime.tokenizer.Tokenizer
    chat_template: ChatTemplate | None
    created: int = 0
    tool_call_parser: str | None = None   # for tool_choice "auto" (serving/tool_parsers)
    trust_request_chat_template: bool = False
    text_only_origin: str | None = None   # compiled text-only from this multimodal architecture
    # the model's sampling defaults for unset request fields (runtime/sampling_defaults.py)
    sampling_defaults: dict = dataclasses.field(default_factory=dict)
    # --reasoning-parser's markers (runtime/reasoning.ReasoningMarkers): chat replies split
    # into reasoning and content
    reasoning: object | None = None
    prompt_tokens_details: bool = False   # --enable-prompt-tokens-details
    # --default-chat-template-kwargs: under each chat request's chat_template_kwargs
    default_chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    lora_parents: dict = dataclasses.field(default_factory=dict)  # adapter -> --lora-modules base_model_name
    model_aliases: tuple = ()             # --served-model-name's names after the first
    # --enable-responses-store: /v1/responses kept by id (serving/responses_store.py)
    responses_store: object | None = None

    @property
    def served_names(self) -> tuple:
        """Every name a request may give for the model (responses give the first)."""
        return (self.model_name, *self.model_aliases)

    def __post_init__(self):
        self.created = int(time.time())
        self.prompts = Prompts(self, self.trust_request_chat_template)   # serving/prompts.py
        # The BOS id when encoding prepends one by itself: a chat prompt then starts with
        # it whether the template writes it or not (any template's: the model's,
        # --chat-template's or a request's, so not read off one)
        from braze.runtime.chat_template import token_text
        self.bos_id: int | None = None
        bos = token_text(getattr(self.tokenizer, "config", None) or {}, "bos_token")
        if self.tokenizer is not None and bos:
            bos_id = self.tokenizer.token_id(bos)
            if bos_id is not None and self.tokenizer.encode("")[:1] == [bos_id]:
                self.bos_id = bos_id

    def unset_max_tokens(self, num_prompt: int) -> int:
        """The token limit of a chat (or Responses) request that sets none: the model's
        default (generation_config.json's max_new_tokens), else up to the end of the
        context."""
        return max(1, min(self.max_model_len - num_prompt,
                          self.sampling_defaults.get("max_tokens", self.max_model_len)))

    def check_model(self, model: str | None) -> None:
        """404 for a model this server does not serve; none or "" is the served model, as
        in vLLM."""
        if model and model not in self.served_names and lora_for(self, model) is None:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r} and the LoRA adapters /v1/models lists",
                           "invalid_request_error", "model", "model_not_found")

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send the prompt as token ids",
                              "prompt")
        return self.tokenizer.encode(prompt)

    async def compile_grammar(self, constraint, param: str | None = None,
                              tools: list[dict] | None = None) -> None:
        """Compile a request's grammar before it reaches the engine, in a worker thread (the
        event loop and the engine thread go on meanwhile): a grammar that does not compile
        is a 400 naming `param`, the field it came in (and with `tools`, the tool whose
        parameters it is), and the engine finds it in its cache."""
        if constraint is None:
            return
        loop = asyncio.get_running_loop()
        engine = self.aengine.engine
        try:
            backend = await loop.run_in_executor(None, lambda: engine.structured)
            await asyncio.wrap_future(backend.cache.compile_async(constraint))
        except BrazeError as e:
            message = str(e)
            if tools:
                from .tools import tool_at_fault
                message = await loop.run_in_executor(
                    None, tool_at_fault, backend.cache.compile, tools) or message
            raise bad_request(message, param or getattr(e, "param", None)) from None

    def admit(self) -> None:
        """503 unless a new client request can be taken now. Decided once per client
        request: its prompts, samples (n) and beams then join without the --max-queue
        check (`submit(bounded=False)`), so a request larger than the queue is served
        rather than refused forever, and none is refused halfway through."""
        try:
            self.aengine.check_admission()
        except (QueueFull, Unavailable) as e:
            raise self._refused(e) from None

    def _refused(self, e: Exception) -> APIError:
        self.metrics.on_rejected()
        if isinstance(e, QueueFull):
            return APIError(503, str(e), "server_overloaded", None, "queue_full")
        return APIError(503, str(e), "service_unavailable", None, "unavailable")

    async def submit(self, request_id: str, ids: list[int], params: SamplingParams,
                     group: str | None = None, kv_transfer_params: dict | None = None,
                     prompt_param: str = "prompt", lora: str | None = None,
                     bounded: bool = True, cache_salt: str | None = None,
                     priority: int | None = None) -> RequestStream:
        if params.structured_outputs is not None:
            await self.compile_grammar(params.structured_outputs)
        try:
            params.validate()
            return await self.aengine.add(request_id, ids, params, len(ids), group=group,
                                          kv_transfer_params=kv_transfer_params, lora=lora,
                                          bounded=bounded, cache_salt=cache_salt,
                                          priority=priority)
        except BrazeError as e:
            if getattr(e, "status", None) == 404:      # its LoRA adapter was just unloaded
                raise APIError(404, str(e), "invalid_request_error", "model",
                               "model_not_found") from None
            param = getattr(e, "param", None)
            raise bad_request(str(e), prompt_param if param == "prompt" else param) from None
        except (QueueFull, Unavailable) as e:
            raise self._refused(e) from None


def create_app(svc: Service, read_timeout: float | None = None,
               allowed_hosts: list[str] | None = None, bind_host: str = "127.0.0.1",
               options: ServerOptions | None = None) -> FastAPI:
    """`read_timeout`: seconds a request body may take (serving/read_timeouts.py);
    `allowed_hosts`: the Host names answered, None for any (serving/hosts.py); `options`:
    the body limit, API keys and CORS (serving/options.py)."""
    options = options or ServerOptions()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.aengine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await svc.aengine.stop()
            svc.prompts.shutdown()

    app = FastAPI(title="braze", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.service = svc
    app.state.server_options = options
    # added first, so inside the request-id middleware: their errors get an X-Request-Id too.
    # The first added runs innermost: Host check, then the API key, then the body's time
    # and size; CORS outside them so that their errors carry CORS headers
    app.add_middleware(BodyLimit, max_bytes=options.max_request_body_bytes)
    if read_timeout is not None:
        app.add_middleware(BodyTimeout, seconds=read_timeout)
    if options.api_keys:
        app.add_middleware(APIKeyCheck, keys=options.api_keys)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts, bind_host=bind_host)
    if options.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins,
                           allow_methods=options.allowed_methods,
                           allow_headers=options.allowed_headers,
                           allow_credentials=options.allow_credentials,
                           expose_headers=["X-Request-Id"])
    _install_errors(app)
    from .utility_routes import install as install_utility_routes
    install_utility_routes(app, svc)
    from .lora_routes import install as install_lora_routes
    install_lora_routes(app, svc, options.allow_runtime_lora_updating)
    from .responses_route import install as install_responses
    install_responses(app, svc, _while_connected)

    from braze.runtime.parallel import health as parallel_health

    @app.get("/health")
    async def health():
        reason = svc.aengine.unavailable_reason()
        if reason is not None:
            return _error(503, reason, "service_unavailable")
        tp, dead = parallel_health()          # a tensor-parallel artifact's ranks
        if dead is not None:
            return _error(503, dead, "service_unavailable")
        return JSONResponse({"status": "ok", **({"tensor_parallel": tp} if tp else {})})

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        out = R.model_list(svc.served_names, svc.created, svc.max_model_len,
                           str(svc.aengine.engine.artifact.root))
        out["data"] += model_cards(svc)         # LoRA adapters, each with its parent
        return out

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        """OpenAI's retrieve: one card of /v1/models."""
        for card in (await models())["data"]:
            if card["id"] == model_id:
                return card
        svc.check_model(model_id)              # the 404 a request naming it gets
        raise APIError(404, f"the model {model_id!r} does not exist", "invalid_request_error",
                       "model", "model_not_found")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(svc.metrics.render(svc.aengine.snapshot()),
                                 media_type=METRICS_CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        svc.check_model(body.model)
        texts = completion_prompts(body)
        keep = truncation(body, svc.max_model_len)
        if keep is None:
            prompts = [(p if isinstance(p, str) else None,
                        await svc.prompts.for_model(p, add_special_tokens=body.add_special_tokens))
                       for p in texts]
        else:                   # a cut text prompt echoes as what the model read
            prompts = []
            for p in texts:
                ids, cut = await svc.prompts.kept(p, keep, body.add_special_tokens)
                prompts.append((p if isinstance(p, str) and not cut else None, ids))
        longest = max(len(ids) for _, ids in prompts)
        if body.max_tokens is not None and "max_tokens" in body.model_fields_set:
            # echo with max_tokens 0 (vLLM's prompt scoring): one token is run, not shown
            max_tokens = max(1, body.max_tokens)
            if longest < svc.max_model_len:      # else the engine says the prompt is too long
                check_context(longest, max_tokens, svc.max_model_len, "max_tokens")
        else:       # the OpenAI default, 16 (or the model's if less), as the context allows
            max_tokens = max(1, min(16, svc.sampling_defaults.get("max_tokens", 16),
                                    svc.max_model_len - longest))
        if body.use_beam_search:
            return JSONResponse(await _while_connected(
                request, beam.respond(svc, body, prompts, max_tokens, chat=False,
                                      scope=request.scope)))
        constraint, field = request_constraint(body)
        await svc.compile_grammar(constraint, field)
        params = SamplingParams(**sampling_kwargs(body, max_tokens, svc.sampling_defaults),
                                structured_outputs=constraint)
        return await _generate(svc, request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        svc.check_model(body.model)
        max_tokens = chat_max_tokens(body)
        tool_plan = tools_plan(body, svc.tool_call_parser)
        constraint, field = held_to(tool_plan, *request_constraint(body))
        if body.use_beam_search:
            beam.check(body)        # (tools and response_format before the template sees them)
        await svc.compile_grammar(constraint, field, tool_plan.tools if field == "tools" else None)
        ids = await svc.prompts.chat(body, body.add_special_tokens, for_model=True,
                                     tools=tool_plan.tools if tool_plan else None,
                                     keep=truncation(body, svc.max_model_len))
        if max_tokens is None:
            max_tokens = svc.unset_max_tokens(len(ids))
        elif len(ids) < svc.max_model_len:         # else the engine says the prompt is too long
            check_context(len(ids), max_tokens, svc.max_model_len,
                          "max_completion_tokens" if body.max_completion_tokens is not None
                          else "max_tokens")
        if body.use_beam_search:
            return JSONResponse(await _while_connected(
                request, beam.respond(svc, body, [(None, ids)], max_tokens, chat=True,
                                      scope=request.scope)))
        kw = sampling_kwargs(body, max_tokens, svc.sampling_defaults)
        if tool_plan is not None:       # a tool parser that reads special tokens keeps them
            kw["skip_special_tokens"] = kw["skip_special_tokens"] and tool_plan.skip_special_tokens
        reasoning = None
        if svc.reasoning is not None:   # where the reply starts: the template's prompt says
            reasoning = svc.reasoning.reply(ids)
            kw["skip_special_tokens"] = svc.reasoning.skip_special_tokens(kw["skip_special_tokens"])
        params = SamplingParams(**kw, structured_outputs=constraint)
        return await _generate(svc, request, body, [(None, ids)], params, chat=True,
                               tool_plan=tool_plan, reasoning=reasoning)

    @app.post("/invocations")
    async def invocations(request: Request):
        """SageMaker's route (vLLM serves it too): a chat request when the body has
        `messages`, a completion request when it has `prompt`."""
        try:
            raw = await request.json()
        except ValueError:
            raise bad_request("the request body must be a JSON object (sent with "
                              "Content-Type: application/json)", None) from None
        if isinstance(raw, dict) and "messages" in raw:
            kind, route = ChatCompletionRequest, chat_completions
        elif isinstance(raw, dict) and "prompt" in raw:
            kind, route = CompletionRequest, completions
        else:
            raise bad_request("/invocations takes a chat completion request (with "
                              "\"messages\") or a completion request (with \"prompt\")", None)
        try:
            body = kind.model_validate(raw)
        except ValidationError as e:        # shaped as a bad body of the route itself
            raise RequestValidationError(e.errors()) from None
        return await route(body, request)

    return app


# ---- generation --------------------------------------------------------------------------

async def _while_connected(request: Request, work):
    """Await `work` (a coroutine answering a non-streamed request, e.g. a beam search of
    many engine steps) unless the client disconnects first: then it is cancelled, which
    aborts its engine requests, and the (unread) answer is a 503."""
    task = asyncio.ensure_future(work)

    async def gone():
        while True:         # the body has been read: the next message is the disconnect
            if (await request.receive())["type"] == "http.disconnect":
                return
    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise APIError(503, "the client disconnected", "service_unavailable", None, "aborted")
    return task.result()


async def _generate(svc: Service, request: Request, body, prompts: list, params: SamplingParams,
                    chat: bool, tool_plan=None, reasoning=None):
    """Run `prompts` ([(text or None, token ids)]) with `params`: one engine request per
    prompt and sample (n, best_of), rendered as one response or one SSE stream.
    `reasoning`: the runtime/reasoning.Reply that splits chat replies into reasoning and
    content."""
    rid, engine_rid = response_ids(request.scope, "chatcmpl-" if chat else "cmpl-")
    job = _Job(svc, rid, request.scope.get("braze.request_id", rid), chat, int(time.time()),
               body, params, tool_plan, reasoning, engine_rid)
    await job.submit(prompts)
    if body.stream:
        return StreamingResponse(job.sse(body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await job.whole(request)


class _Choice:
    """One sample of one prompt: its engine request's stream and what was sent of it."""

    def __init__(self, index: int, prompt: int, stream: RequestStream, prompt_text, ids):
        self.index, self.prompt, self.stream = index, prompt, stream
        self.prompt_text, self.prompt_ids = prompt_text, ids
        self.text = ""                  # with tools or reasoning: the text so far
        self.streamer = None            # with tools: its ToolStreamer (serving/tools.py)
        self.splitter = None            # with reasoning: its ReplySplitter
        self.held_ids: list[int] = []   # with tools: tokens not yet carried by a chunk,
        self.held_logprobs: list = []   # and their logprobs
        self.last = None
        self.num_sent = 0               # output tokens its stream chunks carried so far
        self.offset = 0                 # text_offset of the next token (completions logprobs)
        self.started = False            # its first stream chunk is out
        self.echoed = False             # its echo chunk is out


class _Job:
    """One admitted request: its choices' output streams rendered as SSE or as one JSON body."""

    def __init__(self, svc: Service, rid: str, client_rid: str, chat: bool, created: int,
                 body, params: SamplingParams, tool_plan=None, reasoning=None,
                 engine_rid: str | None = None):
        self.svc, self.rid, self.client_rid = svc, rid, client_rid
        self.engine_rid = engine_rid or rid     # its engine requests' ids: distinct per job
        self.reasoning = reasoning if chat else None     # runtime/reasoning.Reply
        self.show_reasoning = getattr(body, "include_reasoning", True)
        # with tools in play, chat text goes through the plan's parser (serving/tools.py)
        self.tools = tool_plan if tool_plan is not None and tool_plan.mode != "none" else None
        self.chat, self.created, self.body, self.params = chat, created, body, params
        self.model = response_model(svc, getattr(body, "model", None))   # the adapter's name
        self.choices: list[_Choice] = []
        self.num_prompt_tokens = 0
        self.arrival = time.monotonic()
        self.outcome = "abort"
        self.echo = bool(getattr(body, "echo", False))
        # echo with max_tokens 0: the prompt alone is the answer (its one token is dropped)
        self.prompt_only = not chat and self.echo and getattr(body, "max_tokens", None) == 0
        self.want_logprobs = params.logprobs is not None
        self.token_ids = bool(getattr(body, "return_token_ids", False))
        so = getattr(body, "stream_options", None)
        self.continuous_usage = bool(body.include_usage and so is not None
                                     and so.continuous_usage_stats)

    async def submit(self, prompts: list) -> None:
        """Admit every (prompt, sample) as an engine request; if one is refused, the ones
        already admitted are aborted and the error goes to the client."""
        try:
            self.params.validate()
        except BrazeError as e:
            raise bad_request(str(e), getattr(e, "param", None)) from None
        children = self.params.children()
        if self.params.prompt_logprobs is not None:    # every choice reports its prompt's
            children = [dataclasses.replace(c, prompt_logprobs=self.params.prompt_logprobs)
                        for c in children]
        single = len(prompts) == 1 and len(children) == 1
        self.svc.admit()
        try:
            for pi, (text, ids) in enumerate(prompts):
                self.num_prompt_tokens += len(ids)
                group = None if len(children) == 1 else f"{self.engine_rid}-{pi}"
                for j, child in enumerate(children):
                    crid = self.engine_rid if single else f"{self.engine_rid}-{pi}-{j}"
                    stream = await self.svc.submit(
                        crid, ids, child, group, getattr(self.body, "kv_transfer_params", None),
                        "messages" if self.chat else "prompt",
                        lora=lora_for(self.svc, getattr(self.body, "model", None)),
                        bounded=False, cache_salt=getattr(self.body, "cache_salt", None),
                        priority=getattr(self.body, "priority", None))
                    self.choices.append(_Choice(pi * self.params.n + j, pi, stream, text, ids))
        except BaseException:
            self._abort_all()
            raise

    def _abort_all(self, reason: str = "aborted by the client") -> None:
        for c in self.choices:
            c.stream.abort(reason)

    @property
    def last(self):
        return self.choices[0].last if self.choices else None

    def _token_text(self, tid: int) -> str:
        return R.token_text(self.svc.tokenizer, tid, self.body.return_tokens_as_token_ids)

    def _prompt_text(self, c: _Choice) -> str:
        """The echo of a prompt: its text as sent, or token ids decoded with their special
        tokens, as vLLM echoes them (and as the echoed logprobs' tokens and offsets read)."""
        if c.prompt_text is not None:
            return c.prompt_text
        tok = self.svc.tokenizer
        return "" if tok is None else tok.decode(c.prompt_ids, skip_special_tokens=False)

    def _prompt_logprobs(self, out) -> list | None:
        """vLLM's prompt_logprobs: None for the first token, then {id: {logprob, rank,
        decoded_token}} with the prompt token and the top N."""
        if self.params.prompt_logprobs is None or out is None or out.prompt_logprobs is None:
            return None
        res = []
        for e in out.prompt_logprobs:
            if e is None:
                res.append(None)
                continue
            d = {str(i): {"logprob": R.finite(v), "rank": r + 1,
                          "decoded_token": self._token_text(i)}
                 for r, (i, v) in enumerate(e.top)}
            d.setdefault(str(e.token_id), {"logprob": R.finite(e.logprob), "rank": e.rank,
                                           "decoded_token": self._token_text(e.token_id)})
            res.append(d)
        return res

    def _echo_logprobs(self, c: _Choice, out) -> dict | None:
        """Completions logprobs of the echoed prompt (the first token has none)."""
        if not self.want_logprobs or out is None or out.prompt_logprobs is None:
            return None
        tokens, lps, tops, offsets = [], [], [], []
        for pos, e in enumerate(out.prompt_logprobs):
            t = self._token_text(c.prompt_ids[pos])
            tokens.append(t)
            offsets.append(c.offset)
            c.offset += len(t)
            if e is None:
                lps.append(None)
                tops.append(None)
            else:
                lps.append(R.finite(e.logprob))
                top = {self._token_text(i): R.finite(v) for i, v in e.top[:self.params.logprobs]}
                top.setdefault(t, R.finite(e.logprob))
                tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}

    def _tool_choice(self, c: _Choice, reason: str | None, delta: dict) -> dict:
        """A streamed chat choice with tools: `delta`, and the logprobs and token ids of the
        tokens held since the last chunk."""
        lp = self._logprobs(c, c.held_logprobs) if c.held_logprobs else None
        ids = c.held_ids if self.token_ids else None
        c.held_ids, c.held_logprobs = [], []
        return R.chat_choice(c.index, "", reason, lp, None, ids, delta=delta)

    def _split(self, c: _Choice, final: bool) -> tuple[str, str, str]:
        """A streamed chat choice's new reasoning text, new answer text, and answer text so
        far (without a reasoning parser: no reasoning, all of the text)."""
        if self.reasoning is None:
            return "", "", c.text
        if c.splitter is None:
            c.splitter = self.reasoning.splitter()
        think, said = c.splitter.feed(c.text, final)
        return think, said, c.splitter.content or ""

    def _logprobs(self, c: _Choice, entries) -> dict | None:
        if not self.want_logprobs or entries is None:
            return None
        if self.chat:
            return R.chat_logprobs(entries, self._token_text)
        lp, c.offset = R.completion_logprobs(entries, self._token_text, c.offset)
        return lp

    async def _outputs(self):
        """(choice, output) as they come, from every choice's stream."""
        if len(self.choices) == 1:
            c = self.choices[0]
            async for out in c.stream:
                yield c, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice):
            try:
                async for out in c.stream:
                    queue.put_nowait((c, out, None))
            except BaseException as e:     # noqa: BLE001 -- handed to the reader
                queue.put_nowait((c, None, e))
                return
            queue.put_nowait((c, None, None))
        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            left = len(tasks)
            while left:
                c, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    left -= 1
                    continue
                yield c, out
        finally:
            for t in tasks:
                t.cancel()

    async def sse(self, include_usage: bool):
        name, rid, created = self.model, self.rid, self.created
        done = False
        body = R.chat_body if self.chat else R.completion_body

        def chunk(choices: list, **extra) -> bytes:
            """A stream chunk; with stream_options.continuous_usage_stats (and
            include_usage) carrying the usage so far, as vLLM's do."""
            d = body(rid, created, name, choices, None, True, include_usage, **extra)
            if self.continuous_usage:     # the tokens sent so far: not the engine's live
                d["usage"] = R.usage(self.num_prompt_tokens,   # list, which runs ahead
                                     sum(c.num_sent for c in self.choices))
            return R.sse(d)
        try:
            if self.chat:
                for c in self.choices:
                    first = R.chat_choice(c.index, "", None, delta={"role": "assistant", "content": ""})
                    extra = {"prompt_token_ids": c.prompt_ids} if self.token_ids \
                        and c is self.choices[0] else {}
                    yield chunk([first], **extra)
            async for c, out in self._outputs():
                c.last = out
                c.num_sent += 0 if self.prompt_only else len(out.new_token_ids)
                if not self.chat and self.echo and not c.echoed:
                    # the prompt first (once its logprobs, if asked for, are known)
                    c.echoed = c.started = True
                    first = R.completion_choice(c.index, self._prompt_text(c), None,
                                                self._echo_logprobs(c, out))
                    if self.token_ids:
                        first["prompt_token_ids"] = c.prompt_ids
                    plp = self._prompt_logprobs(out)
                    if plp is not None:
                        first["prompt_logprobs"] = plp
                    yield chunk([first])
                if out.finished and out.finish_reason not in ("stop", "length"):
                    raise Aborted(f"the request ended with finish_reason {out.finish_reason!r}")
                if self.prompt_only:
                    if out.finished:
                        yield chunk([R.completion_choice(c.index, "", "length")])
                    continue
                reason = out.finish_reason if out.finished else None
                if self.tools is not None:    # chat text through the tool-call parser
                    if c.streamer is None:
                        c.streamer = self.tools.streamer()
                    c.text += out.new_text
                    # the step's logprobs and token ids ride on the next chunk sent (text
                    # the parser holds back is sent later, or never as content)
                    c.held_ids += out.new_token_ids
                    if self.want_logprobs:
                        c.held_logprobs += out.new_logprobs or []
                    think, _, answer = self._split(c, out.finished)
                    # the reasoning as it comes; the tool-call parser reads the answer alone
                    deltas = [{"reasoning": think}] if think and self.show_reasoning else []
                    deltas += c.streamer.feed(answer, out.finished)
                    if reason:
                        deltas.append(None)          # the finishing chunk
                    for delta in deltas:
                        if delta is None:
                            choice = self._tool_choice(c, self.tools.finish_reason(
                                c.streamer.calls, reason), {})
                            if out.stop_reason is not None:
                                choice["stop_reason"] = out.stop_reason
                        else:
                            choice = self._tool_choice(c, None, delta)
                        # vLLM's prompt_logprobs: on the choice's first chunk
                        plp = self._prompt_logprobs(out) if not c.started else None
                        c.started = True
                        yield chunk([choice], **({} if plp is None else {"prompt_logprobs": plp}))
                    continue
                new_ids = out.new_token_ids
                delta = None
                if self.chat and self.reasoning is not None:
                    c.text += out.new_text
                    think, said, _ = self._split(c, out.finished)
                    delta = ({"reasoning": think} if think and self.show_reasoning else {}) | (
                        {"content": said} if said else {})
                elif self.chat:
                    delta = {"content": out.new_text} if out.new_text else {}
                has_text = bool(delta) if self.chat else bool(out.new_text)
                if not (has_text or reason or (new_ids and (self.want_logprobs or self.token_ids))):
                    continue
                lp = self._logprobs(c, out.new_logprobs) if new_ids else None
                ids = list(new_ids) if self.token_ids else None
                stop_reason = out.stop_reason if reason else None
                if self.chat:
                    choice = R.chat_choice(c.index, "", reason, lp, stop_reason, ids, delta=delta)
                    plp = self._prompt_logprobs(out) if not c.started else None
                    c.started = True
                    if plp is not None:      # with the choice's first tokens, on the chunk
                        if stop_reason is None:
                            choice.pop("stop_reason", None)
                        yield chunk([choice], prompt_logprobs=plp)
                        continue
                else:
                    prompt_ids = c.prompt_ids if self.token_ids and not c.started else None
                    plp = self._prompt_logprobs(out) if not c.started else None
                    c.started = True
                    choice = R.completion_choice(c.index, out.new_text, reason, lp, stop_reason,
                                                 prompt_ids, ids)
                    if plp is not None:
                        choice["prompt_logprobs"] = plp
                if stop_reason is None:
                    choice.pop("stop_reason", None)
                yield chunk([choice])
            self.outcome = self.last.finish_reason if self.last else "abort"
            if include_usage:
                obj = "chat.completion.chunk" if self.chat else "text_completion"
                yield R.sse(R.usage_chunk(rid, created, name, obj, self._usage()))
            yield R.SSE_DONE
            done = True
        except (Aborted, Unavailable, Rejected) as e:
            # the server aborted it (shutdown), the engine failed or cannot run it: say so
            # (as /metrics counts it: an engine failure is an error, a shutdown an abort)
            self.outcome = "abort" if isinstance(e, Aborted) else "error"
            kind = "invalid_request_error" if isinstance(e, Rejected) else "service_unavailable"
            yield R.sse(error_body(str(e), kind))
            yield R.SSE_DONE
            done = True
        finally:
            if not done:          # the client went away (the generator was cancelled/closed)
                self._abort_all()
            else:
                self._abort_all("the request failed")   # no-op for finished streams
            self._log()

    async def whole(self, request: Request):
        watcher = asyncio.create_task(self._watch_disconnect(request))
        try:
            async for c, out in self._outputs():
                c.last = out
            bad = [c.last for c in self.choices
                   if c.last is None or c.last.finish_reason not in ("stop", "length")]
            if bad:
                why = bad[0].stop_reason if bad[0] else None      # the engine's reason, if any
                raise Aborted(f"the request ended with finish_reason "
                              f"{bad[0].finish_reason if bad[0] else None!r}"
                              + (f": {why}" if isinstance(why, str) else ""))
            self.outcome = self.last.finish_reason
        except Rejected as e:
            self.outcome = "error"
            self._abort_all("the request failed")
            raise bad_request(str(e)) from None
        except (Aborted, Unavailable) as e:
            self.outcome = "abort" if isinstance(e, Aborted) else "error"
            self._abort_all("the request failed")
            raise APIError(503, str(e), "service_unavailable", None, "aborted") from None
        except asyncio.CancelledError:
            self._abort_all()
            raise
        finally:
            watcher.cancel()
            self._log()
        return JSONResponse(self._body())

    def _body(self) -> dict:
        """The whole response: each prompt's n choices (for best_of, the n of highest
        cumulative logprob among its best_of samples), indexed prompt * n + rank."""
        p, n = self.params, self.params.n
        chosen: list[tuple[int, _Choice]] = []
        for pi in sorted({c.prompt for c in self.choices}):
            mine = [c for c in self.choices if c.prompt == pi]
            if p.best_of is not None and p.best_of > n:
                mine = sorted(mine, key=lambda c: -c.last.cumulative_logprob)[:n]
            chosen += [(pi * n + j, c) for j, c in enumerate(mine)]
        choices = []
        for index, c in chosen:
            out = c.last
            text = out.text or ""
            echo_lp = self._echo_logprobs(c, out) if self.echo and not self.chat else None
            lp = self._logprobs(c, out.logprobs) if p.logprobs is not None else None
            if echo_lp is not None and lp is not None:
                lp = {k: echo_lp[k] + lp[k] for k in lp}
            ids = list(out.token_ids) if self.token_ids else None
            stop_reason, finish = out.stop_reason, out.finish_reason
            if self.prompt_only:        # the prompt alone: its run's one token dropped
                text, lp, stop_reason, finish = "", echo_lp, None, "length"
                ids = [] if self.token_ids else None
            think = None
            if self.chat and self.reasoning is not None:
                think, text = self.reasoning.split(text)
            if self.chat and self.tools is not None:
                content, calls = self.tools.message(text or "")
                if text is None:        # cut off while still reasoning: no answer (null)
                    content = None
                reason = self.tools.finish_reason(len(calls), out.finish_reason)
                ch = R.chat_choice(index, content, reason, lp, stop_reason, ids)
                if calls:
                    ch["message"]["tool_calls"] = calls
            elif self.chat:
                ch = R.chat_choice(index, text, out.finish_reason, lp, stop_reason, ids)
            else:
                if self.echo:
                    text = self._prompt_text(c) + text
                ch = R.completion_choice(index, text, finish, lp, stop_reason,
                                         c.prompt_ids if self.token_ids else None, ids)
                plp = self._prompt_logprobs(out)
                if plp is not None:
                    ch["prompt_logprobs"] = plp
            if self.chat and self.reasoning is not None:    # vLLM's field, null for none
                ch["message"]["reasoning"] = think if self.show_reasoning else None
            if stop_reason is None:
                ch.pop("stop_reason", None)
            choices.append(ch)
        name = self.model
        if self.chat:
            extra = {"prompt_token_ids": self.choices[0].prompt_ids} if self.token_ids else {}
            plp = self._prompt_logprobs(chosen[0][1].last)
            if plp is not None:
                extra["prompt_logprobs"] = plp
            return R.chat_body(self.rid, self.created, name, choices, self._usage(), **extra)
        return R.completion_body(self.rid, self.created, name, choices, self._usage())

    async def _watch_disconnect(self, request: Request):
        """Abort when the client of a non-streamed request goes away. The body has been
        read, so the next ASGI message can only be `http.disconnect` (uvicorn also sends it
        once the response is complete, by which time this task is cancelled)."""
        while not all(c.stream.finished for c in self.choices):
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self._abort_all("the client disconnected")
                return

    def _usage(self) -> dict:
        n_out = 0 if self.prompt_only else sum(len(c.last.token_ids) for c in self.choices
                                               if c.last is not None)
        use = R.usage(self.num_prompt_tokens, n_out)
        if self.svc.prompt_tokens_details:    # each prompt's once, as its tokens count once
            firsts = {c.prompt: c for c in reversed(self.choices)}.values()
            use["prompt_tokens_details"] = {"cached_tokens": sum(
                c.last.num_cached_tokens for c in firsts if c.last is not None)}
        return use

    def _log(self) -> None:
        out = self.last
        n_out = sum(len(c.last.token_ids) for c in self.choices if c.last is not None)
        ttft = (out.metrics or {}).get("ttft") if out else None
        total = time.monotonic() - self.arrival
        log.info("request %s (%s): %d prompt tokens, %d output tokens, finish %s, ttft %s, "
                 "total %.3f s", self.client_rid, self.rid, self.num_prompt_tokens, n_out,
                 self.outcome, "-" if ttft is None else f"{ttft:.3f} s", total)


# ---- errors and the request-id middleware ---------------------------------------------------

def _error(status: int, message: str, type: str = "invalid_request_error",
           param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        ctype = request.headers.get("content-type", "")
        if param is None and ctype and "json" not in ctype.split(";")[0].lower():
            # FastAPI reads the body as JSON only when it is sent as JSON (`curl -d`
            # sends application/x-www-form-urlencoded): say that, not "not an object"
            message = (f"the request body must be sent as JSON, with Content-Type: "
                       f"application/json (got Content-Type: {ctype[:100]})")
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, message, kind)

    @app.exception_handler(Unavailable)
    async def unavailable(request, exc: Unavailable):
        # a route that reaches the engine between steps (AsyncEngine.call: loading a LoRA
        # adapter, resetting the prefix cache) while the server drains or its engine thread
        # is gone: the 503 of /health
        return _error(503, str(exc), "service_unavailable", code="unavailable")

    @app.exception_handler(BrazeError)
    async def braze_error(request, exc: BrazeError):
        return _error(400, str(exc), param=getattr(exc, "param", None))

    app.add_middleware(RequestIdMiddleware)


class RequestIdMiddleware:
    """Pure ASGI (streaming-safe): sets X-Request-Id on every response, including the 500
    it sends itself when a route raises something unexpected."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = client_request_id(scope)
        rid = given or uuid.uuid4().hex
        scope["braze.request_id"] = rid
        scope["braze.client_request_id"] = given   # the base of response ids, as in vLLM
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", rid)
            if started:
                raise
            await send_error(send_with_id, 500, "internal server error (a bug in braze; see "
                             "the server log)", "internal_error")


__all__ = ["RequestIdMiddleware", "Service", "create_app"]
