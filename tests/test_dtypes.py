"""--dtype converts weights and compute; the default is the checkpoint's dtype.

Half precision is compared with transformers running the same checkpoint in the same
dtype on the CPU, at every position of PROMPT. The tolerance comes from the real error:
transformers' own half-precision error (its half logits against its float32 logits) is
the unit. Measured with this test's statistic over all ten model cases of conftest.CASES
(mixtral in f16 only, see below), the mean |braze - transformers| in the same dtype is
0.53 to 0.70 of that unit (f16 and bf16; -O0, -O2 and the interpreted f16 kernels alike),
and 0.94 to 1.49 with RMSNorm's float32 upcast removed (the bug this test exists for),
so the bound is 0.8 of it. Greedy argmax must agree wherever
transformers' top two logits are further apart than twice its largest half-precision
error (no rounding of either side can swap them there).
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import braze
from braze.runtime import Executor, open_artifact
from braze.ir.contract import SeqChunk

from conftest import PROMPT, run_step

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MEAN_ERROR_RATIO = 0.8          # measured 0.53-0.70 correct, 0.94-1.49 without the upcast
# Mixtral is left out in bf16: there transformers' router flips an expert choice at one
# position (its bf16 logits move by 1.5 from its float32 ones; braze's by 0.05), and the
# later positions inherit that through attention: a near-tie, not an error of either side.
# Gemma 3 is refused in float16 (models/registry.FLOAT16_UNSTABLE; its interpreted kernels
# are checked in float32 by test_interpret_vs_hf.py and in bf16 on the GPU)
SKIP = {("mixtral", "bfloat16"), ("gemma3-sandwich-softcap", "float16")}
RUNS = [(c, d, opt, "reference")
        for c in ("llama", "qwen3-headdim24-tied", "qwen3_moe-dense-middle", "mixtral",
                  "phi3-longrope-partial-tied", "gemma3-sandwich-softcap", "gemma4-ple-kvshare-moe")
        for d in HALF if (c, d) not in SKIP for opt in (0, 2)]
# the kernels too (interpreted, so f16 only: the interpreter computes bf16 wrongly); 20
# interpreted steps each, so the two largest families (20-38 s apiece) run with `slow`
# and on the GPU in bf16 (tests/test_gpu.py), Llama and Phi-3 in every run
RUNS += [(c, "float16", 2, "interpret") for c in ("llama", "phi3-longrope-partial-tied")]
RUNS += [pytest.param(c, "float16", 2, "interpret", marks=pytest.mark.slow)
         for c in ("qwen3_moe-dense-middle", "gemma4-ple-kvshare-moe")]


def transformers_logits(store, case, dtype):
    from transformers import AutoModelForCausalLM
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        m = AutoModelForCausalLM.from_pretrained(store.checkpoint(case), dtype=dtype).eval()
        return m(torch.tensor([PROMPT])).logits[0].float()


def teacher_forced(ex) -> torch.Tensor:
    """Logits at every position of PROMPT, one decode step per token (a -O2 graph
    computes logits only for the sampled rows)."""
    blocks = list(range(-(-len(PROMPT) // ex.block_size)))
    return torch.stack([run_step(ex, [SeqChunk([t], i, blocks)])[0]
                        for i, t in enumerate(PROMPT)]).float()


@pytest.fixture(scope="module")
def compiled(store, tmp_path_factory):
    cache = {}

    def get(case, dtype, opt):
        if (case, dtype, opt) not in cache:
            out = tmp_path_factory.mktemp(f"{case}-{dtype}-O{opt}") / "a.braze"
            cache[case, dtype, opt] = braze.compile(store.checkpoint(case), out, dtype=dtype,
                                                    opt_level=opt, targets="")
        return cache[case, dtype, opt]
    return get


@pytest.mark.parametrize("case,dtype,opt,backend", RUNS)
def test_half_precision_matches_transformers_in_the_same_dtype(store, compiled, case, dtype,
                                                               opt, backend):
    ex = Executor(open_artifact(compiled(case, dtype, opt).root), backend=backend, num_blocks=2)
    got = teacher_forced(ex)
    theirs = transformers_logits(store, case, HALF[dtype])
    own = (theirs - transformers_logits(store, case, torch.float32)).abs()
    ours = (got - theirs).abs()
    assert ours.mean() <= MEAN_ERROR_RATIO * own.mean(), (ours.mean(), own.mean())
    top2 = theirs.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * own.max()
    assert clear.sum() >= len(PROMPT) // 4, "too few positions away from near-ties to judge"
    assert torch.equal(got.argmax(-1)[clear], theirs.argmax(-1)[clear])


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_artifact_holds_that_dtype(store, compiled, dtype):
    art = compiled("qwen3_moe-dense-middle", dtype, 2)
    assert art.model["dtype"] == {"float16": "f16", "bfloat16": "bf16"}[dtype]
    ex = Executor(open_artifact(art.root), num_blocks=2)
    assert run_step(ex, [SeqChunk(PROMPT[:3], 0, [0])]).dtype == HALF[dtype]
    assert all(p.dtype == HALF[dtype] for p in ex.params.values())
    # -O2 tabulates RoPE: the angles are taken in float32 at compile time (inv_freq ships no
    # more), and cos/sin are cast to the model's dtype as transformers casts them
    rope = [n for n in ex.params if n.startswith("positions.table")]
    assert rope and not any("inv_freq" in n for n in ex.params)
    assert all(t.dtype == HALF[dtype] for t in ex.cache.tensors.values())


def test_default_dtype_is_the_checkpoints(store):
    art = open_artifact(store.artifact("llama"))
    assert art.model["dtype"] == "f32" and art.options["dtype"] == "f32"
