"""The fused sampling kernel (runtime/sampling_kernel.py, EngineOptions.sampler="triton")
against the torch sampler it replaces (runtime/sampler.py sample_batch): the same
counter-based noise, so the same tokens, greedy and sampled rows mixed, across vocab
blocks, with and without top-k / top-p / min-p (which the kernel finds without the
reference's sort), ties included; and through an engine, seeded requests give the torch
sampler's tokens."""

from __future__ import annotations

import pytest
import torch

from braze.runtime.sampler import KernelSampler, SamplingParams, gumbel_noise, sample_batch

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def kernel():
    return KernelSampler(interpret=True)


def _case(s: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, vocab, generator=g) * 3
    slots = 2 * s + 1                                     # rows index a larger slot table
    temperature = torch.rand(slots, generator=g) * 1.5 + 0.2
    temperature[::3] = 0.0                                # every third slot greedy
    seeds = torch.randint(0, 2**62, (slots,), generator=g)
    rows = torch.randperm(slots, generator=g)[:s]
    counters = torch.randint(0, 2**40, (s,), generator=g)
    return logits, rows, temperature, seeds, counters


@pytest.mark.parametrize("s, vocab", [(5, 700), (4, 2500), (1, 1024), (3, 3)])
def test_kernel_draws_the_torch_samplers_tokens(kernel, s, vocab):
    for seed in range(3):
        logits, rows, temperature, seeds, counters = _case(s, vocab, seed)
        got = kernel(logits, rows, temperature, seeds, counters)
        t = temperature[rows]
        want = sample_batch(logits, t, torch.zeros(s, dtype=torch.int64), torch.ones(s),
                            seeds[rows], counters, filter=False)
        assert got.dtype == torch.int64 and got.shape == (s,)
        # a float32 log may differ in its last bit between the two: a token may differ only
        # where its score ties the maximum to within that
        scores = torch.where((t > 0)[:, None], logits / t.clamp(min=1e-6)[:, None]
                             + gumbel_noise(seeds[rows], counters, vocab), logits)
        for i in range(s):
            if got[i] != want[i]:
                gap = scores[i, want[i]] - scores[i, got[i]]
                assert gap.abs() <= 1e-5 * scores[i].abs().max(), (i, got[i], want[i], gap)
        assert torch.equal(got, want)                      # and with these seeds, none does


