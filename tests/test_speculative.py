"""Speculative decoding (runtime/speculative.py) on the reference backend: the output of
a speculating engine equals the plain engine's, token for token (greedy and seeded
sampling), for llama, qwen3 and an MoE at -O0 and -O2 (the LM head pruned to R logits
rows); acceptance is counted per position; rejected slots are given back (no KV block or
row leaks, through preemption and aborts); the sampled distribution is the target's
(chi-square against the model's exact distribution); configuration errors are clear."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.sampler import SamplingParams
from braze.runtime.speculative import SpeculativeConfig, ngram_propose

from conftest import hf_model, prompts_of, run_all, run_with_aborts

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def repetitive(seed: int, period: int, times: int, tail: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    unit = torch.randint(3, 200, (period,), generator=g).tolist()
    return [1] + unit * times + torch.randint(3, 200, (tail,), generator=g).tolist()


def mixed_prompts() -> list[list[int]]:
    return [repetitive(1, 5, 5), prompts_of([13], seed=2)[0], repetitive(3, 3, 6, tail=2),
            prompts_of([30], seed=4)[0], repetitive(5, 7, 3)]


def assert_clean(eng: Engine) -> None:
    s = eng.stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and s["num_running"] == 0
    assert eng.runner.batch.num_free_rows == eng.runner.max_num_seqs


# ------------------------------------------------------------------ configuration

@pytest.mark.parametrize("value,message", [
    ({"method": "eagle", "num_speculative_tokens": 1}, "choose one of ngram, draft, mtp"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "from 1 to 16"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown key 'lookahead'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
      "prompt_lookup_max": 4}, "above"),
    ({"num_speculative_tokens": 2}, "needs 'method'"),
    ({"method": "draft", "num_speculative_tokens": 2}, "needs \"model\""),
    ({"method": "draft", "model": 5, "num_speculative_tokens": 2}, "path of a braze artifact, got 5"),
    ('{"method": "ngram",', "not valid JSON"),
    ([1, 2], "must be a dict"),
    ({"model": "/d", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
     "draft_tensor_parallel_size=2: a draft runs on rank 0 alone"),
])
def test_config_errors_name_the_fault(value, message):
    with pytest.raises(BrazeError, match=message) as e:
        SpeculativeConfig.of(value)
    assert e.value.param == "speculative"


@pytest.mark.parametrize("value,want", [
    # vLLM's draft example names no method: a "model" means a draft model
    ({"model": "/d", "num_speculative_tokens": 5}, ("draft", "/d", 4, 1)),
    ({"method": "draft_model", "model": "/d", "num_speculative_tokens": 2}, ("draft", "/d", 4, 1)),
    ({"method": "deepseek_mtp", "num_speculative_tokens": 1}, ("mtp", None, 4, 1)),
    # a key set to null is a key not given
    ({"method": "ngram", "num_speculative_tokens": 2, "model": None, "prompt_lookup_max": None},
     ("ngram", None, 4, 1)),
    # one bound given: the other takes its value, as vLLM's SpeculativeConfig sets it (only
    # n-grams of that length are looked up)
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, ("ngram", None, 5, 5)),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3}, ("ngram", None, 3, 3)),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}, ("ngram", None, 2, 2)),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 6}, ("ngram", None, 6, 6)),
    # vLLM's draft examples pin the draft to one rank: what braze does
    ({"model": "/d", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
     ("draft", "/d", 4, 1)),
])
def test_vllm_spellings_are_understood(value, want):
    c = SpeculativeConfig.of(value)
    assert (c.method, c.model, c.prompt_lookup_max, c.prompt_lookup_min) == want


@pytest.mark.parametrize("method", ["mtp", "deepseek_mtp"])
def test_mtp_without_a_count_guesses_once_per_layer(method):
    """vLLM reads an MTP config without num_speculative_tokens as the model's n_predict
    (num_nextn_predict_layers; braze compiles one layer): one guess, not an error. Other
    methods still need the count."""
    c = SpeculativeConfig.of({"method": method})
    assert (c.method, c.num_speculative_tokens) == ("mtp", 1)
    assert SpeculativeConfig.of('{"method": "mtp", "num_speculative_tokens": 3}') \
        .num_speculative_tokens == 3
    with pytest.raises(BrazeError, match="needs 'num_speculative_tokens'"):
        SpeculativeConfig.of({"method": "ngram"})


def test_llm_takes_vllms_speculative_config(store):
    """`LLM(model, speculative_config={...})` as in vLLM: the same tokens, speculating."""
    from braze.runtime.llm import LLM
    art = store.artifact("llama")
    prompt = repetitive(7, 4, 6)
    plain = LLM(art, backend="reference", num_kv_blocks=32).generate([prompt], GREEDY)
    llm = LLM(art, backend="reference", num_kv_blocks=32, speculative_config=NGRAM)
    assert llm.generate([prompt], GREEDY)[0].token_ids == plain[0].token_ids
    assert llm.engine.stats()["spec_decode_num_draft_tokens"] > 0
    with pytest.raises(BrazeError, match="speculative_config= or speculative="):
        LLM(art, backend="reference", speculative=NGRAM, speculative_config=NGRAM)


def test_json_and_dict_give_the_same_config():
    a = SpeculativeConfig.of('{"method": "ngram", "num_speculative_tokens": 2}')
    assert a == SpeculativeConfig.of({"method": "ngram", "num_speculative_tokens": 2})
    assert a.prompt_lookup_max == 4 and a.prompt_lookup_min == 1


def test_pruned_artifact_without_logits_rows_is_refused(store):
    art = store.artifact("llama", opt_level=2)       # LM head: one row per sequence
    with pytest.raises(BrazeError, match="--max-logits-rows 1024"):
        Engine(art, backend="reference", num_kv_blocks=32, speculative=NGRAM)


def test_async_scheduling_with_speculation_is_refused(store):
    with pytest.raises(BrazeError, match="synchronously"):
        Engine(store.artifact("llama"), backend="reference", num_kv_blocks=32,
               async_scheduling=True, speculative=NGRAM)


# ------------------------------------------------------------------ the proposer

def _brute_ngram(tokens, k, n_max, n_min):
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = tokens[L - n:]
        found = [tokens[j + n:j + n + k] for j in range(L - n) if tokens[j:j + n] == tail]
        if found:       # the latest earlier occurrence with k tokens after it, else the earliest
            return next((f for f in reversed(found) if len(f) == k), found[0])
    return []


def test_ngram_examples():
    assert ngram_propose([5, 6, 7, 8, 5, 6], 3, 4, 1) == [7, 8, 5]
    assert ngram_propose([5, 6, 7, 5, 6, 9, 5, 6], 2, 2, 1) == [9, 5]      # the latest match
    assert ngram_propose([1, 2, 3], 2, 3, 1) == []
    assert ngram_propose([4, 4, 4], 5, 2, 1) == [4]                        # what follows
    assert ngram_propose([9], 2, 3, 1) == []
    # a tail that repeats with a period shorter than k: the latest match has fewer than k
    # tokens after it (one, in a run of one token); an earlier one has all k, as vLLM's and
    # transformers' prompt lookup (the first match) propose
    assert ngram_propose([7, 4, 4, 4, 4, 4], 3, 2, 1) == [4, 4, 4]
    assert ngram_propose([1, 2, 3, 2, 3, 2, 3], 4, 2, 1) == [2, 3, 2, 3]
    assert ngram_propose([1, 2, 3, 2, 3, 2, 3], 2, 2, 1) == [2, 3]


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(0, 4), min_size=1, max_size=40), k=st.integers(1, 5),
       n_min=st.integers(1, 3), extra=st.integers(0, 3))
def test_ngram_matches_brute_force(tokens, k, n_min, extra):
    n_max = n_min + extra
    assert ngram_propose(tokens, k, n_max, n_min) == _brute_ngram(tokens, k, n_max, n_min)



@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=6), min_size=1,
                      max_size=12),
       prompt=st.lists(st.integers(0, 3), min_size=1, max_size=10),
       reuse=st.lists(st.integers(0, 3), min_size=1, max_size=10), k=st.integers(1, 4),
       n_min=st.integers(1, 2), extra=st.integers(0, 3))
def test_ngram_proposer_keeps_up_with_growing_requests(steps, prompt, reuse, k, n_min, extra):
    """The proposer's per-request arrays grow with each step's appended tokens (several
    at once after an accepted run): its guesses equal the brute force over the whole list
    at every step, and a finished request's id reused by a new one starts afresh."""
    from braze.runtime.speculative import NgramProposer

    class Req:
        def __init__(self, rid, toks):
            self.request_id, self.all_token_ids = rid, list(toks)

    n_max = n_min + extra
    prop = NgramProposer(SpeculativeConfig(method="ngram", num_speculative_tokens=k,
                                           prompt_lookup_max=n_max, prompt_lookup_min=n_min))
    a, b = Req("a", prompt), Req("b", prompt[::-1])
    for new in steps:
        a.all_token_ids += new
        b.all_token_ids += new[::-1]
        got = prop.propose([a, b], [k, k])
        assert got == [_brute_ngram(r.all_token_ids, k, n_max, n_min) for r in (a, b)]
    prop.forget(a)
    assert "a" not in prop._arrays
    again = Req("b", reuse)          # b's id, other tokens: not b's array
    assert prop.propose([again], [k]) == [_brute_ngram(reuse, k, n_max, n_min)]


