"""Logits processing and logprobs of the batched sampler (runtime/sampler.py) against
straightforward per-row references: penalties (vLLM/OpenAI semantics), the sparse bias
table (logit_bias, bad words, min_tokens), raw logprobs and ranks, sampled frequencies
of processed logits, parameter validation and parallel-sampling children."""

from __future__ import annotations

import math

import pytest
import torch
from braze.ir.errors import BrazeError
from braze.runtime.sampler import (
    ALLOWED,
    NEVER,
    Processing,
    SamplingParams,
    SamplingTensors,
    apply_bad_word_sequences,
    apply_penalties,
    apply_sparse_bias,
    bias_entries,
    compute_logprobs,
    process_logits,
    sample_batch,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHI2_LIMIT = 45.0


def _logits(seed: int, rows: int, vocab: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def _reference_penalties(row, prompt, output, presence, frequency, repetition):
    """One row, in float64 Python-ish torch: the textbook definitions."""
    x = row.double().clone()
    for t in set(prompt) | set(output):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(output):
        x[t] -= frequency * output.count(t) + presence
    return x


# ---------------------------------------------------------------------------- penalties

@HYP
@given(data=st.data(), rows=st.integers(1, 6), vocab=st.integers(2, 40))
def test_penalties_match_the_per_row_reference(data, rows, vocab):
    logits = _logits(data.draw(st.integers(0, 1000)), rows, vocab)
    width = data.draw(st.integers(1, 24))
    tokens = torch.full((rows, width), 10**6, dtype=torch.int64)   # garbage past seq_len
    prompts, outputs, pl, sl = [], [], [], []
    for r in range(rows):
        n_p = data.draw(st.integers(1, width))
        n_o = data.draw(st.integers(0, width - n_p))
        seq = data.draw(st.lists(st.integers(0, vocab - 1), min_size=n_p + n_o, max_size=n_p + n_o))
        tokens[r, :len(seq)] = torch.tensor(seq)
        prompts.append(seq[:n_p])
        outputs.append(seq[n_p:])
        pl.append(n_p)
        sl.append(n_p + n_o)
    pen = st.floats(-2, 2, allow_nan=False)
    pres = [data.draw(pen) for _ in range(rows)]
    freq = [data.draw(pen) for _ in range(rows)]
    rep = [data.draw(st.floats(0.1, 3)) for _ in range(rows)]
    got = apply_penalties(logits, tokens, torch.tensor(pl), torch.tensor(sl),
                          torch.tensor(pres), torch.tensor(freq), torch.tensor(rep))
    for r in range(rows):
        want = _reference_penalties(logits[r], prompts[r], outputs[r], pres[r], freq[r], rep[r])
        torch.testing.assert_close(got[r].double(), want, rtol=1e-5, atol=1e-5)


def test_neutral_penalties_change_nothing():
    logits = _logits(1, 3, 50)
    tokens = torch.randint(0, 50, (3, 10))
    got = apply_penalties(logits, tokens, torch.tensor([3, 5, 10]), torch.tensor([10, 7, 10]),
                          torch.zeros(3), torch.zeros(3), torch.ones(3))
    assert torch.equal(got, logits)


# ---------------------------------------------------------------------- sparse bias table

def test_sparse_bias_adds_bans_and_expires():
    logits = torch.zeros(2, 6)
    ids = torch.tensor([[1, 4, 4, 0], [2, 3, 0, 0]])
    vals = torch.tensor([[5.0, -2.0, -1.0, 0.0], [float("-inf"), float("-inf"), 0.0, 0.0]])
    until = torch.tensor([[NEVER, NEVER, NEVER, 0], [NEVER, 3, 0, 0]])
    out = apply_sparse_bias(logits, ids, vals, until, torch.tensor([0, 2]))
    assert out[0].tolist() == [0, 5, 0, 0, -3, 0]           # repeated ids add up
    assert out[1].tolist() == [0, 0, float("-inf"), float("-inf"), 0, 0]
    out = apply_sparse_bias(logits, ids, vals, until, torch.tensor([0, 3]))
    assert out[1].tolist() == [0, 0, float("-inf"), 0, 0, 0]   # min_tokens reached: 3 allowed


def test_bias_entries_of_params():
    p = SamplingParams(logit_bias={"7": 200, 3: -0.5}, min_tokens=2, ignore_eos=True)
    p.validate()
    assert p.logit_bias == {7: 100.0, 3: -0.5}                # keys as ids, values clamped
    e = bias_entries(p, stop_ids=[2, 2, 9], bad_ids=[4])
    assert (7, 100.0, NEVER) in e and (3, -0.5, NEVER) in e
    assert (4, float("-inf"), NEVER) in e
    assert [x for x in e if x[2] == 2] == [(2, float("-inf"), 2), (9, float("-inf"), 2)]
    assert bias_entries(SamplingParams(), stop_ids=[2]) == []   # min_tokens 0: nothing


def test_greedy_and_sampled_rows_respect_bias_and_bans():
    vocab = 30
    logits = _logits(2, 4, vocab)
    top = logits.argmax(dim=-1)
    w = 2
    ids = torch.zeros(4, w, dtype=torch.int64)
    vals = torch.zeros(4, w)
    until = torch.zeros(4, w, dtype=torch.int64)
    ids[0, 0], vals[0, 0], until[0, 0] = 11, 100.0, NEVER          # bias forces token 11
    ids[1, 0], vals[1, 0], until[1, 0] = top[1], float("-inf"), NEVER   # ban the argmax
    ids[2, 0], vals[2, 0], until[2, 0] = top[2], float("-inf"), 5       # banned until 5
    proc = Processing(bias=(ids, vals, until))
    for temp in (0.0, 1.0):
        for counter in (0, 4, 5):
            c = torch.full((4,), counter)
            out = sample_batch(logits, torch.full((4,), temp), torch.zeros(4, dtype=torch.int64),
                               torch.ones(4), torch.arange(4), c, proc=proc)
            assert out[0] == 11 and out[1] != top[1]
            assert (out[2] != top[2]) if counter < 5 else True
            if temp == 0:
                assert out[3] == top[3] and (counter < 5 or out[2] == top[2])


# ------------------------------------------------------------------------- distribution

@pytest.mark.parametrize("seed", [0, 77])
def test_frequencies_match_softmax_of_the_processed_logits(seed):
    vocab, n, temp = 12, 20_000, 0.8
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.8, 0.3, -0.2, 1.2])
    history = torch.tensor([[0, 3, 0, 1, 0, 8]])          # prompt [0, 3], output [0, 1, 0, 8]
    logits = row.expand(n, vocab).contiguous()
    pen = dict(presence=0.3, frequency=0.4, repetition=1.5)
    ids = torch.tensor([[11, 5]]).expand(n, 2)
    vals = torch.tensor([[-3.0, 1.0]]).expand(n, 2)
    until = torch.full((n, 2), NEVER)
    proc = Processing(bias=(ids, vals, until),
                      penalties=(history.expand(n, 6), torch.full((n,), 2), torch.full((n,), 6),
                                 torch.full((n,), pen["presence"]), torch.full((n,), pen["frequency"]),
                                 torch.full((n,), pen["repetition"])))
    out = sample_batch(logits, torch.full((n,), temp), torch.zeros(n, dtype=torch.int64),
                       torch.ones(n), torch.full((n,), seed), torch.arange(n), proc=proc)
    counts = torch.bincount(out, minlength=vocab).double()
    biased = row.double().clone()
    biased[11] -= 3
    biased[5] += 1
    want = _reference_penalties(biased, [0, 3], [0, 1, 0, 8], **pen)
    probs = torch.softmax(want / temp, dim=0)
    chi2 = float(((counts - probs * n) ** 2 / (probs * n)).sum())
    assert chi2 < CHI2_LIMIT
    wrong = torch.softmax(row.double() / temp, dim=0)      # processing ignored
    assert float(((counts - wrong * n) ** 2 / (wrong * n)).sum()) > 10 * CHI2_LIMIT


