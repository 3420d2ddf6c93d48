"""The batched on-device sampler (runtime/sampler.py) against plain torch references:
greedy = argmax, top-k/top-p sets, sampled frequencies = softmax(logits / T), seeded
reproducibility, independence from batch composition, SamplingParams.validate()."""

from __future__ import annotations

import math

import pytest
import torch
from braze.ir.errors import BrazeError
from braze.runtime.sampler import (
    SamplingParams,
    SamplingTensors,
    gumbel_noise,
    resolve_seed,
    row_argmax,
    sample_batch,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _logits(seed: int, rows: int, vocab: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g, dtype=torch.float32) * scale


def _run(logits, temps, top_ks, top_ps, seeds, counters, filter=True):
    """sample_batch with per-row python values."""
    s = len(temps)
    assert logits.shape[0] == s
    return sample_batch(logits, torch.tensor(temps, dtype=torch.float32),
                        torch.tensor(top_ks, dtype=torch.int64),
                        torch.tensor(top_ps, dtype=torch.float32),
                        torch.tensor(seeds, dtype=torch.int64),
                        torch.tensor(counters, dtype=torch.int64), filter=filter)


def _reference_sets(row: torch.Tensor, temp: float, top_k: int, top_p: float, eps: float = 1e-5):
    """(strict, loose) boolean masks over the vocabulary of the tokens the row may pick, in
    float64: a token is allowed when it ranks within top_k and the probability mass of the
    tokens ranked above it (softmax over the top-k set) is below top_p; `strict` uses
    top_p - eps and `loose` top_p + eps so float32 rounding at the border is tolerated."""
    v = row.numel()
    x = row.double() / temp
    order = torch.argsort(x, descending=True, stable=True)
    k = top_k if 0 < top_k < v else v
    ranked = x[order].clone()
    ranked[k:] = float("-inf")
    probs = torch.softmax(ranked, dim=0)
    before = probs.cumsum(0) - probs
    in_k = torch.arange(v) < k
    strict, loose = torch.zeros(v, dtype=torch.bool), torch.zeros(v, dtype=torch.bool)
    strict[order] = in_k & (before < top_p - eps)
    loose[order] = in_k & (before < top_p + eps)
    return strict, loose


def _restricted_probs(row: torch.Tensor, temp: float, allowed: torch.Tensor) -> torch.Tensor:
    x = (row.double() / temp).masked_fill(~allowed, float("-inf"))
    return torch.softmax(x, dim=0)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token of probability 0"
    exp = probs[support] * n
    return float(((counts[support].double() - exp) ** 2 / exp).sum())


# ------------------------------------------------------------------------------ greedy

def test_greedy_rows_are_argmax_whatever_the_other_params():
    logits = _logits(0, 32, 300)
    top_ks = [0, 1, 5, 300, 1000] * 6 + [0, 3]
    top_ps = [1.0, 0.1, 0.5, 0.9] * 8
    out = _run(logits, [0.0] * 32, top_ks, top_ps, list(range(32)), list(range(32)))
    assert torch.equal(out, logits.argmax(dim=-1))
    out = _run(logits, [0.0] * 32, top_ks, top_ps, list(range(32)), list(range(32)), filter=False)
    assert torch.equal(out, logits.argmax(dim=-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = _logits(1, 16, 100)
    for ks, ps in (([1] * 16, [1.0] * 16), ([0] * 16, [1e-6] * 16)):
        out = _run(logits, [1.5] * 16, ks, ps, list(range(16)), [7] * 16)
        assert torch.equal(out, logits.argmax(dim=-1))


# ---------------------------------------------------------------------- allowed sets

@HYP
@given(data_seed=st.integers(0, 10_000), vocab=st.integers(2, 64),
       temp=st.sampled_from([0.3, 1.0, 2.5]), top_k=st.sampled_from([0, 1, 2, 5, 70]),
       top_p=st.sampled_from([1.0, 0.95, 0.6, 0.3, 0.05]), seed=st.integers(0, 2**63 - 1))
def test_sampled_tokens_stay_in_the_top_k_top_p_set(data_seed, vocab, temp, top_k, top_p, seed):
    row = _logits(data_seed, 1, vocab)[0]
    n = 300                                  # 300 draws: same row, counters 0..299
    logits = row.expand(n, vocab).contiguous()
    out = _run(logits, [temp] * n, [top_k] * n, [top_p] * n, [seed] * n, list(range(n)))
    strict, loose = _reference_sets(row, temp, top_k, top_p)
    assert loose[out].all(), f"picked {sorted(set(out.tolist()) - set(loose.nonzero().flatten().tolist()))}"
    # and with enough draws, every token of a small allowed set shows up
    p = _restricted_probs(row, temp, strict)
    likely = p > 0.05
    assert set(likely.nonzero().flatten().tolist()) <= set(out.tolist())


def test_restriction_keeps_ties_and_reaches_top_p():
    # two tokens tie for second place: top_k=2 keeps both (the set never depends on sort order)
    logits = torch.tensor([[3.0, 1.0, 1.0, -2.0]])
    out = {_run(logits, [1.0], [2], [1.0], [5], [c]).item() for c in range(200)}
    assert out == {0, 1, 2}
    # probs ~ [0.5, 0.3, 0.2]: top_p 0.5 keeps only token 0; 0.5000001 keeps 0 and 1
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    out = {_run(logits, [1.0], [0], [0.45], [5], [c]).item() for c in range(100)}
    assert out == {0}
    out = {_run(logits, [1.0], [0], [0.7], [5], [c]).item() for c in range(200)}
    assert out == {0, 1}


# ------------------------------------------------------------------------ distribution

def _frequencies(row, temp, top_k, top_p, seed, n):
    vocab = row.numel()
    logits = row.expand(n, vocab).contiguous()
    out = _run(logits, [temp] * n, [top_k] * n, [top_p] * n, [seed] * n, list(range(n)))
    return torch.bincount(out, minlength=vocab)


CHI2_LIMIT = 45.0   # df <= 15: P(chi2 > 45) < 1e-4 for a correct sampler


@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 7])
def test_frequencies_match_softmax_with_temperature(seed):
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.8, 0.3, -0.2, 1.2])
    temp, n = 0.7, 20_000
    counts = _frequencies(row, temp, 0, 1.0, seed, n)
    right = torch.softmax(row.double() / temp, dim=0)
    wrong = torch.softmax(row.double(), dim=0)           # temperature ignored
    assert _chi2(counts, right) < CHI2_LIMIT
    assert _chi2(counts, wrong) > 20 * CHI2_LIMIT        # the test can tell them apart


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.8), (6, 0.7)])
def test_frequencies_match_the_renormalised_restricted_softmax(top_k, top_p):
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.8, 0.3, -0.2, 1.2])
    temp, n = 1.3, 20_000
    strict, loose = _reference_sets(row, temp, top_k, top_p)
    assert torch.equal(strict, loose)                     # no borderline token in this case
    counts = _frequencies(row, temp, top_k, top_p, 99, n)
    assert _chi2(counts, _restricted_probs(row, temp, strict)) < CHI2_LIMIT
    assert _chi2(counts, _restricted_probs(row, 1.0, strict)) > 2 * CHI2_LIMIT


