"""Sampling options end to end in the engine and LLM.generate (reference backend, tiny
float32 llama): raw logprobs against transformers' log_softmax, penalties against a
per-row reference over transformers' logits, logit bias, bad words, min_tokens, batch
and overlap invariance, and parallel sampling (n, best_of) incl. its distribution."""

from __future__ import annotations

import pytest
import torch

from braze.ir.errors import BrazeError
from braze.runtime.engine import Engine
from braze.runtime.llm import LLM
from braze.runtime.sampler import SamplingParams

from conftest import hf_model, prompts_of, run_all


@pytest.fixture(scope="module")
def art(store):
    return store.artifact("llama")


@pytest.fixture(scope="module")
def model(store):
    return hf_model(store.checkpoint("llama"))


@pytest.fixture(scope="module")
def eng(art):
    return Engine(art, backend="reference", num_kv_blocks=64)


def _hf_logits(model, prompt, generated):
    """transformers' logits for each generated position (teacher forcing)."""
    with torch.no_grad():
        return model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1].double()


def _penalised(row, prompt, output, p):
    x = row.clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    return x


def test_logprobs_are_transformers_log_softmax(eng, model):
    prompts = prompts_of([5, 17], seed=11)
    sp = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5)
    for p, o in zip(prompts, run_all(eng, prompts, sp)):
        ref = torch.log_softmax(_hf_logits(model, p, o.token_ids), dim=-1)
        assert len(o.logprobs) == 6
        for i, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
            assert lp.token_id == tok and lp.rank == 1           # greedy: the most likely
            assert abs(lp.logprob - ref[i, tok].item()) < 1e-4
            top = torch.topk(ref[i], 5)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert max(abs(v - w) for (_, v), w in zip(lp.top, top.values.tolist())) < 1e-4
        assert abs(o.cumulative_logprob - sum(x.logprob for x in o.logprobs)) < 1e-6


def test_sampled_token_rank_and_logprob_without_top(eng, model):
    p = prompts_of([9], seed=12)[0]
    (o,) = run_all(eng, [p], SamplingParams(max_tokens=5, temperature=1.5, seed=3, ignore_eos=True,
                                            logprobs=0))
    ref = torch.log_softmax(_hf_logits(model, p, o.token_ids), dim=-1)
    for i, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
        assert lp.top == [] and abs(lp.logprob - ref[i, tok].item()) < 1e-4
        assert lp.rank == int((ref[i] > ref[i, tok] + 1e-6).sum()) + 1