# ----------------------------------------------------------------------------- logprobs

def test_logprobs_are_the_raw_log_softmax_with_ranks():
    logits = _logits(3, 5, 40).to(torch.float16)
    tokens = torch.tensor([0, 5, 39, 7, 7])
    lp = compute_logprobs(logits, tokens, 4)
    ref = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(lp.sampled.double(), ref[torch.arange(5), tokens], rtol=1e-5, atol=1e-5)
    for r in range(5):
        order = torch.argsort(ref[r], descending=True)
        assert lp.rank[r] == (order == tokens[r]).nonzero().item() + 1
        assert lp.top_ids[r].tolist() == order[:4].tolist()
        torch.testing.assert_close(lp.top_logprobs[r].double(), ref[r, order[:4]], rtol=1e-5, atol=1e-5)
    none = compute_logprobs(logits, tokens, 0)
    assert none.top_ids.shape == (5, 0) and none.rank.shape == (5,)


def test_processing_has_no_data_dependent_host_code():
    """On the meta device every host read of data fails: the op sequence is fixed."""
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")
    i64 = torch.int64
    proc = Processing(bias=(meta(5, 8, dtype=i64), meta(5, 8), meta(5, 8, dtype=i64)),
                      penalties=(meta(5, 17, dtype=i64), meta(5, dtype=i64), meta(5, dtype=i64),
                                 meta(5), meta(5), meta(5)))
    out = sample_batch(meta(5, 33), meta(5), meta(5, dtype=i64), meta(5), meta(5, dtype=i64),
                       meta(5, dtype=i64), proc=proc)
    assert out.shape == (5,) and out.device.type == "meta"
    lp = compute_logprobs(meta(5, 33), out, 3)
    assert lp.top_ids.shape == (5, 3) and lp.sampled.device.type == "meta"


