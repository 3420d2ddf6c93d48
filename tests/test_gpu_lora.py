"""LoRA on a GPU (pytest -m gpu): the shrink/expand kernels inside captured CUDA graphs give
the tokens the reference interpreter gives on the CPU, for a batch mixing the base model
and two adapters, float32 (so the two backends agree exactly on greedy tokens)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45]


def _adapter(d, seed, r, modules):
    """A random PEFT-format adapter, written by hand (the GPU image need not have peft)."""
    from lora_helpers import write_adapter
    g = torch.Generator().manual_seed(seed)
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    t = {}
    for layer in range(2):
        for m in modules:
            out, inp = shapes[m]
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{m}"
            t[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.3
            t[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.3
    return write_adapter(d, t, r=r, lora_alpha=2 * r, target_modules=list(modules))


@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_cuda_lora_batch_matches_reference(store, tmp_path, mode):
    from braze.runtime.llm import LLM
    from braze.runtime.lora import LoRARequest
    from braze.runtime.sampler import SamplingParams
    art = store.artifact("llama", opt_level=2, lora_slots=2, max_lora_rank=8,
                         targets="sm_80,sm_90")
    a = _adapter(tmp_path / "a", 1, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"])
    b = _adapter(tmp_path / "b", 2, 8, ["q_proj", "v_proj"])
    loras = [None, LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b)), None]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    outs = {}
    for backend in ("reference", "cuda"):
        llm = LLM(art, backend=backend, num_kv_blocks=32, max_num_seqs=4,
                  cudagraph_mode=mode if backend == "cuda" else None)
        outs[backend] = [o.token_ids for o in llm.generate([PROMPT] * 4, sp, lora_request=loras)]
    assert outs["cuda"] == outs["reference"]
    assert outs["cuda"][1] != outs["cuda"][0] and outs["cuda"][2] != outs["cuda"][0]
