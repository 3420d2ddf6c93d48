"""LoRA adapters for the tests, made by peft on the tiny checkpoints, and peft's own outputs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(checkpoint, out, seed: int, r: int = 4, alpha: float = 8, targets=ALL,
                 rslora: bool = False, scale: float = 1.0) -> Path:
    """A PEFT adapter with random non-zero A and B (init_lora_weights=False), saved as
    adapter_config.json + adapter_model.safetensors; `scale` multiplies B so the adapter
    moves the greedy tokens of a random tiny model. `targets`: module names, or one string
    (a regex peft matches against the full module name)."""
    from peft import LoraConfig, get_peft_model

    from conftest import hf_model
    torch.manual_seed(seed)
    model = get_peft_model(hf_model(checkpoint), LoraConfig(
        r=r, lora_alpha=alpha, init_lora_weights=False, use_rslora=rslora,
        target_modules=targets if isinstance(targets, str) else list(targets)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(out)
    return Path(out)


def peft_model(checkpoint, adapter):
    """transformers' model of `checkpoint` with peft's `adapter` on it (None: without)."""
    from conftest import hf_model
    model = hf_model(checkpoint)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model


def peft_greedy(checkpoint, adapter, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers + peft's greedy continuation (adapter None: the base model)."""
    model = peft_model(checkpoint, adapter)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def write_adapter(out, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A hand-made adapter directory (for adapters peft would not make)."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(config)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out