# ------------------------------------------------------------------- SamplingTensors rows

def test_sampling_tensors_widen_the_table_and_clear_reused_rows():
    st_ = SamplingTensors(4)
    a = SamplingParams(logit_bias={i: 1.0 for i in range(5)}, presence_penalty=0.5)
    st_.set_rows([2], [a], [0], [bias_entries(a)])
    assert st_.bias_ids.shape[1] == 8 and st_.needs_bias([2]) and st_.needs_penalties([2])
    assert st_.bias_values[2].sum() == 5.0
    b = SamplingParams(logprobs=3)
    st_.set_rows([2], [b], [0], [bias_entries(b)])       # the row is reused: old entries go
    assert not st_.needs_bias([2]) and not st_.needs_penalties([2])
    assert st_.bias_values[2].abs().sum() == 0 and st_.num_logprobs([2, 1]) == 3
    assert st_.num_logprobs([1]) == -1
    logits = _logits(4, 1, 10)
    proc = st_.processing(torch.tensor([2]), bias=True, penalties=False)
    assert torch.equal(process_logits(logits, torch.tensor([0]), proc), logits)


# ------------------------------------------------------------------------------- params

@pytest.mark.parametrize("kwargs,fragment", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": True}, "repetition_penalty"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {5: float("inf")}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words_token_ids": [-3]}, "bad_words_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"n": 0}, "n must"),
    ({"n": 3, "best_of": 2}, "best_of"),
])
def test_validate_names_the_new_parameters(kwargs, fragment):
    with pytest.raises(BrazeError, match=fragment):
        SamplingParams(**kwargs).validate()


def test_children_of_parallel_sampling():
    p = SamplingParams(n=3, seed=2**63 - 2, temperature=1.0)
    kids = p.children()
    assert [k.seed for k in kids] == [2**63 - 2, 2**63 - 1, 0]
    assert all(k.n == 1 and k.best_of is None and k.logprobs is None for k in kids)
    kids = SamplingParams(n=2, best_of=4).children()
    assert len(kids) == 4 and all(k.logprobs == 0 and k.seed is None for k in kids)
    assert SamplingParams(logprobs=2).children()[0].logprobs == 2
    assert math.isfinite(SamplingParams().repetition_penalty)


@HYP
@given(data=st.data(), rows=st.integers(1, 5), vocab=st.integers(2, 30), width=st.integers(1, 6))
def test_sparse_bias_matches_a_loop(data, rows, vocab, width):
    logits = _logits(data.draw(st.integers(0, 99)), rows, vocab)
    entry = st.tuples(st.integers(0, vocab - 1),
                      st.one_of(st.floats(-100, 100), st.just(float("-inf"))),
                      st.one_of(st.integers(0, 8), st.just(NEVER)))
    table = [data.draw(st.lists(entry, min_size=width, max_size=width, unique_by=lambda e: e[0]))
             for _ in range(rows)]
    counters = [data.draw(st.integers(0, 8)) for _ in range(rows)]
    ids = torch.tensor([[e[0] for e in r] for r in table])
    vals = torch.tensor([[e[1] for e in r] for r in table])
    until = torch.tensor([[e[2] for e in r] for r in table])
    got = apply_sparse_bias(logits, ids, vals, until, torch.tensor(counters))
    want = logits.clone()
    for r in range(rows):
        for t, v, u in table[r]:
            if counters[r] < u:
                want[r, t] += v
    torch.testing.assert_close(got, want)