def _min_p_set(row: torch.Tensor, temp: float, min_p: float) -> torch.Tensor:
    """The tokens min_p keeps, in float64: probability (softmax at temp) at least min_p
    times the likeliest's."""
    p = torch.softmax(row.double() / temp, dim=0)
    return p >= min_p * p.max()


@pytest.mark.parametrize("min_p,top_k,top_p", [(0.1, 0, 1.0), (0.3, 0, 1.0), (0.05, 0, 0.6),
                                               (0.2, 3, 1.0)])
def test_min_p_keeps_tokens_near_the_likeliest_then_top_k_top_p(min_p, top_k, top_p):
    """vLLM's order: min_p over the temperature-scaled probabilities, then top-k / top-p
    over what it kept (renormalised); frequencies against that distribution."""
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.8, 0.3, -0.2, 1.2])
    temp, n = 1.3, 20_000
    kept = _min_p_set(row, temp, min_p)
    after = row.masked_fill(~kept, float("-inf"))
    strict, loose = (m & kept for m in _reference_sets(after, temp, top_k, top_p))
    assert torch.equal(strict, loose) and strict.sum() < row.numel()
    logits = row.expand(n, row.numel()).contiguous()
    out = sample_batch(logits, torch.full((n,), temp), torch.full((n,), top_k),
                       torch.full((n,), top_p), torch.full((n,), 42, dtype=torch.int64),
                       torch.arange(n), min_p=torch.full((n,), min_p))
    counts = torch.bincount(out, minlength=row.numel())
    assert _chi2(counts, _restricted_probs(row, temp, strict)) < CHI2_LIMIT
    if top_k or top_p < 1:          # and min_p first is not the same as min_p last
        last = _reference_sets(row, temp, top_k, top_p)[0] & kept
        if not torch.equal(last, strict):
            assert _chi2(counts, _restricted_probs(row, temp, last)) > 2 * CHI2_LIMIT


