"""The FastAPI application: OpenAI routes, health, version, metrics, and error shaping.

Every response carries `X-Request-Id` (the client's, else a new one) and every error is
OpenAI-shaped ({"error": {"message", "type", "param", "code"}}): FastAPI's 422 for a bad
body becomes 400, unknown routes 404, unexpected exceptions 500 (logged with traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from braze import __version__
from braze.ir.errors import BrazeError
from braze.runtime.sampler import SamplingParams

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
    completion_prompt,
    error_body,
    sampling_kwargs,
    send_error,
    validation_message,
)
from .read_timeouts import BodyTimeout

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
    trust_request_chat_template: bool = False

    def __post_init__(self):
        self.created = int(time.time())
        self.prompts = Prompts(self, self.trust_request_chat_template)   # serving/prompts.py
        # Does encoding prepend a BOS by itself? Then a template's own BOS is dropped.
        self.adds_bos = False
        bos = self.chat_template.bos_token if self.chat_template else ""
        if self.tokenizer is not None and bos:
            bos_id = self.tokenizer.token_id(bos)
            self.adds_bos = bos_id is not None and self.tokenizer.encode("")[:1] == [bos_id]

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r} (see /v1/models)",
                           "invalid_request_error", "model", "model_not_found")

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send the prompt as token ids",
                              "prompt")
        return self.tokenizer.encode(prompt)

    async def submit(self, request_id: str, ids: list[int], params: SamplingParams,
                     prompt_param: str = "prompt") -> RequestStream:
        try:
            params.validate()
            return await self.aengine.add(request_id, ids, params, len(ids))
        except BrazeError as e:
            param = getattr(e, "param", None)
            raise bad_request(str(e), prompt_param if param == "prompt" else param) from None
        except QueueFull as e:
            self.metrics.rejected += 1
            raise APIError(503, str(e), "server_overloaded", None, "queue_full") from None
        except Unavailable as e:
            self.metrics.rejected += 1
            raise APIError(503, str(e), "service_unavailable", None, "unavailable") from None


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

    @app.get("/health")
    async def health():
        reason = svc.aengine.unavailable_reason()
        if reason is not None:
            return _error(503, reason, "service_unavailable")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return R.model_list(svc.model_name, svc.created, svc.max_model_len)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(svc.metrics.render(svc.aengine.snapshot()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        svc.check_model(body.model)
        prompt = completion_prompt(body)
        ids = await svc.prompts.for_model(prompt)
        if body.max_tokens is not None and "max_tokens" in body.model_fields_set:
            max_tokens = body.max_tokens
            if len(ids) < svc.max_model_len:       # else the engine says the prompt is too long
                check_context(len(ids), max_tokens, svc.max_model_len, "max_tokens")
        else:                     # the OpenAI default, 16, as far as the context allows
            max_tokens = max(1, min(16, svc.max_model_len - len(ids)))
        params = SamplingParams(**sampling_kwargs(body, max_tokens))
        return await _generate(svc, request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        svc.check_model(body.model)
        max_tokens = chat_max_tokens(body)
        ids = await svc.prompts.chat(body, for_model=True)
        if max_tokens is None:     # chat default: up to the end of the context
            max_tokens = max(1, svc.max_model_len - len(ids))
        elif len(ids) < svc.max_model_len:         # else the engine says the prompt is too long
            check_context(len(ids), max_tokens, svc.max_model_len,
                          "max_completion_tokens" if body.max_completion_tokens is not None
                          else "max_tokens")
        params = SamplingParams(**sampling_kwargs(body, max_tokens))
        return await _generate(svc, request, body, ids, params, chat=True)

    return app


# ---- generation --------------------------------------------------------------------------

async def _generate(svc: Service, request: Request, body, ids: list[int], params, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    stream = await svc.submit(rid, ids, params, "messages" if chat else "prompt")
    job = _Job(svc, stream, rid, request.scope.get("braze.request_id", rid), chat,
               int(time.time()))
    if body.stream:
        return StreamingResponse(job.sse(body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await job.whole(request)


class _Job:
    """One admitted request: its output stream rendered as SSE or as one JSON body."""

    def __init__(self, svc: Service, stream: RequestStream, rid: str, client_rid: str,
                 chat: bool, created: int):
        self.svc, self.stream, self.rid, self.client_rid = svc, stream, rid, client_rid
        self.chat, self.created = chat, created
        self.last = None
        self.outcome = "abort"

    async def sse(self, include_usage: bool):
        name, rid, created = self.svc.model_name, self.rid, self.created
        done = False
        try:
            if self.chat:
                yield R.sse(R.chat_chunk(rid, created, name, {"role": "assistant", "content": ""},
                                         with_usage_field=include_usage))
            async for out in self.stream:
                self.last = out
                if out.finished and out.finish_reason not in ("stop", "length"):
                    raise Aborted(f"the request ended with finish_reason {out.finish_reason!r}")
                reason = out.finish_reason if out.finished else None
                if out.new_text or reason:
                    if self.chat:
                        delta = {"content": out.new_text} if out.new_text else {}
                        chunk = R.chat_chunk(rid, created, name, delta, reason, include_usage)
                    else:
                        chunk = R.completion_chunk(rid, created, name, out.new_text, reason,
                                                   include_usage)
                    yield R.sse(chunk)
            self.outcome = self.last.finish_reason if self.last else "abort"
            if include_usage:
                obj = "chat.completion.chunk" if self.chat else "text_completion"
                yield R.sse(R.usage_chunk(rid, created, name, obj, self._usage()))
            yield R.SSE_DONE
            done = True
        except (Aborted, Unavailable, Rejected) as e:
            # the server aborted it (shutdown), the engine failed or cannot run it: say so
            self.outcome = "error" if isinstance(e, Rejected) else "abort"
            kind = "invalid_request_error" if isinstance(e, Rejected) else "service_unavailable"
            yield R.sse(error_body(str(e), kind))
            yield R.SSE_DONE
            done = True
        finally:
            if not done:          # the client went away (the generator was cancelled/closed)
                self.stream.abort()
            self._log()

    async def whole(self, request: Request):
        watcher = asyncio.create_task(self._watch_disconnect(request))
        try:
            async for out in self.stream:
                self.last = out
            if self.last is None or self.last.finish_reason not in ("stop", "length"):
                raise Aborted(f"the request ended with finish_reason "
                              f"{self.last.finish_reason if self.last else None!r}")
            self.outcome = self.last.finish_reason
        except Rejected as e:
            self.outcome = "error"
            raise bad_request(str(e)) from None
        except (Aborted, Unavailable) as e:
            self.outcome = "abort"
            raise APIError(503, str(e), "service_unavailable", None, "aborted") from None
        except asyncio.CancelledError:
            self.stream.abort()
            raise
        finally:
            watcher.cancel()
            self._log()
        out = self.last
        text = out.text or ""
        make = R.chat_completion if self.chat else R.completion
        return JSONResponse(make(self.rid, self.created, self.svc.model_name, text,
                                 out.finish_reason, self._usage()))

    async def _watch_disconnect(self, request: Request):
        """Abort when the client of a non-streamed request goes away. The body has been
        read, so the next ASGI message can only be `http.disconnect` (uvicorn also sends it
        once the response is complete, by which time this task is cancelled)."""
        while not self.stream.finished:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not self.stream.finished:
                    self.stream.abort("the client disconnected")
                return

    def _usage(self) -> dict:
        n_out = len(self.last.token_ids) if self.last else 0
        return R.usage(self.stream.num_prompt_tokens, n_out)

    def _log(self) -> None:
        out = self.last
        n_out = len(out.token_ids) if out else 0
        ttft = (out.metrics or {}).get("ttft") if out else None
        total = time.monotonic() - self.stream.arrival
        log.info("request %s (%s): %d prompt tokens, %d output tokens, finish %s, ttft %s, "
                 "total %.3f s", self.client_rid, self.rid, self.stream.num_prompt_tokens, n_out,
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
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, message, kind)

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
        rid = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                rid = v.decode("latin-1").strip()[:256] or None
                break
        rid = rid or uuid.uuid4().hex
        scope["braze.request_id"] = rid
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