@HYP
@given(data=st.data(), rows=st.integers(1, 4), words=st.integers(1, 4), plen=st.integers(1, 4))
def test_bad_word_sequences_match_a_loop(data, rows, words, plen):
    vocab = 6                                  # few ids: prefixes match often
    logits = _logits(data.draw(st.integers(0, 99)), rows, vocab)
    tok = st.integers(0, vocab - 1)
    table = [[data.draw(st.lists(tok, min_size=2, max_size=plen + 1)) for _ in range(words)]
             for _ in range(rows)]
    live = [[data.draw(st.booleans()) for _ in range(words)] for _ in range(rows)]
    outputs = [data.draw(st.lists(tok, max_size=6)) for _ in range(rows)]
    prefix = torch.full((rows, words, plen), -1)
    last = torch.zeros(rows, words, dtype=torch.int64)
    for r in range(rows):
        for m, w in enumerate(table[r]):
            prefix[r, m, plen - (len(w) - 1):] = torch.tensor(w[:-1])
            last[r, m] = w[-1]
    tail = torch.full((rows, plen), -2)
    for r, out in enumerate(outputs):
        if out[-plen:]:
            tail[r, plen - len(out[-plen:]):] = torch.tensor(out[-plen:])
    got = apply_bad_word_sequences(logits, prefix, last, torch.tensor(live), tail)
    want = logits.clone()
    for r in range(rows):
        for m, w in enumerate(table[r]):
            k = len(w) - 1
            if live[r][m] and len(outputs[r]) >= k and outputs[r][len(outputs[r]) - k:] == w[:-1]:
                want[r, w[-1]] = float("-inf")
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_processed_sampling_replays_in_a_cuda_graph():
    """sample_batch with every processing step (and raw logprobs) captured once, replayed
    with new counters: equals eager (not run without a CUDA device)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev, s, vocab, hist = "cuda", 32, 32_000, 64
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(s, vocab, generator=g) * 3).to(dev)
    i64 = dict(dtype=torch.int64, device=dev)
    temp = torch.where(torch.arange(s) % 3 == 0, 0.0, 0.9).to(dev)
    top_k, top_p = torch.full((s,), 40, **i64), torch.full((s,), 0.9, device=dev)
    seeds, counters = torch.arange(s, **i64) * 7919, torch.arange(s, **i64)
    proc = Processing(
        bias=(torch.randint(0, vocab, (s, 8), generator=g).to(dev), torch.randn(s, 8, generator=g).to(dev),
              torch.full((s, 8), NEVER, **i64)),
        bad_words=(torch.randint(0, 50, (s, 2, 2), generator=g).to(dev),
                   torch.randint(0, vocab, (s, 2), generator=g).to(dev),
                   torch.ones(s, 2, dtype=torch.bool, device=dev),
                   torch.randint(0, 50, (s, 2), generator=g).to(dev)),
        penalties=(torch.randint(0, vocab, (s, hist), generator=g).to(dev), torch.full((s,), 20, **i64),
                   torch.full((s,), hist, **i64), torch.full((s,), 0.5, device=dev),
                   torch.full((s,), 0.3, device=dev), torch.full((s,), 1.2, device=dev)))

    def run():
        tok = sample_batch(logits, temp, top_k, top_p, seeds, counters, proc=proc)
        return tok, compute_logprobs(logits, tok, 5).sampled
    eager = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    counters.add_(1)
    graph.replay()
    assert torch.equal(captured[0], run()[0])


def test_allowed_token_ids_entries_keep_only_their_ids():
    """A row with allowed_token_ids entries keeps those ids (plus its bias) and nothing
    else; a row without them is untouched (the reference: a loop over the vocabulary)."""
    logits = _logits(4, 3, 12)
    p = SamplingParams(allowed_token_ids=[3, 7, 7, 10], logit_bias={7: 2.0, 5: 1.0})
    p.validate()
    e = bias_entries(p)
    assert sorted(x for x in e if x[2] == ALLOWED) == [(3, 0.0, ALLOWED), (7, 0.0, ALLOWED),
                                                        (10, 0.0, ALLOWED)]
    rows = [e, [(5, -1.0, NEVER)], []]
    w = max(map(len, rows))
    pad = [r + [(0, 0.0, 0)] * (w - len(r)) for r in rows]
    ids = torch.tensor([[t for t, _, _ in r] for r in pad])
    vals = torch.tensor([[v for _, v, _ in r] for r in pad])
    until = torch.tensor([[u for _, _, u in r] for r in pad])
    out = apply_sparse_bias(logits, ids, vals, until, torch.zeros(3, dtype=torch.int64),
                            allowed=True)
    want = logits.clone()
    for v in range(12):
        want[0, v] = logits[0, v] + {7: 2.0}.get(v, 0.0) if v in (3, 7, 10) else float("-inf")
    want[1, 5] -= 1.0
    assert torch.equal(out, want)
    st_ = SamplingTensors(4)
    st_.set_rows([1, 2], [p, SamplingParams()], [0, 0], [e, []])
    assert st_.needs_allowed([1]) and not st_.needs_allowed([2])
    st_.set_rows([1], [SamplingParams()], [0], [[]])        # the slot is reused
    assert not st_.needs_allowed([1])