def test_min_p_zero_or_absent_changes_nothing_and_is_checked():
    logits = _logits(3, 8, 50)
    args = (torch.full((8,), 0.9), torch.zeros(8, dtype=torch.int64), torch.full((8,), 0.8),
            torch.arange(8), torch.arange(8))
    assert torch.equal(sample_batch(logits, *args), sample_batch(logits, *args,
                                                                 min_p=torch.zeros(8)))
    for bad in (-0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(BrazeError, match="min_p"):
            SamplingParams(temperature=1.0, min_p=bad).validate()
    assert SamplingParams(temperature=1.0, min_p=0.1).filters
    assert not SamplingParams(temperature=0.0, min_p=0.1).filters


def test_gumbel_noise_is_finite_for_extreme_seeds_and_counters():
    seeds = torch.tensor([0, 1, 2**63 - 1, 2**62, 2**32, 2**32 - 1])
    counters = torch.tensor([0, 2**40, 2**62, 1, 2**63 - 1, 123])
    g = gumbel_noise(seeds, counters, 5000)
    assert torch.isfinite(g).all()
    # rows are distinct streams and each is roughly standard Gumbel
    assert len({tuple(r[:8].tolist()) for r in g}) == 6
    assert (g.mean(dim=1) - 0.5772).abs().max() < 0.08
    assert (g.std(dim=1) - math.pi / math.sqrt(6)).abs().max() < 0.08


def _lowbias32(x: int) -> int:
    """Reference 32-bit hash with Python ints (unbounded, so no overflow tricks)."""
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_noise_is_the_documented_hash():
    """gumbel_noise(s, c)[v] = G(u) with u from lowbias32(key(s, c) ^ lowbias32(v ^ salt)),
    recomputed here with Python integers: pins the stream, so seeded outputs stay the same."""
    from braze.runtime import sampler as sm
    cases = [(0, 0), (1, 5), (2**63 - 1, 2**62 + 3), (123456789, 2**33 + 1)]
    vocab = 300
    noise = gumbel_noise(torch.tensor([c[0] for c in cases]), torch.tensor([c[1] for c in cases]), vocab)
    m = 0xFFFFFFFF
    for row, (seed, counter) in enumerate(cases):
        k = _lowbias32((seed & m) ^ sm._SEED_SALT)
        k = _lowbias32(k ^ (seed >> 32))
        k = _lowbias32(k ^ (counter & m))
        k = _lowbias32(k ^ (counter >> 32))
        xs = [_lowbias32(k ^ _lowbias32(v ^ sm._VOCAB_SALT)) for v in range(vocab)]
        u = torch.tensor([((x >> 9) + 0.5) * 2.0 ** -23 for x in xs], dtype=torch.float64)
        assert ((u > 0) & (u < 1)).all()
        torch.testing.assert_close(noise[row].double(), -torch.log(-torch.log(u)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ seeds

def test_same_seed_and_counter_give_the_same_token():
    logits = _logits(3, 1, 5000, scale=0.5)
    runs = [[_run(logits, [1.0], [0], [1.0], [42], [c]).item() for c in range(20)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 10                        # the counter moves the stream on
    # the same (seed, counter) in several rows of one batch gives the same token each time
    out = _run(logits.expand(8, 5000), [1.0] * 8, [0] * 8, [1.0] * 8, [42] * 8, [3] * 8)
    assert set(out.tolist()) == {runs[0][3]}


def test_different_seeds_give_different_streams():
    vocab, steps = 5000, 12
    logits = _logits(4, 1, vocab, scale=0.5).expand(steps, vocab).contiguous()
    streams = {tuple(_run(logits, [1.0] * steps, [0] * steps, [1.0] * steps, [seed] * steps,
                          list(range(steps))).tolist()) for seed in range(20)}
    assert len(streams) == 20


def test_resolve_seed():
    assert resolve_seed(7) == 7
    a, b = resolve_seed(None), resolve_seed(None)
    assert 0 <= a < 2**63 and 0 <= b < 2**63 and a != b


# -------------------------------------------------------------------- batch invariance

_row_params = st.tuples(st.integers(0, 10_000),                        # logits seed
                        st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.7]),     # temperature
                        st.sampled_from([0, 1, 3, 20]),                 # top_k
                        st.sampled_from([1.0, 0.9, 0.5]),               # top_p
                        st.integers(0, 2**63 - 1),                      # seed
                        st.integers(0, 10_000))                         # counter


@HYP
@given(rows=st.lists(_row_params, min_size=1, max_size=12), others=st.lists(_row_params, max_size=12),
       order_seed=st.integers(0, 1000))
def test_a_row_samples_the_same_alone_and_in_any_batch(rows, others, order_seed):
    vocab = 97

    def batch(items, filter=True):
        logits = torch.cat([_logits(r[0], 1, vocab) for r in items])
        return _run(logits, *[[r[i] for r in items] for i in range(1, 6)], filter=filter)

    alone = [batch([r]).item() for r in rows]
    mixed = rows + others
    perm = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(order_seed)).tolist()
    shuffled = batch([mixed[i] for i in perm])
    where = {i: j for j, i in enumerate(perm)}
    assert [shuffled[where[i]].item() for i in range(len(rows))] == alone
    # rows that restrict nothing give the same token without the filter pass
    plain = [i for i, r in enumerate(rows) if r[2] == 0 and r[3] == 1.0]
    if plain:
        unfiltered = batch([rows[i] for i in plain], filter=False)
        assert unfiltered.tolist() == [alone[i] for i in plain]


def test_mixed_greedy_and_sampled_rows():
    logits = _logits(5, 10, 400, scale=0.3)
    temps = [0.0, 1.0, 0.0, 2.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0]
    ks, ps = [0, 0, 5, 50, 0, 0, 0, 1, 10, 0], [1.0, 0.9, 1.0, 0.8, 0.2, 1.0, 1.0, 1.0, 1.0, 1.0]
    seeds, counters = list(range(100, 110)), list(range(10))
    out = _run(logits, temps, ks, ps, seeds, counters)
    greedy = [i for i, t in enumerate(temps) if t == 0]
    assert torch.equal(out[greedy], logits[greedy].argmax(dim=-1))
    sampled = [i for i, t in enumerate(temps) if t > 0]
    # with flat logits, sampled rows are (almost surely) not all at the argmax
    assert (out[sampled] != logits[sampled].argmax(dim=-1)).any()
    for i in range(10):
        assert out[i] == _run(logits[i:i + 1], [temps[i]], [ks[i]], [ps[i]], [seeds[i]], [counters[i]])


# ------------------------------------------------------------------ SamplingTensors

def test_sampling_tensors_fill_rows_and_sample_with_given_counters():
    vocab = 64
    st_ = SamplingTensors(8)
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(),
              SamplingParams(temperature=0.8, top_k=-1, top_p=0.9, seed=6)]
    st_.set_rows([6, 1, 3], params, [5, 0, 6])
    assert st_.all_greedy([1]) and not st_.all_greedy([1, 6])
    assert st_.needs_filter([3]) and not st_.needs_filter([6, 1])
    logits = _logits(6, 3, vocab)
    rows = torch.tensor([3, 6, 1])
    got = st_.sample(logits, rows, torch.tensor([2, 10, 0]))
    want = _run(logits, [0.8, 1.0, 0.0], [0, 0, 0], [0.9, 1.0, 1.0], [6, 5, 0], [2, 10, 0])
    assert torch.equal(got, want)
    # the next tokens of the same requests: the caller's counters move on
    got = st_.sample(logits, rows, torch.tensor([3, 11, 1]))
    assert torch.equal(got, _run(logits, [0.8, 1.0, 0.0], [0, 0, 0], [0.9, 1.0, 1.0],
                                 [6, 5, 0], [3, 11, 1]))
    assert torch.equal(st_.sample(logits, rows, None, greedy_only=True), logits.argmax(dim=-1))
    # min_p reaches the draw through the slot (and alone asks for the filtering path)
    st_.set_rows([6], [SamplingParams(temperature=1.0, min_p=0.3, seed=5)], [5])
    assert st_.needs_filter([6])
    many = logits[1:2].expand(400, vocab).contiguous()
    got = st_.sample(many, torch.full((400,), 6), torch.arange(400))
    assert _min_p_set(logits[1], 1.0, 0.3)[got].all()
    assert torch.equal(got, sample_batch(many, torch.ones(400), torch.zeros(400, dtype=torch.int64),
                                         torch.ones(400), torch.full((400,), 5), torch.arange(400),
                                         min_p=torch.full((400,), 0.3)))


def test_temperatures_below_vllms_epsilon_are_greedy():
    """vLLM samples greedily below temperature 1e-5; dividing by a tiny temperature
    instead overflowed to inf (1e-39: tokens unrelated to the logits)."""
    logits = _logits(7, 4, 300)
    temps = [1e-39, 1e-20, 1e-6, 0.0]
    st_ = SamplingTensors(4)
    st_.set_rows([0, 1, 2, 3], [SamplingParams(temperature=t, top_k=5, seed=9) for t in temps],
                 [9] * 4)
    assert st_.all_greedy(range(4)) and not st_.needs_filter(range(4))
    rows, counters = torch.arange(4), torch.arange(4)
    assert torch.equal(st_.sample(logits, rows, counters), logits.argmax(dim=-1))
    assert torch.equal(st_.sample(logits, rows, counters, filter=True, greedy_only=False),
                       logits.argmax(dim=-1))


_flag_ops = st.lists(st.tuples(st.sampled_from(["set", "release"]), st.integers(0, 5),
                               st.floats(0.0, 2.0), st.sampled_from([0, 3]),
                               st.sampled_from([1.0, 0.5])), max_size=30)


@HYP
@given(ops=_flag_ops)
def test_sampling_flags_follow_the_occupied_slots(ops):
    """The slot counters that let an all-greedy step skip the per-row checks agree with a
    per-slot recount after any sequence of fills and releases (a stale count would send a
    sampling request down the greedy path)."""
    st_ = SamplingTensors(6)
    occupied: dict[int, SamplingParams] = {}
    for op, row, temp, top_k, top_p in ops:
        if op == "set":
            p = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p)
            st_.set_rows([row], [p], [0])
            occupied[row] = p
        else:
            st_.release(row)
            occupied.pop(row, None)
        assert st_.any_sampling == any(not p.greedy for p in occupied.values())
        for rows in (list(occupied), list(occupied)[:1]):
            assert st_.all_greedy(rows) == all(occupied[r].greedy for r in rows)
            assert st_.needs_filter(rows) == any(occupied[r].filters for r in rows)