# ------------------------------------------------------------------ exactness

@pytest.mark.parametrize("case,opt", [("llama", 0), ("llama", 2), ("qwen3-headdim24-tied", 2),
                                      ("qwen3_moe-dense-middle", 2)])
def test_greedy_identical_to_plain_decoding(store, case, opt):
    extra = {"max_num_seqs": 16, "max_logits_rows": 64} if opt == 2 else {}
    art = store.artifact(case, opt_level=opt, **extra)
    prompts = mixed_prompts()
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, GREEDY)
    # a small token budget: verification steps mix with chunked prefills and partial drafts
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_tokens=24,
                 max_num_seqs=8, speculative=NGRAM)
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_decode_num_draft_tokens"] > 0
    assert s["spec_decode_num_accepted_tokens"] <= s["spec_decode_num_draft_tokens"]
    assert_clean(eng)


def test_greedy_matches_transformers(store):
    art = store.artifact("llama", opt_level=2, max_num_seqs=16, max_logits_rows=64)
    prompt = repetitive(7, 4, 6)
    eng = Engine(art, backend="reference", num_kv_blocks=64, speculative=NGRAM)
    out = run_all(eng, [prompt], GREEDY)[0]
    with torch.no_grad():
        want = hf_model(store.checkpoint("llama")).generate(
            torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
    assert out.token_ids == want[0, len(prompt):].tolist()


class _Oracle:
    """Proposes the known continuation, with guess `wrong` (0-based) made wrong."""

    def __init__(self, futures: dict, wrong: int | None):
        self.futures, self.wrong = futures, wrong

    def propose(self, reqs, budgets):
        out = []
        for r, b in zip(reqs, budgets):
            full = self.futures[tuple(r.prompt_token_ids)]
            d = list(full[len(r.output_token_ids):len(r.output_token_ids) + b])
            if self.wrong is not None and self.wrong < len(d):
                d[self.wrong] = (d[self.wrong] + 1) % 200
            out.append(d)
        return out

    def forget(self, req):
        pass


@pytest.mark.parametrize("wrong", [None, 0, 2])
def test_acceptance_is_counted_per_position(store, wrong):
    art = store.artifact("llama")
    prompts = prompts_of([9, 14], seed=8)
    params = SamplingParams(max_tokens=17, ignore_eos=True)
    plain_eng = Engine(art, backend="reference", num_kv_blocks=64)
    plain = run_all(plain_eng, prompts, params)
    eng = Engine(art, backend="reference", num_kv_blocks=64, speculative=NGRAM)
    eng.spec.proposer = _Oracle({tuple(p): o.token_ids for p, o in zip(prompts, plain)}, wrong)
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = eng.stats()
    accepted = s["spec_decode_accepted_per_position"]
    proposed = s["spec_decode_proposed_per_position"]
    # the first token comes from the prefill; then each verification yields accepted + 1
    # tokens while a full k guesses fit in the 16 left
    if wrong is None:      # all accepted: 16 tokens in 4 verifications of 3 + 1
        assert s["spec_decode_num_drafts"] == 2 * 4 and accepted == proposed == [8, 8, 8]
        assert s["spec_decode_acceptance_rate"] == 1.0
        assert s["spec_decode_mean_acceptance_length"] == 4.0
    else:                  # guesses before `wrong` accepted, none after
        assert all(a == (p if j < wrong else 0) for j, (a, p) in enumerate(zip(accepted, proposed)))
        assert s["spec_decode_num_accepted_tokens"] == sum(accepted)
    assert s["steps"] < plain_eng.stats()["steps"] or wrong == 0
    assert_clean(eng)


@pytest.mark.parametrize("case", ["llama", "qwen3_moe-dense-middle"])
def test_seeded_sampling_identical_to_plain_decoding(store, case):
    """The verification draws each position's token with the noise the plain step would
    use (runtime/speculative.py): a seeded request gives the same tokens."""
    art = store.artifact(case)
    prompts = mixed_prompts()
    params = [SamplingParams(max_tokens=20, ignore_eos=True, temperature=t, top_k=k, top_p=p,
                             seed=100 + i)
              for i, (t, k, p) in enumerate([(0.3, 0, 1.0), (1.0, 20, 1.0), (0.7, 0, 0.9),
                                             (0.0, 0, 1.0), (0.5, 5, 0.8)])]
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, params)
    eng = Engine(art, backend="reference", num_kv_blocks=64, speculative=NGRAM)
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_clean(eng)