def _filters(slots: int, vocab: int, g: torch.Generator):
    """Per-slot top_k / top_p / min_p, each feature alone and together: top_k 0 (off), small
    (1-3), anywhere, or past the vocabulary; top_p 1 (off) or (0.05, 0.95); min_p 0 or up to
    0.3."""
    top_k = torch.randint(1, vocab // 2 + 2, (slots,), generator=g)
    top_k[::4] = 0
    top_k[1::9] = vocab + 3
    top_k[2::5] = torch.randint(1, 4, (len(top_k[2::5]),), generator=g)
    top_p = torch.rand(slots, generator=g) * 0.9 + 0.05
    top_p[1::3] = 1.0
    min_p = torch.rand(slots, generator=g) * 0.3
    min_p[::2] = 0.0
    return top_k, top_p, min_p


@pytest.mark.parametrize("s, vocab, ties", [(8, 700, False), (8, 700, True), (4, 2500, False),
                                            (3, 3, False)])
def test_kernel_restricts_rows_as_the_torch_sampler_does(kernel, s, vocab, ties):
    """top-k, top-p and min-p per row, flat and peaked rows, and (ties) logits on a grid of
    0.25 so thresholds fall inside runs of equal values, which the reference keeps whole."""
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        scale = torch.tensor([0.3, 1.0, 3.0])[torch.randint(0, 3, (s, 1), generator=g)]
        logits = torch.randn(s, vocab, generator=g) * scale
        if ties:
            logits = (logits * 4).round() / 4
        slots = 2 * s + 1
        temperature = torch.rand(slots, generator=g) * 1.5 + 0.2
        temperature[::7] = 0.0
        seeds = torch.randint(0, 2**62, (slots,), generator=g)
        rows = torch.randperm(slots, generator=g)[:s]
        counters = torch.randint(0, 2**40, (s,), generator=g)
        top_k, top_p, min_p = _filters(slots, vocab, g)
        got = kernel(logits, rows, temperature, seeds, counters, (top_k, top_p, min_p))
        want = sample_batch(logits, temperature[rows], top_k[rows], top_p[rows], seeds[rows],
                            counters, filter=True, min_p=min_p[rows])
        assert torch.equal(got, want), (seed, got.tolist(), want.tolist())


def test_top_k_alone_on_flat_rows(kernel):
    """Flat rows, where every entry the top-k keeps is about as likely as the next: a k-th
    largest found wrongly (the radix select) shows in the draws."""
    g = torch.Generator().manual_seed(7)
    s, vocab = 6, 700
    logits = torch.randn(s, vocab, generator=g) * 0.3
    logits[5, 300:] = float("-inf")                # k beyond the finite entries: all kept
    top_k = torch.tensor([5, 50, 200, 1, 2, 650])
    ones, rows = torch.ones(s), torch.arange(s)
    kept = torch.zeros(s, vocab, dtype=torch.bool)
    for c in range(8):
        counters = torch.full((s,), c)
        got = kernel(logits, rows, ones, rows, counters, (top_k, ones, torch.zeros(s)))
        want = sample_batch(logits, ones, top_k, ones, rows, counters, min_p=torch.zeros(s))
        assert torch.equal(got, want)
        kept[rows, got] = True
    ranks = [int((logits[i] > logits[i][kept[i]].min()).sum()) for i in range(s)]
    assert all(r < min(k, 300) for r, k in zip(ranks, top_k.tolist()))
    assert ranks[1] > 5 and ranks[2] > 50                  # the draws did reach deep


def test_top_k_cuts_a_run_of_ties_keeping_all_of_it(kernel):
    """top_k = 3 where the 2nd-5th largest are equal: the reference keeps every entry equal
    to the last kept one, so all five; and top-p's mass counts the tie only as often as the
    sort keeps it (k = 3 entries in all): the largest holds e^1.5 / (e^1.5 + 2e) = 0.452 of
    it, so top_p 0.46 keeps the ties and 0.3 does not (counting all four tied entries, or
    none, would turn one of those around)."""
    logits = torch.full((1, 64), -4.0)
    logits[0, [9, 20, 33, 41]] = 1.0
    logits[0, 50] = 1.5
    one, row, seed = torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.tensor([11])
    for p, expect in ((1.0, {9, 20, 33, 41, 50}), (0.46, {9, 20, 33, 41, 50}), (0.3, {50})):
        filters = (torch.tensor([3]), torch.tensor([p]), torch.zeros(1))
        seen = set()
        for c in range(40):
            counters = torch.tensor([c])
            got = kernel(logits, row, one, seed, counters, filters)
            want = sample_batch(logits, one, filters[0], filters[1], seed, counters,
                                min_p=filters[2])
            assert torch.equal(got, want), (p, c)
            seen.add(int(got))
        assert seen == expect, p


@pytest.mark.parametrize("rounds", [0, 4])
def test_small_top_p_on_flat_rows_bisects_to_the_same_tokens(rounds):
    """A small top_p over a flat row rejects draw after draw: after `rounds` redraws the
    kernel bisects the kept set's boundary instead of drawing on (rounds 0: at the first
    rejection), so no row loops without bound; either way the tokens are the reference's."""
    kernel = KernelSampler(interpret=True, rounds=rounds)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        s, vocab = 6, 700
        scale = torch.tensor([0.1, 0.3, 1.0, 3.0, 0.05, 0.5])[:, None]
        logits = torch.randn(s, vocab, generator=g) * scale
        if seed == 1:
            logits = (logits * 8).round() / 8                # runs of equal values
        rows, ones = torch.arange(s), torch.ones(s)
        seeds = torch.randint(0, 2**62, (s,), generator=g)
        top_k = torch.tensor([0, 0, 50, 0, 300, 0])
        top_p = torch.tensor([0.02, 0.05, 0.3, 0.5, 0.01, 0.9])
        for c in range(3):
            counters = torch.full((s,), c + 10 * seed)
            got = kernel(logits, rows, ones, seeds, counters, (top_k, top_p, torch.zeros(s)))
            want = sample_batch(logits, ones, top_k, top_p, seeds, counters,
                                min_p=torch.zeros(s))
            assert torch.equal(got, want), (seed, c)


def test_greedy_rows_take_the_first_maximum_across_blocks(kernel):
    logits = torch.full((2, 3000), -5.0)
    logits[0, [1500, 2100, 2999]] = 7.0                    # ties in two later blocks
    logits[1, [3, 1030]] = 7.0
    temperature = torch.zeros(2)
    got = kernel(logits, torch.arange(2), temperature, torch.zeros(2, dtype=torch.int64),
                 torch.zeros(2, dtype=torch.int64))
    assert got.tolist() == [1500, 3]


def test_masked_entries_are_never_drawn(kernel):
    logits, rows, temperature, seeds, counters = _case(4, 600, 9)
    logits[:, 100:] = float("-inf")                        # a grammar's or a ban's mask
    for c in range(20):
        got = kernel(logits, rows, temperature, seeds, counters + c)
        assert (got < 100).all()


def test_engine_with_the_kernel_samples_the_torch_samplers_tokens(store):
    """Seeded sampled requests (and a greedy one) through an engine on each sampler: the
    same tokens; then top-p, top-k and min-p requests in one step: the kernel samples them
    too, with the torch sampler's tokens."""
    from braze.runtime.engine import Engine
    from conftest import run_all
    art = store.artifact("llama")
    prompts = [[1, 5, 9, 200, 31], [1, 77, 3], [1, 40, 41, 42, 43, 44]]
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=8, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.3, seed=5, ignore_eos=True)]
    restricted = [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.5, seed=2,
                                 ignore_eos=True),
                  SamplingParams(max_tokens=8, temperature=1.5, top_k=7, min_p=0.05, seed=3,
                                 ignore_eos=True),
                  SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=4,
                                 ignore_eos=True)]
    runs, filtered = {}, {}
    for sampler in ("torch", "triton"):
        eng = Engine(art, backend="reference", num_kv_blocks=32, sampler=sampler)
        runs[sampler] = [o.token_ids for o in run_all(eng, prompts, params)]
        k = eng.runner.batch.sampling.kernel
        assert (k is None) == (sampler == "torch")
        before = k.launches if k is not None else 0
        filtered[sampler] = [o.token_ids for o in run_all(eng, prompts, restricted)]
        if k is not None:
            assert before > 0 and k.launches > before
    assert runs["triton"] == runs["torch"]
    assert filtered["triton"] == filtered["torch"]


