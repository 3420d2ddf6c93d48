"""Features that are each tested alone, mixed in one engine the way a production server
mixes them: ngram speculation, multi-LoRA, prompt and output logprobs, grammars, parallel
samples sharing a prompt, stop strings and stop ids, cache_salt, a host KV tier, a cache
small enough to preempt, and aborts at random steps. Every request that is not aborted
gets what it gets alone on a plain engine (no speculation, prefix cache or offload), an
aborted one a prefix of that, and the engine ends with every block, batch row and offload
entry given back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from braze.runtime.engine import Engine
from braze.runtime.lora import LoRARequest
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of
from lora_helpers import make_adapter

LORA = dict(opt_level=0, lora_slots=2, max_lora_rank=8)
SHARED = prompts_of([40], seed=9)[0]            # a prefix several requests start with


@pytest.fixture(scope="module")
def art(store):
    return store.artifact("llama", **LORA)


@pytest.fixture(scope="module")
def adapters(store, tmp_path_factory):
    ck, d = store.checkpoint("llama"), tmp_path_factory.mktemp("combo-adapters")
    return {n: LoRARequest(n, i + 1, str(make_adapter(ck, d / n, seed=21 + i, scale=3.0)))
            for i, n in enumerate("ab")}


@pytest.fixture(scope="module")
def alone(art, adapters):
    """request -> its output run alone on a plain engine (memoised across examples)."""
    eng = Engine(art, backend="reference", num_kv_blocks=64, enable_prefix_caching=False)
    for a in adapters.values():
        eng.add_lora(a)
    memo = {}

    def run(prompt, params, lora):
        key = (tuple(prompt), repr(params), lora)
        if key not in memo:
            eng.add_request("solo", prompt, params, lora_request=lora)
            memo[key] = eng.run_to_completion(["solo"])["solo"]
        return memo[key]
    return run


class _Oracle:
    """Proposes each request's known continuation, guess `wrong` (0-based) made wrong."""

    def __init__(self, wrong: int):
        self.wrong, self.futures = wrong, {}

    def propose(self, reqs, budgets):
        out = []
        for r, b in zip(reqs, budgets):
            n = len(r.output_token_ids)
            d = list(self.futures[r.request_id][n:n + b])
            if self.wrong < len(d):
                d[self.wrong] = (d[self.wrong] + 1) % 200
            out.append(d)
        return out

    def forget(self, req):
        pass


@st.composite
def requests(draw):
    prompt = prompts_of([draw(st.sampled_from([6, 19]))], seed=draw(st.integers(0, 50)))[0]
    if draw(st.booleans()):
        prompt = SHARED + prompt[1:]
    if draw(st.booleans()):
        prompt = prompt + prompt[1:5] * 3       # something for ngram lookup to find
    kw = dict(max_tokens=draw(st.integers(1, 10)), ignore_eos=True)
    kind = draw(st.sampled_from(["plain", "grammar", "prompt_logprobs", "logprobs", "stops"]))
    if kind == "grammar":
        kw = dict(max_tokens=kw["max_tokens"], structured_outputs={"regex": "[a-z]{2,6}"})
    elif kind == "prompt_logprobs":
        kw["prompt_logprobs"] = 1
    elif kind == "logprobs":
        kw["logprobs"] = 1
    elif kind == "stops":
        kw.update(stop=["e", "ab"], stop_token_ids=[draw(st.integers(3, 199))])
    if draw(st.booleans()):
        kw.update(temperature=0.8, seed=draw(st.integers(0, 9)))
    kw["n"] = draw(st.sampled_from([1, 1, 2]))
    return (prompt, SamplingParams(**kw), draw(st.sampled_from([None, "a", "b"])),
            draw(st.sampled_from([None, "t1"])), draw(st.none() | st.integers(1, 8)))


@settings(max_examples=3, deadline=None)
@given(reqs=st.lists(requests(), min_size=2, max_size=4), data=st.data())
def test_mixed_features_equal_each_request_alone_and_leak_nothing(art, adapters, alone, reqs,
                                                                  data):
    offload = data.draw(st.booleans(), label="host KV tier")
    eng = Engine(art, backend="reference", max_num_tokens=32,
                 num_kv_blocks=data.draw(st.sampled_from([10, 64]), label="num_kv_blocks"),
                 speculative={"method": "ngram", "num_speculative_tokens":
                              data.draw(st.integers(1, 3), label="k")},
                 kv_offload_cpu_gb=0.001 if offload else None)
    for a in adapters.values():
        eng.add_lora(a)
    # guesses that hold up to a drawn position (the request's own continuation alone), so
    # verifications accept and reject within one step
    eng.spec.proposer = _Oracle(data.draw(st.integers(0, 3), label="first wrong guess"))
    ids = {}
    for i, (prompt, params, lora, salt, _) in enumerate(reqs):
        kids = params.children()
        for j, child in enumerate(kids):
            ids[f"r{i}.{j}"] = (prompt, child, lora)
            eng.spec.proposer.futures[f"r{i}.{j}"] = alone(prompt, child, lora).token_ids
            eng.add_request(f"r{i}.{j}", prompt, child, lora_request=lora, cache_salt=salt,
                            group=f"g{i}" if len(kids) > 1 else None)
    final, step = {}, 0
    while eng.has_unfinished():
        step += 1
        assert step < 300, "the engine does not finish"
        for i, (*_, abort_at) in enumerate(reqs):
            if abort_at == step:
                eng.abort_request([r for r in ids if r.startswith(f"r{i}.")])
        for out in eng.step():
            if out.finished:
                assert out.request_id not in final, "a request finished twice"
                final[out.request_id] = out
    assert set(final) == set(ids), "a request was lost"
    for rid, (prompt, params, lora) in ids.items():
        got, want = final[rid], alone(prompt, params, lora)
        if got.finish_reason == "abort":
            assert got.token_ids == want.token_ids[:len(got.token_ids)], rid
            continue
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason), rid
        for mine, theirs in ((got.logprobs, want.logprobs),
                             (got.prompt_logprobs, want.prompt_logprobs)):
            assert (mine is None) == (theirs is None), rid
            for a, b in zip(mine or [], theirs or []):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob,
                                                                                    abs=1e-4)
    s = eng.stats()
    assert s["kv_blocks_used"] == 0 and s["num_running"] == s["num_waiting"] == 0
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs and not eng.requests
    assert eng.lora.in_use() == {}
    assert s["spec_decode_num_accepted_tokens"] <= s["spec_decode_num_draft_tokens"]
    if eng.offload is not None:
        eng.offload.drain()
        assert not (eng.offload._loading or eng.offload._staging or eng.offload._keys)