def test_grammar_requests_beside_speculating_ones(store):
    """Requests with structured outputs do not speculate, but share steps with requests
    that do: their grammar masks go to their own rows among the step's 1 + k rows per
    verifying request (more rows than sequences), and every request gets the plain
    engine's tokens, the grammar's text included."""
    import re
    art = store.artifact("llama")
    prompts = mixed_prompts()
    params = [SamplingParams(max_tokens=24, ignore_eos=True)] * 5
    params[1] = SamplingParams(max_tokens=24, structured_outputs={"regex": "[a-z]{3,10}"})
    params[3] = SamplingParams(max_tokens=24, temperature=0.8, seed=3,
                               structured_outputs={"regex": "(ab|cd)+e"})
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, params)
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_seqs=8, speculative=NGRAM)
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert re.fullmatch("[a-z]{3,10}", got[1].text) and re.fullmatch("(ab|cd)+e", got[3].text)
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_clean(eng)


CHI2_LIMIT = 45.0   # df <= 15: P(chi2 > 45) < 1e-4 for a correct sampler


def test_sampled_distribution_is_the_targets(tmp_path):
    """Rejection sampling keeps the target's distribution: with a 16-token vocabulary the
    third generated token's frequencies over 1200 seeds match its exact marginal under
    the model, sum over (x0, x1) of p(x0) p(x1 | x0) p(x2 | x0, x1) (chi-square), while
    proposals were both accepted and rejected on the way."""
    import braze
    from braze.tiny import make_checkpoint
    with contextlib.redirect_stderr(io.StringIO()):
        ck = make_checkpoint("llama", tmp_path / "m", seed=3, vocab_size=16, with_tokenizer=False)
    art = braze.compile(ck, tmp_path / "a", opt_level=0, targets="").root
    prompt = [1, 5, 6, 7, 5, 6, 7, 5, 6]
    eng = Engine(art, backend="reference", num_kv_blocks=256, max_num_seqs=128,
                 speculative={"method": "ngram", "num_speculative_tokens": 2})
    n = 1200
    params = [SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0, seed=s)
              for s in range(n)]
    got = run_all(eng, [prompt] * n, params)
    s = eng.stats()
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]
    counts = torch.bincount(torch.tensor([o.token_ids[2] for o in got]), minlength=16).double()
    model = hf_model(ck)
    with torch.no_grad():
        p0 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        x0 = torch.arange(16)[:, None]
        seq1 = torch.cat([torch.tensor([prompt] * 16), x0], 1)
        p1 = torch.softmax(model(seq1).logits[:, -1].double(), -1)            # [x0, x1]
        seq2 = torch.cat([seq1.repeat_interleave(16, 0), torch.arange(16).repeat(16)[:, None]], 1)
        p2 = torch.softmax(model(seq2).logits[:, -1].double(), -1).view(16, 16, 16)
    marginal = torch.einsum("a,ab,abc->c", p0, p1, p2)
    exp = marginal * n
    chi2 = float(((counts - exp) ** 2 / exp).sum())
    assert chi2 < CHI2_LIMIT
    uniform = torch.full((16,), n / 16.0, dtype=torch.float64)
    assert float(((counts - uniform) ** 2 / uniform).sum()) > CHI2_LIMIT   # it can tell