def test_penalties_and_bias_follow_the_reference_greedily(eng, model):
    prompts = prompts_of([4, 12], seed=13)
    sp = SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=0.8,
                        frequency_penalty=0.6, repetition_penalty=1.4, logit_bias={17: 0.7, 30: -5})
    outs = run_all(eng, prompts, sp)
    plain = run_all(eng, prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert any(a.token_ids != b.token_ids for a, b in zip(outs, plain))   # it changes something
    for p, o in zip(prompts, outs):
        hf = _hf_logits(model, p, o.token_ids)
        for i, tok in enumerate(o.token_ids):
            x = _penalised(hf[i], p, o.token_ids[:i], sp)
            assert x[tok] >= x.max() - 1e-4, (i, tok, x.argmax().item())


@pytest.mark.parametrize("lag", [False, True])
def test_options_are_batch_and_overlap_invariant(art, lag):
    eng = Engine(art, backend="reference", num_kv_blocks=64, async_scheduling=lag,
                 max_num_tokens=24)
    prompts = prompts_of([3, 20, 8, 30], seed=14)
    params = [SamplingParams(max_tokens=10, temperature=0.9, seed=5, frequency_penalty=1.0,
                             repetition_penalty=1.2, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=8, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=1.0, seed=6, logit_bias={3: 4.0},
                             min_tokens=4, presence_penalty=-0.5, ignore_eos=False),
              SamplingParams(max_tokens=7, top_k=5, temperature=0.7, seed=8, ignore_eos=True,
                             bad_words_token_ids=[3, 4, 5])]
    together = run_all(eng, prompts, params)
    alone = [run_all(Engine(art, backend="reference", num_kv_blocks=64), [p], [sp])[0]
             for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for a, b in zip(together[0].logprobs, alone[0].logprobs):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5 and a.rank == b.rank
    assert not set(together[3].token_ids) & {3, 4, 5}


def test_logit_bias_forces_and_bad_words_ban(eng, art):
    p = prompts_of([6], seed=15)[0]
    (o,) = run_all(eng, [p], SamplingParams(max_tokens=5, ignore_eos=True, logit_bias={42: 100}))
    assert o.token_ids == [42] * 5
    (g,) = run_all(eng, [p], SamplingParams(max_tokens=5, ignore_eos=True))
    (b,) = run_all(eng, [p], SamplingParams(max_tokens=5, ignore_eos=True,
                                            bad_words_token_ids=[g.token_ids[0]]))
    assert g.token_ids[0] not in b.token_ids
    # bad words as text: the word's one-token encodings are banned
    tok = eng.tokenizer
    word = next(w for w in (tok.decode([t]) for t in range(3, 200)) if w.strip() and
                len(tok.encode(w.strip())) - len(tok.encode("")) == 1).strip()
    banned = eng._bad_word_ids(SamplingParams(bad_words=[word]))
    assert banned and all(tok.decode([t]).strip() == word for t in banned)
    with pytest.raises(BrazeError, match="bad_words"):
        eng.add_request("bw", p, SamplingParams(bad_words=["a very long phrase " * 8]))
    with pytest.raises(BrazeError, match="logit_bias.*99999"):
        eng.add_request("lb", p, SamplingParams(logit_bias={99999: 1}))


def test_min_tokens_holds_back_stop_tokens(eng):
    p = prompts_of([6], seed=16)[0]
    (g,) = run_all(eng, [p], SamplingParams(max_tokens=6, ignore_eos=True))
    stop = g.token_ids[0]
    (o,) = run_all(eng, [p], SamplingParams(max_tokens=6, stop_token_ids=[stop]))
    assert o.token_ids == [stop] and o.finish_reason == "stop"
    (o,) = run_all(eng, [p], SamplingParams(max_tokens=6, stop_token_ids=[stop], min_tokens=3))
    assert len(o.token_ids) >= 3 and stop not in o.token_ids[:2]


def test_n_and_best_of_through_llm_generate(art):
    llm = LLM(art, backend="reference", num_kv_blocks=64)
    p = prompts_of([5], seed=17)[0]
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=21, n=4, ignore_eos=True)
    (a,) = llm.generate([p], sp)
    (b,) = llm.generate([p], sp)
    assert len(a.outputs) == 4 and a.outputs[0] is a
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    # child i is the seed + i request
    (c,) = llm.generate([p], SamplingParams(max_tokens=6, temperature=1.0, seed=23, ignore_eos=True))
    assert c.token_ids == a.outputs[2].token_ids
    # best_of: the n of highest cumulative logprob among best_of samples
    bo = SamplingParams(max_tokens=6, temperature=1.0, seed=21, n=2, best_of=5, ignore_eos=True)
    (best,) = llm.generate([p], bo)
    every = llm.generate([p] * 5, [SamplingParams(max_tokens=6, temperature=1.0, seed=21 + i,
                                                  logprobs=0, ignore_eos=True) for i in range(5)])
    ranked = sorted(every, key=lambda o: -o.cumulative_logprob)[:2]
    assert [o.token_ids for o in best.outputs] == [o.token_ids for o in ranked]
    assert best.logprobs is None                 # not asked for
    with pytest.raises(BrazeError, match="best_of"):
        llm.generate([p], SamplingParams(n=3, best_of=2))
    s = llm.stats()
    assert s["num_running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]


@pytest.mark.parametrize("lag", [False, True])
def test_parallel_samples_share_the_prompts_blocks(art, lag):
    llm = LLM(art, backend="reference", num_kv_blocks=64, async_scheduling=lag)
    p = prompts_of([40], seed=19)[0]                 # two full 16-token blocks
    sp = SamplingParams(max_tokens=4, temperature=1.0, seed=5, n=4, ignore_eos=True)
    (o,) = llm.generate([p], sp)
    assert llm.stats()["prefix_cache_hit_tokens"] == 3 * 32     # each sibling hits both
    alone = [LLM(art, backend="reference", num_kv_blocks=64).generate(
        [p], SamplingParams(max_tokens=4, temperature=1.0, seed=5 + i, ignore_eos=True))[0]
        for i in range(4)]
    assert [x.token_ids for x in o.outputs] == [x.token_ids for x in alone]


def test_n_samples_follow_the_models_distribution(art, model):
    """6 x n=100 one-token samples at temperature 1.3: frequencies = softmax(hf_logits / T)."""
    llm = LLM(art, backend="reference", num_kv_blocks=256)
    p = prompts_of([4], seed=18)[0]
    temp, n = 1.3, 600
    outs = llm.generate([p] * 6, [SamplingParams(max_tokens=1, temperature=temp, seed=1000 * k,
                                                 n=100, ignore_eos=True) for k in range(6)])
    tokens = [x.token_ids[0] for o in outs for x in o.outputs]
    assert len(tokens) == n
    counts = torch.bincount(torch.tensor(tokens), minlength=256)
    with torch.no_grad():
        logits = model(torch.tensor([p])).logits[0, -1].double()

    def chi2(probs):
        probs = probs[:256]
        big = probs * n >= 8                      # bins with enough expectation; the rest pooled
        exp = torch.cat([probs[big] * n, (probs[~big].sum() * n)[None]])
        got = torch.cat([counts[big].double(), counts[~big].sum()[None].double()])
        return float(((got - exp) ** 2 / exp).sum()), int(big.sum())
    stat, bins = chi2(torch.softmax(logits / temp, dim=0))
    assert bins >= 5 and stat < 3 * bins + 40          # far beyond chance for a right sampler
    wrong, _ = chi2(torch.softmax(logits / 0.5, dim=0))
    assert wrong > 4 * stat


def test_prompt_logprobs_are_transformers_log_softmax(store, model):
    """An -O0 artifact has logits at every position: each prompt token's logprob given
    its prefix, over chunked prefill (small token budget) and a prefix-cache-warm prompt."""
    art = store.artifact("llama")
    eng = Engine(art, backend="reference", num_kv_blocks=64, max_num_tokens=16)
    p = prompts_of([37], seed=20)[0]
    run_all(eng, [p], SamplingParams(max_tokens=2))             # the prompt is now cached
    (o,) = run_all(eng, [p], SamplingParams(max_tokens=2, prompt_logprobs=3, ignore_eos=True))
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), dim=-1)
    plp = o.prompt_logprobs
    assert len(plp) == len(p) and plp[0] is None
    for pos in range(1, len(p)):
        e = plp[pos]
        assert e.token_id == p[pos]
        assert abs(e.logprob - ref[pos - 1, p[pos]].item()) < 1e-4
        assert e.rank == int((ref[pos - 1] > ref[pos - 1, p[pos]] + 1e-6).sum()) + 1
        assert [t for t, _ in e.top] == torch.topk(ref[pos - 1], 3).indices.tolist()
    # parallel samples: the first computes them, the report carries them
    (n,) = LLM(art, backend="reference", num_kv_blocks=64).generate(
        [p], SamplingParams(max_tokens=2, n=2, temperature=1.0, prompt_logprobs=0, seed=1))
    assert [e.token_id for e in n.prompt_logprobs[1:]] == p[1:]


