"""Tiny FP8 checkpoints, stored as DeepSeek-V3's real ones are: each linear weight in
float8_e4m3fn with one float32 `weight_scale_inv` per block of `block` (rows, columns),
the multiplier that gives the weight back (weight ~= fp8 * scale_inv), and config.json's
`quantization_config` {quant_method fp8, fmt e4m3, activation_scheme dynamic,
weight_block_size}. Embeddings, the LM head, norms and the MoE router stay as they were,
as in DeepSeek's checkpoints. Used by tests/test_fp8.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

E4M3_MAX = 448.0          # the largest finite float8_e4m3fn


def is_quantized_linear(name: str, t: torch.Tensor) -> bool:
    """The weights DeepSeek-V3's checkpoints hold in fp8: the 2-D `*_proj` linears
    (attention, MLP, experts, MTP's eh_proj); not embeddings, LM head, norms or router."""
    return t.dim() == 2 and name.endswith("_proj.weight")


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (fp8 weight, float32 scale_inv of shape ceil(rows/br) x ceil(cols/bc)); edge
    blocks may be partial. Each block's scale maps its largest magnitude to E4M3_MAX."""
    br, bc = block
    rows, cols = w.shape
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).reshape(nr * br, nc * bc)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()


def _read_all(src: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def fp8_checkpoint(src, dst, block=(16, 16), shards: int = 1, quantization_config=None) -> Path:
    """A copy of the tiny float checkpoint `src` (braze.tiny.make_checkpoint) at `dst`
    with its linear weights in fp8 with `block` scales, in `shards` files (with
    model.safetensors.index.json when more than one; each scale beside its weight, as
    DeepSeek's are). `quantization_config` replaces the config's (tests of refusals)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != \
                "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config or {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = {}
    for name, t in _read_all(src).items():
        if is_quantized_linear(name, t):
            q, s = quantize_fp8(t, block)
            tensors[name] = q
            tensors[name + "_scale_inv"] = s
        else:
            tensors[name] = t.contiguous()
    names = list(tensors)
    if shards == 1:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    # split by weights (a scale goes with its weight), in order
    groups = [n for n in names if not n.endswith("_scale_inv")]
    per = math.ceil(len(groups) / shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for n in groups[i * per:(i + 1) * per]:
            part[n] = tensors[n]
            if n + "_scale_inv" in tensors:
                part[n + "_scale_inv"] = tensors[n + "_scale_inv"]
        save_file(part, dst / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return dst


__all__ = ["fp8_checkpoint", "quantize_fp8", "is_quantized_linear", "E4M3_MAX"]
