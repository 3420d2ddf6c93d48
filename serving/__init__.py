"""Serving: an OpenAI-compatible HTTP server over the runtime engine (`braze serve`).

    async_engine  the Engine in one background thread, with asyncio streams per request
    protocol      request/response/error shapes of the OpenAI API (pydantic)
    chat          chat messages rendered with the tokenizer's chat template
    metrics       Prometheus text for /metrics
    app           the FastAPI routes
    server        uvicorn, signals, graceful drain

Imports `braze.runtime` only, never the compiler.
"""
