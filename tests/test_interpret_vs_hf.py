"""-O2 artifacts run through their Triton kernels (interpreted on the CPU) against transformers:
float32 logits within 1e-4 and greedy tokens identical."""

from __future__ import annotations

import pytest
import torch

from braze.runtime import Executor, open_artifact
from braze.ir.contract import SeqChunk

from conftest import (CASES, assert_greedy_matches_transformers, assert_steps_match_transformers,
                      executor, run_step, take_blocks)

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45]


@pytest.mark.parametrize("case", list(CASES))
def test_interpret_greedy_matches_transformers(store, case):
    ex = executor(store, case, opt_level=2, backend="interpret", num_blocks=8)
    assert_greedy_matches_transformers(store, case, ex, PROMPT, 6)


@pytest.mark.parametrize("case", list(CASES))
def test_interpret_logits_match_transformers(store, case):
    assert_steps_match_transformers(store, case, executor(store, case, opt_level=2,
                                                          backend="interpret", num_blocks=8))


@pytest.mark.parametrize("case", ["llama", "qwen3_moe-dense-middle", "phi3-longrope-partial-tied",
                                  "gemma3-sandwich-softcap", "gemma4-ple-kvshare-moe"])
def test_interpret_mixed_step_matches_reference(store, case):
    """A mixed prefill/decode step through the kernels equals the reference interpreter's."""
    art = open_artifact(store.artifact(case, opt_level=2))
    outs = []
    for backend in ("reference", "interpret"):
        ex = Executor(art, backend=backend, num_blocks=8)
        a, b = take_blocks(ex, 1), take_blocks(ex, 1)
        run_step(ex, [SeqChunk(PROMPT[:5], 0, b)])
        outs.append(run_step(ex, [SeqChunk(PROMPT, 0, a), SeqChunk(PROMPT[5:6], 5, b)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
