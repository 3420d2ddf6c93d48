"""The serving engine end to end on the reference backend (float32, tiny random models).

Batch invariance against one-by-one runs and against transformers' teacher-forced
logits, prefix caching, preemption, seeded sampling, aborts and errors (stops:
test_stops.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.llm import LLM
from braze.runtime.sampler import SamplingParams

from conftest import hf_model, prompts_of, run_all

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def assert_valid_greedy(model, prompt, generated):
    """Each generated token is transformers' argmax given the tokens before it (teacher
    forcing; a near-tie within 1e-4 is accepted)."""
    seq = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt) - 1:-1]
    chosen = logits.gather(1, torch.tensor(generated)[:, None])[:, 0]
    assert torch.all(chosen >= logits.max(dim=-1).values - 1e-4), (prompt, generated)


@pytest.mark.parametrize("case,opt,lag", [("llama", 0, False), ("llama", 2, True),
                                          ("qwen3_moe-dense-middle", 2, False)])
def test_batch_equals_one_by_one_and_transformers(store, case, opt, lag):
    art = store.artifact(case, opt_level=opt)
    prompts = prompts_of([1, 3, 17, 40, 5, 33, 2, 24])
    # a small token budget forces chunked prefill mixed with decodes; `lag` schedules step
    # N+1 before step N's tokens are applied (the GPU's overlap), on the CPU
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_tokens=24,
                 async_scheduling=lag)
    together = run_all(eng, prompts, GREEDY)
    alone = [run_all(eng, [p], GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    model = hf_model(store.checkpoint(case))
    for p, o in zip(prompts, together):
        assert len(o.token_ids) == GREEDY.max_tokens and o.finish_reason == "length"
        assert_valid_greedy(model, p, o.token_ids)
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0


@pytest.mark.parametrize("lag", [False, True])
def test_prefix_cache_hits_and_changes_nothing(store, lag):
    art = store.artifact("llama")
    shared = prompts_of([40], seed=3)[0]
    prompts = [shared + t for t in prompts_of([4, 9, 1, 20], seed=4)]
    cached = Engine(art, backend="reference", num_kv_blocks=64, async_scheduling=lag)
    first = run_all(cached, prompts[:1], GREEDY)
    rest = run_all(cached, prompts[1:], GREEDY)
    s = cached.stats()
    assert s["prefix_cache_hit_tokens"] >= 3 * 32          # 2 full blocks of 16, three times
    assert s["kv_blocks_free"] == s["kv_blocks_total"]
    plain = Engine(art, backend="reference", num_kv_blocks=64, enable_prefix_caching=False)
    want = run_all(plain, prompts, GREEDY)
    assert [o.token_ids for o in first + rest] == [o.token_ids for o in want]
    assert plain.stats()["prefix_cache_hit_tokens"] == 0
    assert (first + rest)[1].metrics["num_cached_tokens"] == 32


@pytest.mark.parametrize("max_num_tokens,num_blocks,lag", [
    (None, 64, False),      # whole prompts in one step
    (8, 64, True),          # chunked prefill, with step N+1 scheduled before N's tokens
    (24, 8, False),         # 128 token slots for ~180 tokens: preemption
])
def test_prefix_cache_hits_only_on_the_same_whole_prefix(store, max_num_tokens, num_blocks, lag):
    """A = X+Y+..., then B = Y+... : B's first block has A's second block's tokens, but
    its KV (at positions 0..15, after nothing) is not A's (after X). B must get no hit
    and its solo output; C = X+Y+... still hits both blocks."""
    art = store.artifact("llama")
    g = torch.Generator().manual_seed(14)
    x, y, z, tail = torch.randint(3, 200, (4, 16), generator=g).tolist()
    a, b, c = x + y + tail[:5], y + z + tail[5:9], x + y + tail[9:]
    filler = prompts_of([30], seed=15)[0]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    eng = Engine(art, backend="reference", num_kv_blocks=num_blocks,
                 max_num_tokens=max_num_tokens, async_scheduling=lag)
    first = run_all(eng, [a], params)
    rest = run_all(eng, [b, c, filler], params)
    assert rest[0].metrics["num_cached_tokens"] == 0
    assert rest[1].metrics["num_cached_tokens"] == 32
    plain = Engine(art, backend="reference", num_kv_blocks=64, enable_prefix_caching=False)
    alone = [run_all(plain, [p], params)[0].token_ids for p in (a, b, c, filler)]
    assert [o.token_ids for o in first + rest] == alone
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"]
    assert (s["preemptions"] > 0) == (num_blocks == 8)


@pytest.mark.parametrize("lag", [False, True])
def test_preemption_completes_everything_unchanged(store, lag):
    art = store.artifact("llama")
    prompts = prompts_of([20, 25, 18, 30, 22, 19], seed=5)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    roomy = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, params)
    tight = Engine(art, backend="reference", num_kv_blocks=8,   # 128 token slots for ~270 tokens
                   async_scheduling=lag)
    got = run_all(tight, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in roomy]
    s = tight.stats()
    assert s["preemptions"] > 0 and s["kv_blocks_free"] == 8
    assert tight.runner.batch.num_free_rows == tight.runner.max_num_seqs   # no row leaked
    assert sum(o.metrics["num_preemptions"] for o in got) == s["preemptions"]


def test_seeded_sampling_reproducible_across_batches(store):
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=64)
    p = prompts_of([7], seed=6)[0]
    others = prompts_of([3, 12, 30], seed=7)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                        ignore_eos=True)
    alone = run_all(eng, [p], sp)[0].token_ids
    mixed = run_all(eng, others[:1] + [p] + others[1:],
                    [SamplingParams(max_tokens=5, temperature=0.7, seed=9, ignore_eos=True),
                     sp, GREEDY, SamplingParams(max_tokens=12, temperature=1.3, ignore_eos=True)])
    assert mixed[1].token_ids == alone
    again = run_all(Engine(art, backend="reference", num_kv_blocks=16), [p], sp)[0].token_ids
    assert again == alone
    other = run_all(eng, [p], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9,
                                             top_k=50, seed=4321, ignore_eos=True))[0].token_ids
    assert other != alone


@pytest.mark.parametrize("lag", [False, True])
def test_abort_frees_blocks_and_reports(store, lag):
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=32, async_scheduling=lag)
    a, b = prompts_of([30, 10], seed=9)
    eng.add_request("a", a, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.add_request("b", b, SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.stats()["kv_blocks_used"] > 0
    eng.abort_request("a")
    eng.abort_request("nobody")                     # unknown ids are ignored
    outs = {}
    for _ in range(20):
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
        if not eng.has_unfinished():
            break
    assert outs["a"][-1].finish_reason == "abort" and outs["a"][-1].finished
    assert outs["b"][-1].finish_reason == "length"
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_bad_requests_are_refused_clearly(store):
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=8)        # 128 tokens of cache
    with pytest.raises(BrazeError, match=r"prompt has 200 tokens.*128"):
        eng.add_request("x", [5] * 200, GREEDY)
    with pytest.raises(BrazeError, match="empty"):
        eng.add_request("x", [], GREEDY)
    with pytest.raises(BrazeError, match="outside the vocabulary"):
        eng.add_request("x", [10 ** 6], GREEDY)
    with pytest.raises(BrazeError, match="temperature"):
        eng.add_request("x", [5], SamplingParams(temperature=-1))
    eng.add_request("x", [5], GREEDY)
    with pytest.raises(BrazeError, match="already in use"):
        eng.add_request("x", [5], GREEDY)
    with pytest.raises(BrazeError, match="max_num_seqs"):
        Engine(art, backend="reference", max_num_seqs=10 ** 6)
    with pytest.raises(BrazeError, match="num_kv_blocks"):
        Engine(art, backend="reference", num_kv_blocks=0)


def test_llm_api_order_text_and_stats(store):
    llm = LLM(store.artifact("llama"), backend="reference", num_kv_blocks=48)
    outs = llm.generate(["hello world", "a", [1, 5, 6]],
                        SamplingParams(max_tokens=6, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs][2] == [1, 5, 6]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("hello world")
    for o in outs:
        assert len(o.token_ids) == 6 and o.finish_reason == "length"
        assert o.text == llm.tokenizer.decode(o.token_ids)
        assert o.metrics["ttft"] is not None and o.metrics["queue_time"] is not None
    s = llm.stats()
    for k in ("kv_blocks_total", "kv_blocks_free", "prefix_cache_hit_tokens", "preemptions",
              "cuda_graphs_captured", "capture_seconds"):
        assert k in s
    assert s["kv_blocks_total"] == 48 == s["kv_blocks_free"]
    single = llm.generate("hello world", SamplingParams(max_tokens=6, ignore_eos=True))
    assert single[0].token_ids == outs[0].token_ids


def test_interpret_backend_batch_equals_reference(store):
    """The same engine over the Triton kernels (interpreted) and bound-plan replay."""
    art = store.artifact("llama", opt_level=2)
    prompts = prompts_of([9, 3, 14], seed=10)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    kern = Engine(art, backend="interpret", num_kv_blocks=16, max_num_seqs=4,
                  buckets=[1, 2, 4, 8, 16, 32], debug=True)
    got = run_all(kern, prompts, params)
    want = run_all(Engine(art, backend="reference", num_kv_blocks=16), prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert kern.stats()["kv_blocks_free"] == 16


def test_rows_are_reused_after_requests_finish(store):
    """More requests over the engine's life than it has persistent-batch rows."""
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=32, max_num_seqs=2)
    prompts = prompts_of([3, 5, 4, 6, 2], seed=11)
    outs = run_all(eng, prompts, SamplingParams(max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in outs)
    eng.add_request("late", prompts[0], SamplingParams(max_tokens=8, ignore_eos=True))
    eng.step()
    eng.abort_request("late")
    again = run_all(eng, prompts, SamplingParams(max_tokens=3, ignore_eos=True))
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert eng.runner.batch.num_free_rows == 2


def test_output_kind_final_reports_only_at_the_end(store):
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=16)
    p = prompts_of([5], seed=12)[0]
    eng.add_request("d", p, SamplingParams(max_tokens=4, ignore_eos=True))
    eng.add_request("f", p, SamplingParams(max_tokens=4, ignore_eos=True, output_kind="final"))
    seen = {"d": [], "f": []}
    for _ in range(20):
        for o in eng.step():
            seen[o.request_id].append(o)
        if not eng.has_unfinished():
            break
    assert len(seen["d"]) == 4 and [len(o.new_token_ids) for o in seen["d"]] == [1] * 4
    assert len(seen["f"]) == 1 and seen["f"][0].finished
    assert seen["f"][0].token_ids == seen["d"][-1].token_ids
    assert seen["f"][0].text == "".join(o.new_text for o in seen["d"])
    with pytest.raises(BrazeError, match="output_kind"):
        SamplingParams(output_kind="all").validate()


