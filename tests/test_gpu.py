"""GPU tests (pytest -m gpu on a CUDA machine): kernels in bfloat16, cubin reuse, end to end."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45]


@pytest.mark.parametrize("case", ["llama", "mistral-window8", "qwen3-headdim24-tied", "mixtral",
                                  "qwen3_moe-dense-middle"])
def test_cuda_bf16_close_to_transformers(store, case):
    from braze.runtime import Executor, open_artifact
    from braze.runtime.batch import SeqChunk
    from conftest import hf_model
    art = open_artifact(store.artifact(case, opt_level=2, dtype="bfloat16", targets="sm_80,sm_90"))
    ex = Executor(art, backend="cuda", num_blocks=8)
    logits = ex.step([SeqChunk(PROMPT, 0, ex.cache.allocator.allocate(1))])
    ref = hf_model(store.checkpoint(case)).to("cuda", torch.bfloat16)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT], device="cuda")).logits[0, -1:]
    torch.testing.assert_close(logits.float(), want.float(), atol=0.15, rtol=0.05)


def test_cubins_and_jit_agree(store):
    """The stored cubins and kernels JIT-compiled from the shipped source give the same logits."""
    from braze.runtime import Executor, open_artifact
    from braze.runtime.batch import SeqChunk
    art = open_artifact(store.artifact("qwen3_moe-dense-middle", opt_level=2, dtype="bfloat16",
                                       targets="sm_80,sm_90"))
    outs = []
    for use_cubins in (True, False):
        ex = Executor(art, backend="cuda", num_blocks=8)
        if not use_cubins:
            ex.plan.runner.cubins = None
        elif not ex.plan.runner.cubins.usable:
            pytest.skip("artifact built with another triton version than this machine's")
        outs.append(ex.step([SeqChunk(PROMPT, 0, ex.cache.allocator.allocate(1))]))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
