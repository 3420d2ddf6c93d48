"""prompt_logprobs on -O2 artifacts, whose LM head computes only the `logits_indices`
rows (docs/batch-contract.md, "Logits rows"): a prompt-logprobs chunk gets a row at each
prompt position, the scheduler keeps a step's rows within the artifact's, long prompts
spread over chunks. Checked against transformers' log_softmax of the same random-weight
model and against the -O1 artifact (logits at every token), in mixed batches with plain
requests, with chunked prefill, with speculative decoding, and under the interpreted
Triton kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.prompt_logprobs import extra_rows, limit_rows
from braze.runtime.sampler import SamplingParams
from braze.runtime.scheduler import ScheduledChunk, SchedulerOutput

from conftest import hf_model, prompts_of, run_all

LIMITS = dict(max_num_seqs=4, max_num_tokens=64)


@pytest.fixture(scope="module")
def o2(store):
    return store.artifact("llama", opt_level=2, **LIMITS)


@pytest.fixture(scope="module")
def o1(store):
    return store.artifact("llama", opt_level=1, **LIMITS)


@pytest.fixture(scope="module")
def model(store):
    return hf_model(store.checkpoint("llama"))


def watch_rows(eng) -> list[tuple[int, int, bool]]:
    """Record each step's (logits rows, cap, had a prompt-logprobs chunk and guesses)."""
    seen, sched = [], eng.scheduler
    inner = sched.schedule

    def schedule():
        out = inner()
        rows = len(out.chunks) + out.num_draft + sum(extra_rows(out.chunks[i])
                                                     for i in out.prompt_chunks)
        seen.append((rows, sched.logits_row_cap, bool(out.prompt_chunks and out.num_draft)))
        return out
    sched.schedule = schedule
    return seen


def same_prompt_logprobs(a, b, tol=1e-5) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:]):
        assert x.token_id == y.token_id and x.rank == y.rank
        assert abs(x.logprob - y.logprob) < tol
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
        assert all(abs(v - w) < tol for (_, v), (_, w) in zip(x.top, y.top))


