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


def model_list(names, created: int, max_model_len: int, root: str) -> dict:
    """The served model's cards, one per name, as vLLM's: `root` what it was loaded from
    (the artifact), `parent` null (LoRA adapters' cards name the first)."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                         "owned_by": "braze", "root": root, "parent": None,
                                         "max_model_len": max_model_len} for name in names]}


# ---- several choices, logprobs, token ids --------------------------------------------------

def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                      stop_reason=None, prompt_token_ids: list[int] | None = None,
                      token_ids: list[int] | None = None) -> dict:
    c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if stop_reason is not None:
        c["stop_reason"] = stop_reason
    if prompt_token_ids is not None:
        c["prompt_token_ids"] = prompt_token_ids
    if token_ids is not None:
        c["token_ids"] = token_ids
    return c


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None,
                stop_reason=None, token_ids: list[int] | None = None, delta: dict | None = None
                ) -> dict:
    """A chat choice: a `message` (whole response) or, with `delta`, a stream chunk's."""
    c = {"index": index}
    if delta is not None:
        c["delta"] = delta
    else:
        c["message"] = {"role": "assistant", "content": text}
    c["logprobs"] = logprobs
    c["finish_reason"] = finish_reason
    if stop_reason is not None:
        c["stop_reason"] = stop_reason
    if token_ids is not None:
        c["token_ids"] = token_ids
    return c


def completion_body(id: str, created: int, model: str, choices: list[dict], use: dict | None,
                    chunk: bool = False, with_usage_field: bool = False) -> dict:
    d = {"id": id, "object": "text_completion", "created": created, "model": model,
         "choices": choices}
    if not chunk:
        d["usage"] = use
        d["system_fingerprint"] = None
    elif with_usage_field:
        d["usage"] = None
    return d


def chat_body(id: str, created: int, model: str, choices: list[dict], use: dict | None,
              chunk: bool = False, with_usage_field: bool = False,
              prompt_token_ids: list[int] | None = None, prompt_logprobs: list | None = None
              ) -> dict:
    d = {"id": id, "object": "chat.completion.chunk" if chunk else "chat.completion",
         "created": created, "model": model, "choices": choices}
    if not chunk:
        d["usage"] = use
        d["system_fingerprint"] = None
    elif with_usage_field:
        d["usage"] = None
    if prompt_token_ids is not None:
        d["prompt_token_ids"] = prompt_token_ids
    if prompt_logprobs is not None:
        d["prompt_logprobs"] = prompt_logprobs
    return d


# vLLM's floor for a logprob in a response: tokens a grammar (or bad words, min_tokens)
# masks have -inf, which JSON cannot carry (Python writes -Infinity; strict parsers refuse it)
LOGPROB_FLOOR = -9999.0


def token_text(tokenizer, tid: int, as_ids: bool = False) -> str:
    """A token as logprobs name it: its text with special tokens kept, or vLLM's
    "token_id:N" (return_tokens_as_token_ids, or a model without a tokenizer)."""
    if tokenizer is None or as_ids:
        return f"token_id:{tid}"
    return tokenizer.decode([tid], skip_special_tokens=False)


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def completion_logprobs(entries, token_text, offset: int) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` for TokenLogprobs `entries` (runtime/request.py):
    {tokens, token_logprobs, top_logprobs: [{token: logprob}] (the top N and the sampled
    token), text_offset}; offsets count from `offset`. Returns it and the next offset."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        t = token_text(e.token_id)
        tokens.append(t)
        lps.append(finite(e.logprob))
        top = {token_text(i): finite(v) for i, v in e.top}
        top.setdefault(t, finite(e.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(t)
    return ({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
             "text_offset": offsets}, offset)


def chat_logprobs(entries, token_text) -> dict:
    """OpenAI's chat `logprobs`: {content: [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def item(tid: int, lp: float) -> dict:
        t = token_text(tid)
        return {"token": t, "logprob": finite(lp), "bytes": list(t.encode("utf-8"))}
    return {"content": [item(e.token_id, e.logprob)
                        | {"top_logprobs": [item(i, v) for i, v in e.top]} for e in entries]}
