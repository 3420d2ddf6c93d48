"""--dtype converts weights and compute; the default is the checkpoint's dtype."""

from __future__ import annotations

import pytest
import torch

import braze
from braze.runtime import Executor, open_artifact
from braze.runtime.batch import SeqChunk

from conftest import take_blocks

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45]


def _logits(path):
    ex = Executor(open_artifact(path), num_blocks=8)
    return ex, ex.run(ex.step_inputs([SeqChunk(PROMPT, 0, take_blocks(ex, 1))]))


@pytest.mark.parametrize("dtype,torch_dtype,tol", [("float16", torch.float16, 3e-2),
                                                   ("bfloat16", torch.bfloat16, 1.5e-1)])
def test_half_precision_close_to_float32(store, tmp_path, dtype, torch_dtype, tol):
    case = "qwen3_moe-dense-middle"
    art = braze.compile(store.checkpoint(case), tmp_path / "h.braze", dtype=dtype)
    assert art.model["dtype"] == {"float16": "f16", "bfloat16": "bf16"}[dtype]
    ex, half = _logits(art.root)
    assert half.dtype == torch_dtype
    assert all(p.dtype == torch_dtype for n, p in ex.params.items() if "inv_freq" not in n)
    rope = [p for n, p in ex.params.items() if "inv_freq" in n]    # -O2 folds it into a derived one
    assert rope and all(p.dtype == torch.float32 for p in rope)
    assert all(t.dtype == torch_dtype for t in ex.cache.tensors.values())
    _, full = _logits(store.artifact(case, opt_level=2))
    torch.testing.assert_close(half.float(), full, atol=tol, rtol=tol)


def test_default_dtype_is_the_checkpoints(store):
    art = open_artifact(store.artifact("llama"))
    assert art.model["dtype"] == "f32" and art.options["dtype"] == "f32"
