"""`braze serve`: load the engine, bind the port, run uvicorn, drain on SIGTERM.

The socket is bound before the engine loads, so "port in use" fails at once (one line,
no traceback). SIGTERM or Ctrl-C starts a drain instead of uvicorn's immediate shutdown:
new requests get 503 while in-flight ones finish, for at most `drain_timeout` seconds;
the rest are aborted (their streams end with an error event), then the server and the
engine thread stop and the process exits 0. A second signal ends the drain at once: what is
still in flight is aborted and answered (an OpenAI-shaped 503, or a stream's error event),
and the process exits with 128 + the signal's number, as a shell reports a killed process;
a third exits without answering.

Clients are held to `read_timeout` for a request's headers and body (read_timeouts.py),
at most `limit_concurrency` connections and requests are open at once (an OpenAI-shaped
503 with X-Request-Id beyond: concurrency.py), and the Host header is checked (hosts.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from braze.ir.errors import BrazeError

from .app import Service, create_app
from .concurrency import limited_protocol
from .hosts import hosts_to_answer, is_loopback
from .options import ServerOptions
from .read_timeouts import header_timeout_protocol

log = logging.getLogger("braze.serving")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise BrazeError(f"cannot listen on {host}:{port}: the address is already in use; "
                             "stop the other server or pick another --port") from None
        raise BrazeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _responses_store(so: ServerOptions):
    """The store of /v1/responses (serving/responses_store.py) when --enable-responses-store
    (or vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1) asks for one, else None."""
    env = os.environ.get("VLLM_ENABLE_RESPONSES_API_STORE", "").strip().lower()
    if not (so.enable_responses_store or env in ("1", "true")):
        return None
    from .responses_store import ResponseStore
    log.info("/v1/responses keeps the last %d responses in memory (previous_response_id, "
             "background, GET /v1/responses/{id}; --responses-store-size)",
             so.responses_store_size)
    return ResponseStore(so.responses_store_size)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(artifact, options=None, server: ServerOptions | None = None, **overrides) -> int:
    """Serve `artifact` with the engine `options` (runtime/options.EngineOptions; gc is
    frozen after start-up) and the `server` options (serving/options.ServerOptions, or its
    fields as keywords: host, port, ...) until SIGTERM; returns the exit status."""
    so = ServerOptions.of(server, **overrides)
    # the tokenizer's own worker threads would tokenise a long prompt at normal priority:
    # keep that work on the (nicer) tokenising threads of app.Service
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    host, port = so.host, so.port
    logging.basicConfig(level=getattr(logging, so.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from braze.runtime.engine import Engine
    from braze.runtime.loader import open_artifact
    from braze.runtime.options import EngineOptions
    from braze.runtime.chat_template import template_source
    from braze.runtime.tokenizer import Tokenizer

    from . import extensions
    from .async_engine import AsyncEngine
    from .chat import ChatTemplate
    from .metrics import Metrics

    from .tool_parsers import PARSERS, ALIASES, detect
    tool_call_parser = so.tool_call_parser
    if tool_call_parser is not None and ALIASES.get(tool_call_parser, tool_call_parser) not in PARSERS:
        raise BrazeError(f"--tool-call-parser {tool_call_parser!r} is not a parser braze has; "
                         f"choose one of {', '.join(sorted(PARSERS))}")
    from braze.runtime.parallel import torchrun_follower
    if torchrun_follower():          # torchrun ranks > 0: no socket; follow rank 0, then exit
        fo = EngineOptions.of(options)
        Engine(open_artifact(artifact, trusted_keys=fo.trusted_keys,
                             trust_artifact=fo.trust_artifact), fo)
        return 0
    from braze.runtime.chat_template import template_arg
    flag_template = template_arg(so.chat_template) if so.chat_template is not None else None
    sock = bind_socket(host, port)
    try:
        hooks = extensions.load_all(so.extensions)     # a bad name fails before the engine loads
        opts = EngineOptions.of(options, freeze_gc=True)
        art = open_artifact(artifact, trusted_keys=opts.trusted_keys,
                            trust_artifact=opts.trust_artifact)
        from .lora_routes import check_options, load_at_start
        check_options(art.manifest, so.allow_runtime_lora_updating)
        engine = Engine(art, opts)
        from braze.runtime.lora import apply_vllm_options
        apply_vllm_options(engine.lora, art.root, so.enable_lora or None, so.max_loras,
                           so.max_lora_rank)
        names = so.served_model_names or [engine.model_name]
        name = names[0]
        lora_parents = load_at_start(engine, so.lora_modules, names)
        tokenizer = engine.tokenizer
        if tokenizer is None and art.tokenizer_dir is not None:
            tokenizer = Tokenizer(art.tokenizer_dir)
        config = getattr(tokenizer, "config", None) or {}
        source = flag_template or template_source(art.tokenizer_dir, config)
        template = None
        if flag_template is not None:
            template = ChatTemplate(source, config)
        elif source:
            try:
                template = ChatTemplate(source, config)
            except Exception as e:   # jinja2.TemplateSyntaxError: serve completions anyway
                log.warning("the model's chat template does not compile (%s); "
                            "/v1/chat/completions will answer 400 (pass --chat-template "
                            "to serve chat with another)", e)
        metrics = Metrics(name)
        parser = so.tool_call_parser or detect(source)
        if so.enable_auto_tool_choice and parser is None:
            engine.close()
            raise BrazeError("--enable-auto-tool-choice needs a tool-call parser, and this "
                             "model's chat template names none: add --tool-call-parser NAME "
                             f"(one of {', '.join(sorted(PARSERS))})")
        if parser is not None:
            log.info("tool calls (tool_choice auto) are read with the %r parser%s", parser,
                     "" if so.tool_call_parser else " (from the chat template)")
        svc = Service(AsyncEngine(engine, max_queue=so.max_queue, metrics=metrics,
                                  iteration_timeout=so.engine_iteration_timeout), metrics,
                      name, engine.max_model_len, tokenizer, template,
                      trust_request_chat_template=so.trust_request_chat_template,
                      tool_call_parser=parser, text_only_origin=art.text_only_origin,
                      lora_parents=lora_parents, sampling_defaults=engine.sampling_defaults,
                      reasoning=engine.reasoning,
                      prompt_tokens_details=so.enable_prompt_tokens_details,
                      default_chat_template_kwargs=so.default_chat_template_kwargs or {},
                      model_aliases=tuple(names[1:]),
                      responses_store=_responses_store(so))
        if engine.reasoning is not None:
            log.info("chat replies are split into reasoning and content at %s ... %s "
                     "(--reasoning-parser %s)", engine.reasoning.format.start,
                     engine.reasoning.format.end, engine.reasoning.name)
        if engine.sampling_defaults:
            log.info("requests that leave them unset get the model's sampling defaults %s "
                     "(its generation_config.json, --override-generation-config; "
                     "--generation-config vllm turns them off)", engine.sampling_defaults)
        hosts = hosts_to_answer(host, so.allowed_hosts)
        if hosts is None and not is_loopback(host):
            log.info("answering requests for any Host name (pass --allowed-hosts to restrict)")
        if so.api_keys:
            log.info("requests need an API key (%d accepted)", len(so.api_keys))
        elif not is_loopback(host):
            log.warning("no API key: anyone who reaches %s can use the model (pass --api-key "
                        "or set BRAZE_API_KEY)", host)
        app = create_app(svc, read_timeout=so.read_timeout, allowed_hosts=hosts, bind_host=host,
                         options=so)
        extensions.install(app, hooks)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5,
                                limit_concurrency=so.limit_concurrency,
                                http=limited_protocol(header_timeout_protocol(
                                    AutoHTTPProtocol, so.read_timeout)))
        server = DrainingServer(config, svc, so.drain_timeout, _url(sock))
        server.run(sockets=[sock])
        engine.close()          # the tensor-parallel ranks: told to stop, not left to find out
        log.info("stopped" if not server.forced_by else
                 f"stopped by a second signal ({server.forced_by}): exit status "
                 f"{server.exit_status}")
    finally:
        sock.close()
    return server.exit_status


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once."""

    def __init__(self, config, svc, drain_timeout: float, url: str):
        super().__init__(config)
        self.svc, self.drain_timeout, self.url = svc, drain_timeout, url
        self.drain_requested = False
        self.forced_by: str | None = None      # the signal that cut the drain short
        self.exit_status = 0
        self._drainer = None

    def handle_exit(self, sig, frame):
        # runs in the signal handler: set flags only (the loop polls them); not recording
        # the signal keeps uvicorn from re-raising it at exit, so a drained server exits 0
        if self.forced_by is not None:          # a third signal: out now, answering nothing
            self.should_exit = self.force_exit = True
        elif self.drain_requested:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            self.forced_by, self.exit_status = name, 128 + int(sig)
        else:
            self.drain_requested = True

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.should_exit:
            return
        self._drainer = asyncio.create_task(self._drain_when_asked())
        print(f"braze: serving {self.svc.model_name!r} at {self.url} "
              f"(OpenAI API: {self.url}/v1)", flush=True)

    async def _drain_when_asked(self):
        while not self.drain_requested and not self.should_exit:
            await asyncio.sleep(0.05)
        if self.should_exit:
            return
        aeng = self.svc.aengine
        aeng.begin_drain()
        log.info("draining: %d request(s) in flight, waiting up to %.0f s",
                 aeng.num_inflight, self.drain_timeout)
        if not await aeng.wait_idle(self.drain_timeout, lambda: self.forced_by is not None):
            why = (f"a second signal ({self.forced_by})" if self.forced_by
                   else "drain timeout")
            log.warning("%s: aborting %d request(s)", why, aeng.num_inflight)
            aeng.abort_all(f"the server is shutting down ({why})")
            await asyncio.sleep(0.2)     # let the aborted requests say so
        # not force_exit even after a second signal: that would skip the lifespan shutdown
        # (the engine thread's stop); the aborted requests have been answered already
        self.should_exit = True