@pytest.mark.parametrize("lag", [False, True])
def test_options_survive_preemption(art, lag):
    """Penalties read the token history from the rows, min_tokens the output count: both
    are rebuilt when a preempted request is readmitted and recomputed."""
    prompts = prompts_of([20, 25, 18, 30, 22, 19], seed=21)
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=4, frequency_penalty=0.7,
                            repetition_penalty=1.3, min_tokens=10, logit_bias={9: 1.0},
                            logprobs=1)
    roomy = run_all(Engine(art, backend="reference", num_kv_blocks=64), prompts, params)
    tight = Engine(art, backend="reference", num_kv_blocks=8, async_scheduling=lag)
    got = run_all(tight, prompts, params)
    assert tight.stats()["preemptions"] > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in roomy]
    assert all(len(o.logprobs) == len(o.token_ids) for o in got)


def test_logprobs_are_raw_even_with_bias_and_penalties(eng, model):
    """vLLM's default logprobs_mode: the model's logprobs, not the processed ones."""
    p = prompts_of([6], seed=22)[0]
    (o,) = run_all(eng, [p], SamplingParams(max_tokens=3, ignore_eos=True, logprobs=1,
                                            logit_bias={42: 100}, repetition_penalty=2.0))
    assert o.token_ids == [42, 42, 42]
    ref = torch.log_softmax(_hf_logits(model, p, o.token_ids), dim=-1)
    for i, e in enumerate(o.logprobs):
        assert abs(e.logprob - ref[i, 42].item()) < 1e-4 and e.logprob < -1   # not ~0
        assert e.top[0][0] == ref[i].argmax().item()