@pytest.fixture(scope="module")
def solo(store):
    """Greedy continuations of prompts run one at a time (the reference for random mixes)."""
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64)
    cache = {}

    def get(prompt, max_tokens):
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = run_all(eng, [prompt], SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True))[0].token_ids
        return cache[key]
    return get


POOL = prompts_of([3, 17, 30, 9, 21, 2], seed=13)


@settings(max_examples=40, deadline=None)
# aborted mid-prefill, then nothing left: the abort report must still come out
@example(plan=[(1, 1, 0, True)], num_blocks=4, max_num_tokens=8, max_num_seqs=1, lag=False)
@given(plan=st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.integers(1, 10),
                               st.integers(0, 6), st.booleans()), min_size=1, max_size=7),
       num_blocks=st.integers(4, 12), max_num_tokens=st.sampled_from([8, 24, 64]),
       max_num_seqs=st.integers(1, 4), lag=st.booleans())
def test_random_arrivals_and_aborts_keep_results_and_free_everything(
        store, solo, plan, num_blocks, max_num_tokens, max_num_seqs, lag):
    """Requests arrive at random steps, some are aborted, the cache and batch are tight:
    every request that is not aborted gets exactly its solo continuation, and at the end
    every KV block and batch row is free again."""
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=num_blocks,
                 max_num_tokens=max_num_tokens, max_num_seqs=max_num_seqs, async_scheduling=lag)
    arrivals = sorted(((at, i) for i, (_, _, at, _) in enumerate(plan)))
    final, step = {}, 0
    for _ in range(400):                               # bounded
        while arrivals and arrivals[0][0] <= step:
            _, i = arrivals.pop(0)
            p, n, _, abort = plan[i]
            eng.add_request(f"r{i}", POOL[p], SamplingParams(max_tokens=n, ignore_eos=True))
        for o in eng.step():
            if o.finished:
                assert o.request_id not in final, "a request finished twice"
                final[o.request_id] = o
        step += 1
        for i, (_, _, at, abort) in enumerate(plan):
            if abort and step == at + 2:
                eng.abort_request(f"r{i}")
        if not arrivals and not eng.has_unfinished():
            break
    assert set(final) == {f"r{i}" for i in range(len(plan))}, "a request was lost"
    for i, (p, n, _, abort) in enumerate(plan):
        o = final[f"r{i}"]
        if o.finish_reason == "abort":
            assert abort
            assert o.token_ids == solo(POOL[p], n)[:len(o.token_ids)]
        else:
            assert o.finish_reason == "length" and o.token_ids == solo(POOL[p], n)
    s = eng.stats()
    assert s["kv_blocks_free"] == num_blocks and s["num_running"] == s["num_waiting"] == 0
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs


def test_a_kv_cache_below_max_model_len_is_said_not_silent(store, caplog):
    """num_kv_blocks too small for one sequence of the artifact's max_model_len: the engine
    warns once at start, naming the option, and a prompt it cannot hold is refused naming
    the KV cache, not the model; generation ends at the cache's capacity."""
    from braze.runtime import open_artifact
    art = store.artifact("llama")
    m = open_artifact(art).manifest
    block = m["options"]["block_size"]
    assert m["limits"]["max_model_len"] > 2 * block
    with caplog.at_level("WARNING", logger="braze.runtime"):
        llm = LLM(art, backend="reference", num_kv_blocks=2)
    said = [r.getMessage() for r in caplog.records if "--num-kv-blocks" in r.getMessage()]
    assert len(said) == 1 and str(2 * block) in said[0]
    with pytest.raises(BrazeError, match="KV cache holds") as e:
        llm.generate([[5] * (2 * block)], GREEDY)
    assert "max_model_len" not in str(e.value)
    out = llm.generate([[5] * (2 * block - 4)], SamplingParams(max_tokens=10,
                                                               ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    caplog.clear()
    with caplog.at_level("WARNING", logger="braze.runtime"):
        LLM(art, backend="reference", num_kv_blocks=64)
    assert not [r for r in caplog.records if "--num-kv-blocks" in r.getMessage()]


@pytest.mark.parametrize("lag", [False, True])
def test_abort_takes_one_id_or_a_list_as_vllms_engine(store, lag):
    """vLLM's LLMEngine.abort_request takes a list of ids; braze's took one and a list was
    a TypeError from a dict lookup. Either form aborts: waiting, mid-prefill and decoding
    requests, each reported once with finish_reason 'abort'; the one left alone gives its
    solo output and every block comes back. Anything but ids is an error naming it."""
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=16, max_num_seqs=2,
                 max_num_tokens=16, async_scheduling=lag)
    prompts = prompts_of([6, 40, 9, 7], seed=21)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    seen = {}
    for _ in range(2):
        for o in eng.step():
            seen.setdefault(o.request_id, []).append(o.finished)
    # r0 decoding, r1 part-way through its 40-token prompt, r2 and r3 waiting
    assert eng.requests["r1"].num_computed < 40 and eng.num_waiting() == 2
    eng.abort_request(["r0", "r1", "r2", "nobody"])
    eng.abort_request(("r0",))                      # twice: nothing more happens
    with pytest.raises(BrazeError, match="request id"):
        eng.abort_request([["r3"]])
    final = {}
    while eng.has_unfinished():
        for o in eng.step():
            seen.setdefault(o.request_id, []).append(o.finished)
            if o.finished:
                final[o.request_id] = o
    assert {r: final[r].finish_reason for r in final} == {
        "r0": "abort", "r1": "abort", "r2": "abort", "r3": "length"}
    assert all(seen[r].count(True) == 1 for r in final)
    solo = run_all(Engine(art, backend="reference", num_kv_blocks=16), [prompts[3]], params)
    assert final["r3"].token_ids == solo[0].token_ids
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0


def test_an_aborted_id_is_not_reused_before_its_abort_is_reported(store):
    """abort_request's final report comes with the next step. Re-adding the id before
    that step made the old request's abort report read as the new request's (its
    run_to_completion returned the aborted tokens). The id is refused until then, saying
    so; after a step it serves the new prompt, which gives its solo output."""
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=16)
    first, second = prompts_of([9, 12], seed=23)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    eng.add_request("a", first, params)
    eng.step()
    eng.abort_request("a")
    with pytest.raises(BrazeError, match=r"'a'.*aborted.*step"):
        eng.add_request("a", second, params)
    outs = eng.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]
    eng.add_request("a", second, params)
    got = eng.run_to_completion(["a"])["a"]
    assert got.finish_reason == "length" and got.prompt_token_ids == second
    solo = run_all(Engine(art, backend="reference", num_kv_blocks=16), [second], params)
    assert got.token_ids == solo[0].token_ids