def test_row_argmax_takes_the_first_maximum_like_argmax():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -3.0]])
    assert row_argmax(x).tolist() == [1, 0, 0] == x.argmax(dim=-1).tolist()
    logits = _logits(9, 64, 300).round()          # rounded: many ties
    assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))


def test_sample_batch_has_no_data_dependent_host_code():
    """On the meta device every data-dependent host read (.item(), `if tensor`) fails,
    so this passing means the op sequence is fixed, as CUDA graph capture needs."""
    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="meta")
    i64 = torch.int64
    for filter in (True, False):
        out = sample_batch(meta(5, 33), meta(5), meta(5, dtype=i64), meta(5), meta(5, dtype=i64),
                           meta(5, dtype=i64), filter=filter)
        assert out.shape == (5,) and out.dtype == i64 and out.device.type == "meta"


def test_bfloat16_logits_are_accepted():
    logits = _logits(7, 4, 50).to(torch.bfloat16)
    out = _run(logits, [0.0, 1.0, 0.0, 1.0], [0, 5, 0, 0], [1.0, 1.0, 1.0, 0.5], [1, 2, 3, 4], [0] * 4)
    assert out.dtype == torch.int64
    assert out[0] == logits[0].float().argmax() and out[2] == logits[2].float().argmax()


