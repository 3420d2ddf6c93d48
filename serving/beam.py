"""`use_beam_search` on /v1/completions and /v1/chat/completions (vLLM's extension).

`n` is the beam width and the number of choices returned, best first; `length_penalty`
weighs the score (runtime/beam_search.py). Each step every live beam of every prompt is
one engine request of one token with the 2n likeliest next tokens, submitted together
through the async engine; the client's other requests share the steps. The answer is
one JSON body: beam search cannot stream (its best sequences are known only at the end).
Options that a deterministic search has no use for or cannot honour are refused by
name rather than ignored (stop_token_ids among them: a beam ends at an EOS only);
temperature, top_p, top_k, min_p and seed do not apply and are not read.
`return_token_ids`, `skip_special_tokens` and `include_stop_str_in_output` (the EOS
that ended a beam kept in it) are honoured as vLLM does.
"""

from __future__ import annotations

import asyncio
import time

from braze.ir.errors import BrazeError
from braze.runtime.beam_search import BeamSearch, BeamSearchParams, advance_all, step_prompts

from . import responses as R
from .async_engine import Aborted, Rejected, Unavailable
from .lora_routes import lora_for, response_model
from .protocol import APIError, bad_request, first_set, response_ids
from .structured import GUIDED

# field -> the values a beam search request may send it with (its neutral ones)
_REFUSED = {"stream": (None, False), "logprobs": (None, False), "top_logprobs": (None,),
            "echo": (None, False), "best_of": (None,), "prompt_logprobs": (None,),
            "response_format": (None,), "structured_outputs": (None,),
            "tools": (None, []), "stop": (None, [], ""), "stop_token_ids": (None, []),
            "logit_bias": (None, {}),
            "bad_words": (None, []), "min_tokens": (None, 0), "allowed_token_ids": (None, []),
            **{field: (None,) for field in GUIDED}}


def check(body) -> None:
    found = first_set(body, _REFUSED)
    if found is not None:
        raise bad_request(f"use_beam_search cannot be combined with {found[0]}: leave it out "
                          f"(beam search returns its n best sequences whole)", found[0])


async def _unhold(svc, key: tuple) -> None:
    try:
        await svc.aengine.call(lambda eng: eng.lora.unhold(key))
    except Exception:           # draining or the engine gone: nothing runs it any more
        pass


async def respond(svc, body, prompts: list, max_tokens: int, chat: bool,
                  scope: dict | None = None) -> dict:
    """The response body of a beam search request over `prompts` ([(text, ids)]); `scope`:
    the HTTP request's (its X-Request-Id is the base of the response's id)."""
    check(body)
    params = BeamSearchParams(beam_width=body.n, max_tokens=max_tokens,
                              ignore_eos=body.ignore_eos,
                              length_penalty=getattr(body, "length_penalty", 1.0),
                              include_stop_str_in_output=body.include_stop_str_in_output)
    try:
        params.validate()
    except BrazeError as e:
        param = {"beam_width": "n"}.get(e.param, e.param)
        raise bad_request(str(e), param) from None
    eos = svc.aengine.engine.eos_token_ids
    searches = [BeamSearch(ids, params, eos, svc.max_model_len) for _, ids in prompts]
    rid, engine_rid = response_ids(scope or {}, "chatcmpl-" if chat else "cmpl-")
    step = params.step_params()
    lora = lora_for(svc, getattr(body, "model", None))
    kv = getattr(body, "kv_transfer_params", None)      # every step's, as a sampled request's
    where = "messages" if chat else "prompt"
    counter = iter(range(1 << 62))
    svc.admit()         # once: the search's steps are parts of an admitted request
    if lora is not None:
        # every step runs on the adapter version the search started with, as a sampled
        # request does: held until the search ends, though it be unloaded or replaced
        try:
            lora = await svc.aengine.call(lambda eng, name=lora: eng.lora.hold(name))
        except BrazeError as e:
            raise APIError(404, str(e), "invalid_request_error", "model",
                           "model_not_found") from None

    async def score_async(token_lists):
        streams = []
        try:
            for toks in token_lists:
                streams.append(await svc.submit(f"{engine_rid}-{next(counter)}", toks, step,
                                                kv_transfer_params=kv, prompt_param=where,
                                                lora=lora, bounded=False,
                                                cache_salt=getattr(body, "cache_salt", None),
                                                priority=getattr(body, "priority", None)))
            outs = await asyncio.gather(*(_final(s) for s in streams))
        except BaseException:
            for s in streams:
                s.abort("the beam search ended")
            raise
        return [[(t, lp) for t, lp in o.logprobs[0].top] for o in outs]

    try:
        with svc.aengine.holding():     # a drain waits for the search, not only its steps
            while not all(s.done for s in searches):
                advance_all(searches, await score_async(step_prompts(searches)))
    except Rejected as e:               # as a plain request's are answered
        raise bad_request(str(e)) from None
    except (Aborted, Unavailable, BrazeError) as e:
        raise APIError(503, str(e), "service_unavailable", None, "aborted") from None
    finally:
        if lora is not None:
            await _unhold(svc, lora)
    tok = svc.tokenizer
    skip_special = getattr(body, "skip_special_tokens", True)
    markers = svc.reasoning if chat else None       # --reasoning-parser: split each beam
    if markers is not None:
        skip_special = markers.skip_special_tokens(skip_special)
    with_ids = bool(getattr(body, "return_token_ids", False))
    choices, n_out = [], 0
    for pi, s in enumerate(searches):
        for j, seq in enumerate(s.result().sequences):
            text = tok.decode(seq.token_ids, skip_special_tokens=skip_special) \
                if tok is not None else ""
            index = pi * params.beam_width + j
            n_out += len(seq.token_ids)
            ids = list(seq.token_ids) if with_ids else None
            if markers is not None:
                think, text = markers.reply(s.prompt).split(text)
            choices.append(R.chat_choice(index, text, seq.finish_reason, token_ids=ids) if chat
                           else R.completion_choice(index, text, seq.finish_reason,
                                                    prompt_token_ids=s.prompt if with_ids
                                                    else None, token_ids=ids))
            if markers is not None:
                choices[-1]["message"]["reasoning"] = \
                    think if getattr(body, "include_reasoning", True) else None
    use = R.usage(sum(len(ids) for _, ids in prompts), n_out)
    model = response_model(svc, getattr(body, "model", None))
    if chat:
        return R.chat_body(rid, int(time.time()), model, choices, use,
                           prompt_token_ids=searches[0].prompt if with_ids else None)
    return R.completion_body(rid, int(time.time()), model, choices, use)


async def _final(stream):
    last = None
    async for out in stream:
        last = out
    if last is None or last.finish_reason not in ("stop", "length"):
        raise BrazeError(f"a beam search step ended with finish_reason "
                         f"{getattr(last, 'finish_reason', None)!r}")
    return last