# ------------------------------------------------------------------ bookkeeping

def test_truncate_gives_back_blocks():
    from braze.runtime.block_manager import BlockManager
    bm = BlockManager(8, block_size=4)
    bm.allocate("a", list(range(6)))
    assert bm.reserve("a", 14) and bm.table_len("a") == 4 and bm.num_free_blocks == 4
    bm.commit("a", 6, list(range(6)))                 # one full block in the prefix cache
    bm.truncate("a", 9)
    assert bm.table_len("a") == 3 and bm.num_free_blocks == 5 and bm.num_tokens("a") == 9
    with pytest.raises(BrazeError, match="cannot truncate"):
        bm.truncate("a", 3)                           # into the cached block
    bm.free("a")
    assert bm.num_free_blocks == 8


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_mixed_requests_aborts_and_preemption(store, data):
    """Speculating and plain requests (logprobs make a request plain), random aborts and
    a cache small enough to preempt: every request that is not aborted gets the plain
    engine's tokens, and nothing leaks."""
    art = store.artifact("llama")
    n = data.draw(st.integers(3, 6), label="requests")
    prompts = [repetitive(s, data.draw(st.integers(2, 6), label="period"), 4)
               if data.draw(st.booleans(), label="repetitive") else prompts_of([17], seed=s)[0]
               for s in range(n)]
    params = [SamplingParams(max_tokens=data.draw(st.integers(4, 30), label="max_tokens"),
                             ignore_eos=True,
                             logprobs=2 if data.draw(st.booleans(), label="plain") else None)
              for _ in range(n)]
    aborts = {i: data.draw(st.integers(1, 6), label="abort after") for i in range(n)
              if data.draw(st.integers(0, 3), label="abort?") == 0}
    blocks = data.draw(st.sampled_from([7, 10, 64]), label="num_kv_blocks")
    k = data.draw(st.integers(1, 4), label="k")
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, params)
    eng = Engine(art, backend="reference", num_kv_blocks=blocks, max_num_tokens=32,
                 speculative={"method": "ngram", "num_speculative_tokens": k})
    for got, sp in zip(run_with_aborts(eng, prompts, params, aborts, plain), params):
        if got.finish_reason != "abort" and sp.logprobs is not None:
            assert [lp.token_id for lp in got.logprobs] == got.token_ids
    assert_clean(eng)
    s = eng.stats()
    assert s["kv_blocks_used"] == 0
    assert np.sum(s["spec_decode_accepted_per_position"]) == s["spec_decode_num_accepted_tokens"]


