"""Stop tokens, stop strings and EOS end a request where they land, the last allowed
token (max_tokens) included: finish reason, stop reason, tokens and text, in the
engine's streamed reports and in `LLM.generate`'s final ones (reference backend,
tiny llama). The server's SSE side is in test_serve.py."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from braze.runtime.engine import Engine
from braze.runtime.llm import LLM
from braze.runtime.sampler import SamplingParams

from conftest import last_token_stops, prompts_of, run_all

STOP_PROMPT = prompts_of([6], seed=8)[0]


def free_run(eng, max_tokens=12):
    """The greedy continuation with no stops: what the stops below cut."""
    out = run_all(eng, [STOP_PROMPT], SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == max_tokens
    return out


def stream(eng, params):
    """Every report of one request, as a streaming client sees them."""
    rid = f"s{eng.stats()['requests_finished']}"
    eng.add_request(rid, STOP_PROMPT, params)
    reports = []
    while eng.has_unfinished():
        reports += [o for o in eng.step() if o.request_id == rid]
    return reports


@pytest.mark.parametrize("lag", [False, True])
def test_stops_mid_output(store, lag):
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64,
                 async_scheduling=lag)
    free = free_run(eng)
    stop_tok = free.token_ids[4]
    first = free.token_ids.index(stop_tok)
    by_id = run_all(eng, [STOP_PROMPT], SamplingParams(max_tokens=12, stop_token_ids=[stop_tok]))[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_tok
    assert by_id.token_ids == free.token_ids[:first + 1]
    # the stop token's text is left out (vLLM's), unless include_stop_str_in_output
    tok = eng.tokenizer
    assert by_id.text == tok.decode(free.token_ids[:first])
    kept = run_all(eng, [STOP_PROMPT], SamplingParams(max_tokens=12, stop_token_ids=[stop_tok],
                                                      include_stop_str_in_output=True))[0]
    assert kept.text == tok.decode(free.token_ids[:first + 1]) != by_id.text
    # a stop string: the text is cut before it
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop, text
    by_str = run_all(eng, [STOP_PROMPT], SamplingParams(max_tokens=12, stop=[stop]))[0]
    assert by_str.finish_reason == "stop" and by_str.stop_reason == stop
    assert by_str.text == text[:text.index(stop)]
    # the artifact carries the checkpoint's EOS, which ends a request unless ignore_eos
    assert eng.eos_token_ids == [AutoConfig.from_pretrained(store.checkpoint("llama")).eos_token_id]
    eng.eos_token_ids = [stop_tok]
    ended = run_all(eng, [STOP_PROMPT], SamplingParams(max_tokens=12))[0]
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[:first + 1]
    assert ended.text == by_id.text


@pytest.mark.parametrize("lag", [False, True])
@pytest.mark.parametrize("kind", ["token", "string", "eos"])
def test_stop_on_the_last_allowed_token(store, kind, lag):
    """A stop landing on the max_tokens-th token is a stop, not a length finish; a stop
    string, or a stop token's text, is cut from the text, streamed or not."""
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=64, async_scheduling=lag)
    free = free_run(eng)
    k, tok, stop = last_token_stops(eng.tokenizer, free.token_ids)
    text = eng.tokenizer.decode(free.token_ids[:k - 1])     # the stop token's text left out
    if kind == "token":
        params, reason = SamplingParams(max_tokens=k, stop_token_ids=[tok], ignore_eos=True), tok
    elif kind == "eos":    # vLLM's stop_reason is None for EOS: only a stop token id or string
        params, reason = SamplingParams(max_tokens=k), None
    else:
        params, reason = SamplingParams(max_tokens=k, stop=[stop], ignore_eos=True), stop
        text = eng.tokenizer.decode(free.token_ids[:k])[:-len(stop)]
    llm = LLM(art, backend="reference", num_kv_blocks=64)
    if kind == "eos":
        eng.eos_token_ids = llm.engine.eos_token_ids = [tok]
    reports = stream(eng, params)
    (offline,) = llm.generate(STOP_PROMPT, params)
    for final in (reports[-1], offline):
        assert (final.finish_reason, final.stop_reason) == ("stop", reason)
        assert final.token_ids == free.token_ids[:k] and final.text == text
    assert [r.finished for r in reports] == [False] * (len(reports) - 1) + [True]
    assert "".join(r.new_text for r in reports) == text


def test_min_tokens_holds_back_stop_strings(store):
    """vLLM checks stop strings only once more than min_tokens tokens are out: a stop
    string the first min_tokens tokens complete does not end the request."""
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64)
    free = free_run(eng)
    tok = eng.tokenizer
    early = tok.decode(free.token_ids[:2])
    stop = next(early[i:i + 1] for i in range(len(early))
                if early[i:i + 1].strip() and free.text.count(early[i:i + 1]) == 1)
    cut = run_all(eng, [STOP_PROMPT], SamplingParams(max_tokens=12, stop=[stop],
                                                     ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and len(cut.token_ids) <= 2      # the stop works
    for kind in ("final", "delta"):
        held = run_all(eng, [STOP_PROMPT], SamplingParams(
            max_tokens=12, stop=[stop], ignore_eos=True, min_tokens=4, output_kind=kind))[0]
        assert (held.finish_reason, held.stop_reason) == ("length", None)
        assert held.token_ids == free.token_ids and held.text == free.text
