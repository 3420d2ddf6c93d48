"""LoRA adapters over HTTP, with vLLM's shapes (runtime/lora.py does the work):

    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}  -> 200 "Success: LoRA adapter 'x' added successfully."
                                  (with "load_inplace": true an adapter of that name is
                                  replaced; requests running with the old one finish)
    POST /v1/unload_lora_adapter  {"lora_name"}               -> 200 "Success: LoRA adapter 'x' removed successfully."
    GET  /v1/models               the base model, then one card per adapter with its "parent"
    "model": "<lora_name>"        in a completion or chat request runs it with that adapter
                                  (and its response names the adapter as its "model")

`--lora-modules` takes vLLM's two forms, `name=path` and `{"name", "path",
"base_model_name"}` (JSON; base_model_name is the adapter's "parent" in /v1/models).

Errors are OpenAI-shaped: a missing field, a duplicate name, an adapter the artifact
cannot serve (rank above --max-lora-rank, a module the model lacks or the artifact did
not target) are 400; an unknown name or a path with no adapter is 404. The load and
unload routes work only with `braze serve --allow-runtime-lora-updating` or vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING=true (they read any path the server can); without, they
answer a 404 naming the flag.

Unloading lets requests already admitted with the adapter finish; a request naming it
afterwards gets the 404 of an unknown model. The adapter is read from disk in a worker
thread and registered on the engine thread between steps, so decoding goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import json

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from braze.runtime.lora import Contract, LoRAError, LoRARequest

from .protocol import APIError

_IDS = itertools.count(1)


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str | None = None
    lora_int_id: int | None = None


def manager(svc):
    return getattr(svc.aengine.engine, "lora", None)


def lora_for(svc, model: str | None) -> str | None:
    """The adapter a request's "model" names, or None for the base model."""
    m = manager(svc)
    if not model or model in svc.served_names or m is None:
        return None
    return model if model in m.registered else None


def response_model(svc, model: str | None) -> str:
    """The "model" a response names, as vLLM's do: the adapter the request ran with, else
    the served model."""
    return lora_for(svc, model) or svc.model_name


def model_cards(svc) -> list[dict]:
    m = manager(svc)
    if m is None:
        return []
    return [{"id": name, "object": "model", "created": svc.created, "owned_by": "braze",
             "root": req.lora_path, "parent": svc.lora_parents.get(name, svc.model_name),
             "max_model_len": svc.max_model_len}
            for name, (req, _) in list(m.registered.items())]


def as_api_error(e: LoRAError) -> APIError:
    if e.status == 404:
        return APIError(404, str(e), "NotFoundError", "lora_path", "not_found")
    return APIError(400, str(e), "BadRequestError", None, "bad_request")


def check_options(manifest: dict, allow_updates: bool) -> None:
    """Before the engine loads: the runtime load/unload routes need an artifact that serves
    adapters (on any other they could only ever answer 400)."""
    if allow_updates and Contract.from_manifest(manifest) is None:
        raise LoRAError("--allow-runtime-lora-updating (or $VLLM_ALLOW_RUNTIME_LORA_UPDATING): "
                        "this artifact serves no LoRA adapters; compile it with --lora-slots K "
                        "(and --max-lora-rank R), or drop the flag (unset the variable)")


def module_spec(spec: str) -> tuple[str, str, str | None]:
    """One `--lora-modules` entry in either of vLLM's forms, `name=path` or a JSON object
    {"name", "path", "base_model_name"?} -> (name, path, base_model_name or None)."""
    if not spec.lstrip().startswith("{"):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LoRAError(f"--lora-modules entry {spec!r} is not name=path (or a JSON "
                            f"object with name and path)")
        return name, path, None
    try:
        d = json.loads(spec)
    except ValueError as e:
        raise LoRAError(f"--lora-modules entry {spec!r} is not valid JSON ({e})") from None
    extra = sorted(set(d) - {"name", "path", "base_model_name"}) if isinstance(d, dict) else []
    if extra:
        raise LoRAError(f"--lora-modules entry {spec!r} has unknown key(s) "
                        f"{', '.join(map(repr, extra))}; it takes name, path and "
                        f"base_model_name")
    base = d.get("base_model_name") if isinstance(d, dict) else None
    if (not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d[k]
                                           for k in ("name", "path"))
            or not isinstance(base, (str, type(None)))):
        raise LoRAError(f"--lora-modules entry {spec!r} needs \"name\" and \"path\" "
                        f"strings (and optionally \"base_model_name\")")
    return d["name"], d["path"], base


def load_at_start(engine, modules: list[str], model_names: list[str]) -> dict[str, str]:
    """`--lora-modules name=path ...`: registered before the server answers. A request
    naming one of `model_names` (the served model's) runs the base model, so no adapter may
    take it.
    Returns the parents /v1/models names where an entry gave base_model_name."""
    parents, paths = {}, {}
    for spec in modules:
        name, path, base = module_spec(spec)
        if name in model_names:
            raise LoRAError(f"--lora-modules: the adapter name {name!r} is the served model's "
                            f"name (requests naming it get the base model); pick another")
        if name in paths:
            raise LoRAError(f"--lora-modules names the adapter {name!r} twice ({paths[name]} "
                            f"and {path}); give each adapter its own name")
        paths[name] = path
        engine.add_lora(LoRARequest(name, next(_IDS), path))
        if base:
            parents[name] = base
    return parents


def install(app: FastAPI, svc, allow_updates: bool) -> None:
    if not allow_updates:
        async def off():
            raise APIError(404, "loading and unloading LoRA adapters at run time is off: start "
                                "braze serve with --allow-runtime-lora-updating (or with "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true in its environment)",
                           "NotFoundError", None, "not_found")
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            app.post(path)(off)
        return

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        m = manager(svc)
        if m is None:
            raise APIError(400, "this artifact serves no LoRA adapters; compile it with "
                                "--lora-slots K", "BadRequestError", None, "bad_request")
        if not body.lora_name or not body.lora_path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                           "InvalidUserInput", None, "bad_request")
        name = body.lora_name
        if name in svc.served_names:
            raise APIError(400, f"The lora adapter name {name!r} is the base model's name; "
                                f"pick another", "InvalidUserInput", "lora_name", "bad_request")
        if name in m.registered and not body.load_inplace:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you "
                                f"want to load the adapter in place, set 'load_inplace' to "
                                f"True.", "InvalidUserInput", "lora_name", "bad_request")
        req = LoRARequest(name, next(_IDS), body.lora_path)
        loop = asyncio.get_running_loop()
        try:
            host = await loop.run_in_executor(None, m.read, req)
            await svc.aengine.call(lambda eng: eng.lora.add(req, host, replace=body.load_inplace))
        except LoRAError as e:
            raise as_api_error(e) from None
        svc.lora_parents.pop(name, None)        # a --lora-modules base_model_name no more
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        m = manager(svc)
        if not body.lora_name:
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                           "InvalidUserInput", None, "bad_request")
        name = body.lora_name
        if m is None or name not in m.registered:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError",
                           "lora_name", "not_found")
        try:
            await svc.aengine.call(lambda eng: eng.remove_lora(name))
        except LoRAError as e:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError",
                           "lora_name", "not_found") from e
        svc.lora_parents.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