# ------------------------------------------------------------------ faces

def test_cli_generate_speculative_equals_plain(store):
    import json

    from cli_helpers import assert_one_line_error, run
    art = store.artifact("llama")
    ids = ",".join(map(str, repetitive(9, 4, 5)))
    common = ["generate", art, "--prompt-ids", ids, "--max-tokens", "12", "--backend",
              "reference", "--json", "--ignore-eos", "--num-kv-blocks", "32"]
    code, plain, err = run(*common)
    assert code == 0, err
    code, spec, err = run(*common, "--speculative",
                          '{"method": "ngram", "num_speculative_tokens": 3}')
    assert code == 0, err
    assert json.loads(spec)["token_ids"] == json.loads(plain)["token_ids"]
    code, spec, err = run(*common, "--speculative-config",       # vLLM's flag
                          '{"method": "ngram", "num_speculative_tokens": 2}')
    assert code == 0, err
    assert json.loads(spec)["token_ids"] == json.loads(plain)["token_ids"]
    code, _, err = run(*common, "--speculative", '{"method": "mtp", "num_speculative_tokens": 1}')
    assert_one_line_error(code, err, "mtp", "multi-token-prediction graph")


def test_prometheus_has_the_acceptance_metrics(store):
    from braze.serving.metrics import Metrics

    from serve_helpers import parse_metrics
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64,
                 speculative=NGRAM)
    run_all(eng, mixed_prompts(), GREEDY)
    s = eng.stats()
    got = parse_metrics(Metrics("m").render(s))
    assert got["braze_spec_decode_num_accepted_tokens_total"] == s["spec_decode_num_accepted_tokens"]
    assert got["braze_spec_decode_num_draft_tokens_total"] == s["spec_decode_num_draft_tokens"]
    assert s["spec_decode_num_accepted_tokens"] > 0
    for j, n in enumerate(s["spec_decode_accepted_per_position"]):
        assert got[f'braze_spec_decode_num_accepted_tokens_per_pos_total{{position="{j}"}}'] == n
    assert got["braze_spec_decode_acceptance_rate"] == pytest.approx(s["spec_decode_acceptance_rate"])
    assert "braze_spec_decode" not in Metrics("m").render({"running": 0})