def test_unknown_sampler_is_refused():
    from braze.ir.errors import BrazeError
    from braze.runtime.options import EngineOptions
    with pytest.raises(BrazeError, match="sampler must be one of torch, triton"):
        EngineOptions(sampler="flashinfer")


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_kernel_compiles_to_cubin(target):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pathlib import Path

    import braze.runtime.sampler as sampler
    from braze.kernel_modules import load_source
    path = Path(sampler.__file__).with_name("sampling_kernel.py")
    fn = load_source("sampling_kernel", path.read_text(), str(path), False).sample_rows_kernel
    for logits_ty, filter in (("*fp32", False), ("*bf16", False), ("*bf16", True)):
        sig = {"logits_ptr": logits_ty, "rows_ptr": "*i64", "temperature_ptr": "*fp32",
               "seeds_ptr": "*i64", "counters_ptr": "*i64", "out_ptr": "*i64",
               "top_k_ptr": "*i64", "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "V": "i32",
               "stride_l": "i32", "BLOCK_V": "constexpr", "FILTER": "constexpr",
               "ROUNDS": "constexpr"}
        src = ASTSource(fn=fn, signature=sig, attrs={},
                        constexprs={"BLOCK_V": 4096, "FILTER": filter, "ROUNDS": 4})
        k = triton.compile(src, target=GPUTarget("cuda", int(target[3:]), 32))
        assert k.asm["cubin"]
