"""Response bodies of the OpenAI API and their server-sent-event framing.

Built as plain dicts (one per chunk, many per second under load) in exactly the shapes
the `openai` client parses. A stream is `data: {json}\\n\\n` chunks, then `data: [DONE]\\n\\n`.
"""

from __future__ import annotations

import json

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, text: str, finish_reason: str | None,
               use: dict) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": use, "system_fingerprint": None}


def completion_chunk(id: str, created: int, model: str, text: str,
                     finish_reason: str | None = None, with_usage_field: bool = False) -> dict:
    d = {"id": id, "object": "text_completion", "created": created, "model": model,
         "choices": [{"index": 0, "text": text, "logprobs": None,
                      "finish_reason": finish_reason}]}
    if with_usage_field:
        d["usage"] = None
    return d


def chat_completion(id: str, created: int, model: str, text: str | None,
                    finish_reason: str | None, use: dict, tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use, "system_fingerprint": None}


def chat_chunk(id: str, created: int, model: str, delta: dict,
               finish_reason: str | None = None, with_usage_field: bool = False) -> dict:
    d = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
         "choices": [{"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}]}
    if with_usage_field:
        d["usage"] = None
    return d


def usage_chunk(id: str, created: int, model: str, object: str, use: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, just usage."""
    return {"id": id, "object": object, "created": created, "model": model, "choices": [],
            "usage": use}


def model_list(name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                         "owned_by": "braze", "root": name,
                                         "max_model_len": max_model_len}]}