def test_prometheus_has_vllms_spec_decode_names(store):
    """vLLM's dashboards read vllm:spec_decode_num_{drafts,draft_tokens,accepted_tokens}
    and the per-position counter, with its model_name label: the same values as braze's."""
    from braze.serving.metrics import Metrics

    from serve_helpers import parse_metrics
    eng = Engine(store.artifact("llama"), backend="reference", num_kv_blocks=64,
                 speculative=NGRAM)
    run_all(eng, mixed_prompts(), GREEDY)
    s = eng.stats()
    got = parse_metrics(Metrics("m").render(s))
    label = '{model_name="m"}'
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert got[f"vllm:spec_decode_{name}_total{label}"] == s["spec_decode_" + name]
    assert s["spec_decode_num_drafts"] > 0
    for j, n in enumerate(s["spec_decode_accepted_per_position"]):
        key = f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{j}"}}'
        assert got[key] == n
    assert "vllm:spec_decode" not in Metrics("m").render({"running": 0})


# ------------------------------------------------------------------ the draft method

@pytest.mark.parametrize("target,draft,opt", [
    ("llama", "llama", 0),                        # the target as its own draft: all accepted
    ("qwen3-headdim24-tied", "llama", 2),         # another model, same tokenizer
    ("qwen3_moe-dense-middle", "llama", 0),
])
def test_draft_greedy_identical_to_plain_decoding(store, target, draft, opt):
    extra = {"max_num_seqs": 16, "max_logits_rows": 64} if opt == 2 else {}
    art = store.artifact(target, opt_level=opt, **extra)
    prompts = mixed_prompts()
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, GREEDY)
    spec = {"method": "draft", "model": str(store.artifact(draft, max_num_tokens=16)),
            "num_speculative_tokens": 3}
    # the draft's 16-token budget prefills the prompts in chunks
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_tokens=24, max_num_seqs=8,
                 speculative=spec)
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_decode_num_draft_tokens"] > 0
    if target == draft:
        assert s["spec_decode_num_accepted_tokens"] == s["spec_decode_num_draft_tokens"]
    assert_clean(eng)
    assert not eng.spec.proposer.shadows
    assert eng.spec.proposer.bm.num_free_blocks == eng.spec.proposer.bm.num_blocks


def test_draft_seeded_sampling_identical(store):
    art = store.artifact("llama")
    params = [SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.8, seed=7 + i)
              for i in range(5)]
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), mixed_prompts(), params)
    spec = {"method": "draft", "model": str(art), "num_speculative_tokens": 2}
    eng = Engine(art, backend="reference", num_kv_blocks=64, speculative=spec)
    got = run_all(eng, mixed_prompts(), params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert 0 < eng.stats()["spec_decode_num_accepted_tokens"]


def test_draft_with_another_tokenizer_is_refused(store, tmp_path):
    import braze
    from braze.tiny import make_checkpoint
    with contextlib.redirect_stderr(io.StringIO()):
        ck = make_checkpoint("llama", tmp_path / "m", seed=3, vocab_size=128)
    other = braze.compile(ck, tmp_path / "a", opt_level=0, targets="").root
    spec = {"method": "draft", "model": str(other), "num_speculative_tokens": 2}
    with pytest.raises(BrazeError, match="tokenizer differs from the target's"):
        Engine(store.artifact("llama"), backend="reference", num_kv_blocks=32, speculative=spec)
    spec["model"] = str(tmp_path / "missing")
    with pytest.raises(BrazeError, match="speculative draft model"):
        Engine(store.artifact("llama"), backend="reference", num_kv_blocks=32, speculative=spec)


def test_draft_with_a_smaller_vocabulary_skips_ids_it_lacks(store, tmp_path):
    """A draft with the target's tokenizer but a smaller (less padded) vocabulary, like
    Qwen2.5-0.5B (151936 ids) for Qwen2.5-7B (152064): a request holding an id only the
    target has is verified without the draft's guesses (the draft's embedding has no row
    for it) and gets the plain engine's tokens; the others still speculate."""
    import shutil

    import braze
    from braze.tiny import make_checkpoint
    target = store.artifact("llama")
    tck = store.checkpoint("llama")
    with contextlib.redirect_stderr(io.StringIO()):
        ck = make_checkpoint("llama", tmp_path / "m", seed=3, vocab_size=200,
                             with_tokenizer=False)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tck / f, ck / f)
    draft = braze.compile(ck, tmp_path / "a", opt_level=0, targets="").root
    prompts = [[1] + [210, 220, 230] * 4, repetitive(5, 4, 5)]
    plain = run_all(Engine(target, backend="reference", num_kv_blocks=64), prompts, GREEDY)
    eng = Engine(target, backend="reference", num_kv_blocks=64,
                 speculative={"method": "draft", "model": str(draft), "num_speculative_tokens": 2})
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert eng.stats()["spec_decode_num_draft_tokens"] > 0
    assert_clean(eng)
    assert not eng.spec.proposer.shadows