# ------------------------------------------------------------------------- validate

@pytest.mark.parametrize("kwargs,fragment", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": False}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"seed": True}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_validate_names_the_parameter_and_value(kwargs, fragment):
    with pytest.raises(BrazeError) as err:
        SamplingParams(**kwargs).validate()
    msg = str(err.value)
    assert fragment in msg and "\n" not in msg
    (name, value), = kwargs.items()
    if name != "stop" or not isinstance(value, list) or len(value) <= 16:
        shown = value[-1] if isinstance(value, list) else value
        assert repr(shown) in msg


def test_validate_accepts_and_normalises():
    p = SamplingParams(max_tokens=1, temperature=0, top_p=1, top_k=-1, seed=0, stop="\n\n",
                       stop_token_ids=(5, 6), ignore_eos=True)
    p.validate()
    assert p.top_k == 0 and p.stop == ["\n\n"] and p.stop_token_ids == [5, 6]
    assert SamplingParams(stop=None).stop == [] and SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    SamplingParams(temperature=2, top_p=0.01, top_k=10**6, seed=2**63 - 1,
                   stop=["x"] * 16).validate()
    # defaults unchanged
    d = SamplingParams()
    assert (d.max_tokens, d.temperature, d.top_p, d.top_k, d.seed, d.stop_token_ids, d.ignore_eos,
            d.stop) == (16, 0.0, 1.0, 0, None, [], False, [])


# ------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_cuda_graph_replay_and_batch_invariance_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = "cuda"
    s, vocab = 64, 32_000
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(s, vocab, generator=g) * 3).to(dev)
    temp = torch.where(torch.arange(s) % 4 == 0, 0.0, 0.9).to(dev)
    top_k = (torch.arange(s) % 3 * 20).to(dev)
    top_p = torch.where(torch.arange(s) % 5 == 0, 0.8, 1.0).to(dev)
    seeds = torch.arange(s, dtype=torch.int64, device=dev) * 7919
    counters = torch.arange(s, dtype=torch.int64, device=dev)
    args = (logits, temp, top_k, top_p, seeds, counters)
    eager = sample_batch(*args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_batch(*args)                                 # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sample_batch(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    counters.add_(1)                                        # new inputs through the same buffers
    graph.replay()
    assert torch.equal(captured, sample_batch(*args))
    # a row alone equals the row in the batch
    for i in (0, 1, 5, 17, 63):
        one = sample_batch(*(a[i:i + 1] for a in args))
        assert one.item() == captured[i].item()