def same_outputs(got, want) -> None:
    """Each pair of final outputs has the same tokens and the same prompt logprobs."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        same_prompt_logprobs(g.prompt_logprobs, w.prompt_logprobs)


def test_o2_prompt_logprobs_are_transformers_log_softmax_and_equal_o1(o2, o1, model):
    """A mixed batch, chunked (16 tokens a step, 4 logits rows on this artifact): the
    37-token prompt takes ten chunks, the plain requests share its steps."""
    prompts = prompts_of([37, 5, 20, 2, 1, 9], seed=20)
    params = [SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=3),
              SamplingParams(max_tokens=4, ignore_eos=True),
              SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=0, logprobs=2),
              SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(max_tokens=5, ignore_eos=True, temperature=1.0, seed=3)]
    eng = Engine(o2, backend="reference", num_kv_blocks=64, max_num_tokens=16)
    seen = watch_rows(eng)
    got = run_all(eng, prompts, params)
    want = run_all(Engine(o1, backend="reference", num_kv_blocks=64, max_num_tokens=16),
                   prompts, params)
    assert all(rows <= cap for rows, cap, _ in seen) and seen[0][1] == 4
    assert any(rows == 4 for rows, _, _ in seen)            # the cap did bind
    for g, w, sp, p in zip(got, want, params, prompts):
        assert g.token_ids == w.token_ids
        same_prompt_logprobs(g.prompt_logprobs, w.prompt_logprobs)
        if sp.prompt_logprobs is None:
            continue
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), dim=-1)
        assert len(g.prompt_logprobs) == len(p)
        for pos in range(1, len(p)):
            e = g.prompt_logprobs[pos]
            assert e.token_id == p[pos]
            assert abs(e.logprob - ref[pos - 1, p[pos]].item()) < 1e-4
            assert e.rank == int((ref[pos - 1] > ref[pos - 1, p[pos]] + 1e-6).sum()) + 1
            assert [t for t, _ in e.top] == torch.topk(ref[pos - 1],
                                                       sp.prompt_logprobs).indices.tolist()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5),
       mask=st.lists(st.booleans(), min_size=5, max_size=5),
       budget=st.integers(1, 64), seqs=st.integers(1, 4), seed=st.integers(0, 1000))
def test_o2_equals_o1_over_chunk_sizes(o2, o1, lengths, mask, budget, seqs, seed):
    """Any prompt lengths, token budget and sequence limit (the rows a step computes on
    -O2 are max_num_seqs): the same tokens and prompt logprobs as -O1."""
    prompts = prompts_of(lengths, seed=seed)
    params = [SamplingParams(max_tokens=2, ignore_eos=True,
                             prompt_logprobs=1 if m else None) for m in mask[:len(prompts)]]
    opts = dict(backend="reference", num_kv_blocks=64, max_num_tokens=budget, max_num_seqs=seqs)
    eng = Engine(o2, **opts)
    seen = watch_rows(eng)
    got = run_all(eng, prompts, params)
    want = run_all(Engine(o1, **opts), prompts, params)
    assert all(rows <= cap for rows, cap, _ in seen)
    same_outputs(got, want)


@pytest.mark.parametrize("lag", [False, True])
def test_o2_prompt_logprobs_survive_preemption(o2, o1, lag):
    """A cache too small for every request: requests are preempted while decoding and
    recomputed, prompt and output (the prompt-logprobs rows cover only the prompt), with
    async scheduling too; the reports are the roomy -O1 engine's."""
    prompts = prompts_of([20, 25, 18, 30], seed=31)
    params = [SamplingParams(max_tokens=24, ignore_eos=True, prompt_logprobs=1),
              SamplingParams(max_tokens=24, ignore_eos=True),
              SamplingParams(max_tokens=24, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(max_tokens=24, ignore_eos=True, prompt_logprobs=0)]
    eng = Engine(o2, backend="reference", num_kv_blocks=6, max_num_tokens=24,
                 async_scheduling=lag)
    got = run_all(eng, prompts, params)
    assert eng.stats()["preemptions"] > 0
    assert eng.scheduler.num_prompt_logprobs == 0
    want = run_all(Engine(o1, backend="reference", num_kv_blocks=64), prompts, params)
    same_outputs(got, want)


def _chunk(prompt_len: int, start: int, n: int, plp=0) -> ScheduledChunk:
    class R:
        pass
    r = R()
    r.prompt_token_ids = list(range(prompt_len))
    r.params = SamplingParams(prompt_logprobs=plp)
    r.num_computed = start + n
    r.all_token_ids = r.prompt_token_ids
    r.num_pending = 0
    r.metrics = type("M", (), {"num_preemptions": 0})()
    c = ScheduledChunk.__new__(ScheduledChunk)
    c.request, c.start, c.num_new, c.num_draft, c.epoch = r, start, n, 0, 0
    c.samples = start + n == prompt_len
    return c


def test_limit_rows_cuts_the_last_prompt_chunk_and_keeps_one_row_each():
    plain = _chunk(10, 9, 1, plp=None)
    a, b = _chunk(40, 0, 20), _chunk(12, 4, 8)      # b reaches its prompt's end: samples
    out = SchedulerOutput(chunks=[plain, a, b], fills=[a, b])
    assert extra_rows(a) == 19 and extra_rows(b) == 7
    limit_rows(out, 12, 16)
    assert out.prompt_chunks == [1, 2]
    # 3 own rows + 26 extra, 17 over: b (the last) gives up its 7, then a 10 of its 19
    assert (b.num_new, b.samples, b.request.num_computed) == (1, False, 5)
    assert (a.num_new, a.request.num_computed) == (10, 10)
    assert out.fills == []              # neither fills a block any more
    # a step of one chunk and one row: it still advances one token
    c = _chunk(40, 10, 30)
    out = SchedulerOutput(chunks=[c])
    limit_rows(out, 1, 16)
    assert c.num_new == 1 and c.request.num_computed == 11
    # no cap (logits at every token): nothing cut
    d = _chunk(40, 0, 40)
    out = SchedulerOutput(chunks=[d])
    limit_rows(out, None, 16)
    assert d.num_new == 40 and out.prompt_chunks == [0]


def test_o2_prompt_logprobs_with_speculative_decoding(store, o1):
    """Plain requests speculate (ngram) while a prompt-logprobs prefill shares their steps:
    its extra rows come after the verification rows, within the artifact's 16."""
    art = store.artifact("llama", opt_level=2, max_logits_rows=16, **LIMITS)
    prompts = [[1] + [5, 6, 7, 8] * 3, [1, 9, 30, 31, 9, 30, 31, 9]] + prompts_of([40], seed=3)
    params = [SamplingParams(max_tokens=12, ignore_eos=True)] * 2 + \
        [SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=2)]
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_tokens=16,
                 speculative={"method": "ngram", "num_speculative_tokens": 3})
    seen = watch_rows(eng)
    got = []
    for i, (p, sp) in enumerate(zip(prompts, params)):   # the long prompt comes last
        eng.add_request(f"s{i}", p, sp)
        if i < 2:
            eng.step()
    final = eng.run_to_completion([f"s{i}" for i in range(3)])
    got = [final[f"s{i}"] for i in range(3)]
    want = run_all(Engine(o1, backend="reference", num_kv_blocks=64, max_num_tokens=16),
                   prompts, params)
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0
    assert any(both for _, _, both in seen)        # guesses and prompt rows in one step
    assert all(rows <= cap for rows, cap, _ in seen) and seen[0][1] == 16
    same_outputs(got, want)