@pytest.mark.parametrize("lag", [False, True])
def test_multi_token_bad_words_are_never_completed(art, lag):
    eng = Engine(art, backend="reference", num_kv_blocks=64, async_scheduling=lag)
    tok = eng.tokenizer
    lead = tok.encode("")
    p = prompts_of([5], seed=23)[0]
    (g,) = run_all(eng, [p], SamplingParams(max_tokens=12, ignore_eos=True))
    ids = g.token_ids
    word = None
    for i in range(1, len(ids) - 1):         # two output tokens that are a word's encoding
        text = tok.decode(ids[i:i + 2])
        enc = tok.encode(text)
        if enc[len(lead):] == ids[i:i + 2] and text.strip():
            word = text
            break
    if word is None:
        pytest.skip("no two-token word in this greedy continuation")
    sp = SamplingParams(max_tokens=12, ignore_eos=True, bad_words=[word])
    single, multi = eng._bad_words(sp)
    assert ids[i:i + 2] in multi
    others = prompts_of([9, 14], seed=24)
    outs = run_all(eng, [p] + others, [sp, GREEDY_12, sp])
    o = outs[0].token_ids
    assert o[:i] == ids[:i] and o != ids           # same until the word would complete
    for out in (outs[0], outs[2]):
        t = out.token_ids
        for w in multi:
            assert not any(t[k:k + len(w)] == w for k in range(len(t) - len(w) + 1)), (w, t)
        assert not set(t) & set(single)
    assert outs[1].token_ids == run_all(eng, [others[0]], GREEDY_12)[0].token_ids


GREEDY_12 = SamplingParams(max_tokens=12, ignore_eos=True)


def test_allowed_token_ids_restrict_every_step_to_the_set(eng, model):
    """vLLM's allowed_token_ids: greedy picks the likeliest allowed token of transformers'
    logits at every step (in a batch with an unrestricted request, which is unchanged);
    sampling never leaves the set; ids outside the vocabulary are refused."""
    prompts = prompts_of([5, 9], seed=21)
    allowed = [7, 30, 31, 99, 150]
    free = run_all(eng, prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    outs = run_all(eng, prompts, [SamplingParams(max_tokens=6, ignore_eos=True,
                                                 allowed_token_ids=allowed),
                                  SamplingParams(max_tokens=6, ignore_eos=True)])
    logits = _hf_logits(model, prompts[0], outs[0].token_ids)
    mask = torch.full_like(logits[0], float("-inf"))
    mask[allowed] = 0
    assert outs[0].token_ids == (logits + mask).argmax(dim=-1).tolist()
    assert outs[1].token_ids == free[1].token_ids
    many = run_all(eng, prompts, SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.5,
                                                seed=4, allowed_token_ids=allowed, n=1))
    assert all(set(o.token_ids) <= set(allowed) for o in many)
    with pytest.raises(BrazeError, match="allowed_token_ids.*99999"):
        eng.add_request("at", prompts[0], SamplingParams(allowed_token_ids=[5, 99999]))
    for bad in ([], [-1], "7"):
        with pytest.raises(BrazeError, match="allowed_token_ids"):
            SamplingParams(allowed_token_ids=bad).validate()