# ------------------------------------------------------------------ the logits rows R

def test_bucket_logits_rows():
    from braze.ir.contract import StepLimits, bucket_sizes
    assert bucket_sizes(16, 4, 8)["R"] == 4                       # one per sequence: R = S
    assert bucket_sizes(16, 4, 8, 12)["R"] == 12
    assert bucket_sizes(8, 4, 8, 12)["R"] == 8                    # at most one per token
    lim = StepLimits(max_num_seqs=4)
    assert lim.max_logits_rows == 4 and lim.bindings()["R"] == 4
    old = {"max_num_tokens": 64, "max_num_seqs": 4, "max_model_len": 128, "block_size": 16}
    assert StepLimits.from_manifest({"limits": old}, "x").max_logits_rows == 4


def test_without_speculation_the_head_keeps_one_row_per_sequence(store):
    """An artifact with room for more logits rows costs nothing extra when not speculating:
    each bucket's R is its S; speculating, k + 1 rows per sequence."""
    art = store.artifact("llama", opt_level=2, max_num_seqs=16, max_logits_rows=64)
    plain = Engine(art, backend="reference", num_kv_blocks=32, max_num_seqs=8)
    g = plain.runner.graphs
    assert all(g.rows_for(T) == min(T, 8) for T in g.buckets)
    assert plain.runner.static["logits_indices"].shape[0] == 8
    spec = Engine(art, backend="reference", num_kv_blocks=32, max_num_seqs=8, speculative=NGRAM)
    assert all(spec.runner.graphs.rows_for(T) == min(T, 32) for T in g.buckets)
    assert spec.spec.max_rows == 32 and spec.spec.rows_bind    # 8 sequences, 24 guesses


@pytest.mark.parametrize("opt,extra,seqs", [(0, {}, None), (2, {"max_logits_rows": 64}, 16),
                                             (2, {"max_logits_rows": 20}, 16)])
def test_a_small_token_budget_still_speculates(store, opt, extra, seqs):
    """--max-num-tokens at or below --max-num-seqs (say 256 and 256): every logits row is a
    token of the step, so the token budget alone bounds the rows and the requests still
    speculate (at -O0 they silently did not; at -O2 the engine refused to start, asking
    for logits rows the artifact had). With fewer rows than tokens, the rows the running
    requests leave are theirs to verify guesses in."""
    art = store.artifact("llama", opt_level=opt, max_num_seqs=16, **extra)
    prompts = mixed_prompts()
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, GREEDY)
    tokens = 16 if extra.get("max_logits_rows", 0) != 20 else None
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_tokens=tokens,
                 max_num_seqs=seqs, speculative=NGRAM)
    got = run_all(eng, prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_decode_num_draft_tokens"] > 0 and s["spec_decode_num_accepted_tokens"] > 0
    assert_clean(eng)


def test_interpret_backend_launch_plans_verify(store):
    """The compiled launch plans (Triton kernels under the interpreter), with the pruned LM
    head sized by R: the speculating engine gives the reference engine's tokens."""
    art = store.artifact("llama", opt_level=2, max_num_seqs=8, max_logits_rows=32,
                         max_num_tokens=64)
    prompts = [[1] + [5, 6, 7, 8] * 5, [1, 9, 30, 31, 9, 30, 31, 9]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    want = run_all(Engine(art, backend="reference", num_kv_blocks=16), prompts, params)
    eng = Engine(art, backend="interpret", num_kv_blocks=16, buckets=[8, 64],
                 speculative=NGRAM)
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0