def test_wide_rows_serve_a_whole_prompt_in_one_chunk_and_cost_plain_steps_nothing(store, o1,
                                                                                 model):
    """An artifact compiled with --max-logits-rows = --max-num-tokens: a prompt-logprobs
    step runs its bucket's wide variant (all 37 rows in one chunk); plain steps keep one
    row per sequence and never touch a wide variant."""
    art = store.artifact("llama", opt_level=2, max_logits_rows=64, **LIMITS)
    eng = Engine(art, backend="reference", num_kv_blocks=64)
    g = eng.runner.graphs
    assert all(g.rows_for(T) == min(T, 4) for T in g.buckets)
    assert eng.scheduler.logits_row_cap == 64
    prompts = prompts_of([30, 7], seed=9)
    plain = SamplingParams(max_tokens=4, ignore_eos=True)
    run_all(eng, prompts, plain)
    assert "wide_steps" not in g.stats
    prompts = prompts_of([37, 6], seed=8)
    params = [SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=4), plain]
    seen = watch_rows(eng)
    got = run_all(eng, prompts, params)
    assert seen[0][0] == 2 + 36 and g.stats["wide_steps"] == 1      # one prefill step
    want = run_all(Engine(o1, backend="reference", num_kv_blocks=64), prompts, params)
    same_outputs(got, want)
    p = prompts[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), dim=-1)
    assert max(abs(got[0].prompt_logprobs[i].logprob - ref[i - 1, p[i]].item())
               for i in range(1, len(p))) < 1e-4


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plp_len=st.integers(2, 40), budget=st.integers(4, 32), k=st.integers(1, 4),
       rows=st.sampled_from([4, 8, 16]))
