"""The fused sampling kernel (runtime/sampling_kernel.py, EngineOptions.sampler="triton")
against the torch sampler it replaces (runtime/sampler.py sample_batch, filter=False): the
same counter-based noise, so the same tokens, greedy and sampled rows mixed, across vocab
blocks; and through an engine, seeded requests give the torch sampler's tokens."""

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
    same tokens; a top-p request in the same step takes the torch path, and the kernel ran."""
    from braze.runtime.engine import Engine
    from conftest import run_all
    art = store.artifact("llama")
    prompts = [[1, 5, 9, 200, 31], [1, 77, 3], [1, 40, 41, 42, 43, 44]]
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=8, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.3, seed=5, ignore_eos=True)]
    runs = {}
    for sampler in ("torch", "triton"):
        eng = Engine(art, backend="reference", num_kv_blocks=32, sampler=sampler)
        runs[sampler] = [o.token_ids for o in run_all(eng, prompts, params)]
        k = eng.runner.batch.sampling.kernel
        assert (k is None) == (sampler == "torch")
        if k is not None:
            assert k.launches > 0
            before = k.launches         # a step with a top-p row samples on the torch path
            topp = params[:1] + [SamplingParams(max_tokens=8, temperature=1.0, top_p=0.5,
                                                seed=2, ignore_eos=True)]
            run_all(eng, prompts[:2], topp)
            assert k.launches == before
    assert runs["triton"] == runs["torch"]


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
    for logits_ty in ("*fp32", "*bf16"):
        sig = {"logits_ptr": logits_ty, "rows_ptr": "*i64", "temperature_ptr": "*fp32",
               "seeds_ptr": "*i64", "counters_ptr": "*i64", "out_ptr": "*i64", "V": "i32",
               "stride_l": "i32", "BLOCK_V": "constexpr"}
        src = ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_V": 4096}, attrs={})
        k = triton.compile(src, target=GPUTarget("cuda", int(target[3:]), 32))
        assert k.asm["cubin"]
