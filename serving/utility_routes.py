"""Routes beside the OpenAI API that vLLM users script against:

    GET|POST /ping     200 {} while healthy, else the 503 of /health (load balancers)
    GET  /load         vLLM's {"server_load": N}: the engine requests in flight (running
                       or waiting; a request of n samples counts n), for load balancers
    POST /tokenize     {prompt} or {messages, tools, ...} -> {count, max_model_len, tokens,
                       token_strs}
    POST /detokenize   {tokens} -> {prompt}
    POST /reset_prefix_cache   200 {}: the device's prefix cache forgets every prefix
                       (the KV tiers below it keep theirs)
    GET  /server_info  what this server runs: the artifact's compile options, kernels and
                       targets, the engine's and the server's configuration, as JSON

/tokenize with `messages` renders them exactly as /v1/chat/completions does, so `count`
is the prompt_tokens that request would report; `add_special_tokens` (default: what the
chat route does for messages, true for a prompt) asks for the tokenizer's own BOS or not.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from braze import __version__

from .protocol import ChatMessage, bad_request, check_chat, error_body


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


def install(app: FastAPI, svc) -> None:
    @app.get("/ping")
    @app.post("/ping")
    async def ping():
        reason = svc.aengine.unavailable_reason()
        if reason is not None:
            return JSONResponse(error_body(reason, "service_unavailable"), status_code=503)
        return JSONResponse({})

    @app.get("/load")
    async def load():
        return {"server_load": svc.aengine.num_inflight}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        svc.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("send either prompt (text) or messages (a chat)", "prompt")
        if body.messages is not None:
            if not body.messages:
                raise bad_request("messages is empty", "messages")
            check_chat(body)
            from .tools import template_tools
            ids = await svc.prompts.chat(body, body.add_special_tokens,
                                         tools=template_tools(body))
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await svc.prompts.ids(body.prompt, add)
        strs = svc.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": svc.max_model_len, "tokens": ids,
                "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        svc.check_model(body.model)
        if svc.tokenizer is None:
            raise bad_request("this model has no tokenizer", "tokens")
        vocab = svc.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                              "tokens")
        text = await svc.prompts.off_loop(len(body.tokens), svc.tokenizer.decode, body.tokens,
                                          False)
        return {"prompt": text}

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        # between two steps, on the engine's thread
        await svc.aengine.call(lambda engine: engine.reset_prefix_cache())
        return JSONResponse({})

    info: dict = {}

    @app.get("/server_info")
    async def server_info():
        if not info:           # static: built on first use
            info.update(describe(svc, app.state.server_options))
        return info


def describe(svc, options) -> dict:
    """The artifact, engine and server configuration of this server, JSON-ready."""
    engine = svc.aengine.engine
    art = engine.artifact
    m = art.manifest
    kernels = {name: {"module": k.get("module"), "fn": k.get("fn"),
                      "cubin_targets": sorted(k.get("cubins") or {})}
               for name, k in (m.get("kernels") or {}).items()}
    compile_info = m.get("compile") or {}
    runner = engine.runner
    return {
        "version": __version__,
        "model_name": svc.model_name,
        "artifact": {
            "path": str(art.root),
            "format_version": m.get("format_version"),
            "created": m.get("created"),
            "versions": m.get("versions"),
            "model": m.get("model"),
            "compile_options": m.get("options"),
            "limits": m.get("limits"),
            "targets": m.get("targets"),
            "passes": compile_info.get("passes"),
            "extern_ops": compile_info.get("extern_ops"),
            "segments": len((m.get("plan") or {}).get("segments") or []),
            "kernels": kernels,
            "trust": getattr(art.trust, "how", None),
        },
        "engine": {
            "options": asdict(engine.options),
            "backend": engine.backend,
            "max_model_len": engine.max_model_len,
            "max_num_seqs": runner.max_num_seqs,
            "max_num_tokens": runner.max_num_tokens,
            "block_size": runner.block_size,
            "num_kv_blocks": runner.num_kv_blocks,
            "async_scheduling": engine.async_scheduling,
            # what the engine resolved its None defaults to on this device
            "fused_prepare": runner.batch.prepare_kernel is not None,
            # CUDA graphs are captured on the cuda backend only, whatever the option says
            "cudagraph_mode": (getattr(runner.graphs, "mode", None)
                               if engine.backend == "cuda" else "none"),
            # the KV tiers and the LoRA cache as they run (a lower tier alone brings a
            # default host tier; max_cpu_loras is at least the artifact's slots)
            "kv_offload": engine.offload.summary() if engine.offload is not None else None,
            "lora": _lora(engine),
            # what a request's unset sampling fields get (runtime/sampling_defaults.py)
            "sampling_defaults": engine.sampling_defaults,
        },
        "server": options.public(),
    }


def _lora(engine) -> dict | None:
    m = getattr(engine, "lora", None)
    if m is None:
        return None
    return {"slots": m.contract.slots, "max_loras": m.max_loras,
            "max_rank": m.contract.max_rank, "max_cpu_loras": m.max_cpu_loras}