def test_o2_speculation_beside_prompt_logprobs_over_sizes(store, o1, plp_len, budget, k, rows):
    """Speculating requests and a prompt-logprobs prefill in one engine, over the prompt
    length, the token budget, k and the artifact's logits rows: -O1's tokens and prompt
    logprobs, and no step over its rows."""
    art = store.artifact("llama", opt_level=2, max_logits_rows=rows, **LIMITS)
    prompts = [[1] + [5, 6, 7, 8] * 3, [1, 9, 30, 31, 9, 30, 31, 9]] + prompts_of([plp_len], 7)
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * 2 + \
        [SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=1)]
    kw = dict(backend="reference", num_kv_blocks=64, max_num_tokens=budget)
    try:
        eng = Engine(art, speculative={"method": "ngram", "num_speculative_tokens": k}, **kw)
    except BrazeError as e:         # too few rows to speculate at all: said so, by name
        assert rows <= 4 and "--max-logits-rows" in str(e)
        return
    seen = watch_rows(eng)
    got = run_all(eng, prompts, params)
    want = run_all(Engine(o1, **kw), prompts, params)
    assert all(r <= cap for r, cap, _ in seen)
    same_outputs(got, want)


def test_o2_prompt_logprobs_under_the_interpreted_kernels(store):
    """The launch plans (Triton kernels under the interpreter, pruned LM head, the wide
    variant of a bucket bound on first use) give the reference interpreter's prompt
    logprobs."""
    art = store.artifact("llama", opt_level=2, max_num_seqs=4, max_num_tokens=32,
                         max_logits_rows=32)
    prompts = prompts_of([13, 5], seed=4)
    params = [SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2),
              SamplingParams(max_tokens=2, ignore_eos=True)]
    want = run_all(Engine(art, backend="reference", num_kv_blocks=16), prompts, params)
    eng = Engine(art, backend="interpret", num_kv_blocks=16, buckets=[8, 32])
    run_all(eng, prompts[1:], params[1:])
    assert eng.runner.graphs.stats["wide_plans_bound"] == 0
    got = run_all(eng, prompts, params)
    assert eng.runner.graphs.stats["wide_plans_bound"] == 1
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        same_prompt_logprobs(g.prompt_logprobs, w.prompt_logprobs, tol=1e-4)
    # a small budget: the prompt in chunks of 8 tokens, 2 rows a normal step, 8 a wide one
    got = run_all(Engine(art, backend="interpret", num_kv_blocks=16, max_num_tokens=8,
                         buckets=[8], max_num_seqs=2), prompts, params)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        same_prompt_logprobs(g.prompt_logprobs, w.prompt_logprobs, tol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_cuda_prompt_logprobs_on_o2_equal_the_reference(store, mode):
    """On the GPU: plain steps replay the captured graphs of their buckets, a prompt-
    logprobs step the wide variant of its bucket (bound on first use, uncaptured); the
    prompt logprobs and tokens are the reference backend's (float32)."""
    art = store.artifact("llama", opt_level=2, targets="sm_80,sm_90", max_num_seqs=8,
                         max_num_tokens=64, max_logits_rows=64)
    prompts = prompts_of([37, 6, 20], seed=5)
    params = [SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=3),
              SamplingParams(max_tokens=6, ignore_eos=True),
              SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=0, logprobs=2)]
    want = run_all(Engine(art, backend="reference", num_kv_blocks=32), prompts, params)
    eng = Engine(art, backend="cuda", num_kv_blocks=32, cudagraph_mode=mode, debug=True)
    run_all(eng, prompts[1:2], params[1:2])
    g = eng.runner.graphs
    assert g.stats["wide_plans_bound"] == 0 and eng.stats()["cuda_graphs_captured"] > 0
    got = run_all(eng, prompts, params)
    assert g.stats["wide_plans_bound"] >= 1
    for x, y in zip(got, want):
        assert x.token_ids == y.token_ids
        same_prompt_logprobs(x.prompt_logprobs, y.prompt_logprobs, tol=1e-3)
    # a budget of 16 tokens: the prompts in chunks, wide variants of the smaller buckets
    got = run_all(Engine(art, backend="cuda", num_kv_blocks=32, max_num_tokens=16),
                  prompts, params)
    for x, y in zip(got, want):
        assert x.token_ids == y.token_ids
        same_prompt_logprobs(x.prompt_logprobs, y.prompt_logprobs, tol=1e-3)
