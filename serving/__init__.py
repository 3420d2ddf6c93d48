"""Serving: an OpenAI-compatible HTTP server over the runtime engine (`braze serve`).

    async_engine  the Engine in one background thread, with asyncio streams per request
    protocol      request/response/error shapes of the OpenAI API (pydantic)
    chat          chat messages rendered with the tokenizer's chat template
    metrics       Prometheus text for /metrics
    app           the FastAPI routes
    prompts       prompts to token ids: long ones on tokenising threads, checked
    utility_routes  /ping, /tokenize, /detokenize, /server_info
    options       ServerOptions: the server's side of `braze serve`'s flags
    auth, body_limit, hosts, read_timeouts   ASGI middleware (API key, 413, Host, 408)
    extensions    --extension: operator code that adds routes or middleware
    server        uvicorn, signals, graceful drain

Imports `braze.runtime` only, never the compiler.
"""
