"""FP8 checkpoints with block scales (DeepSeek-V3's own format), dequantized on read.

DeepSeek-V3's released weights hold each linear weight in float8 e4m3 with one float32
`<name>.weight_scale_inv` per block of `weight_block_size` (128 x 128): the weight is
`fp8.float() * scale_inv` over each block, the blocks at the right and bottom edges
partial where a dimension is not a multiple of the block. config.json says so:

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                            "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

braze computes in `--dtype`, so `FP8Checkpoint` dequantizes each fp8 weight when the
artifact writer asks for it (one tensor at a time, its file memory-mapped like any
shard) and hides the `*_scale_inv` tensors from the rest of the frontend, which sees an
ordinary checkpoint. Only this scheme is read: anything else in quantization_config is
refused with the field at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from braze.ir.errors import BrazeError

from .progress import Progress
from .weights import Checkpoint

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz",
                                               "float8_e5m2", "float8_e5m2fnuz")
                   if hasattr(torch, n))
SUPPORTED = "quant_method 'fp8', fmt 'e4m3', activation_scheme 'dynamic', 2-D weight_block_size"


@dataclass(frozen=True)
class FP8Scheme:
    block: tuple[int, int]

    def source(self, dtype: str, quantized: int | None) -> dict:
        """The manifest's model.source: what the weights were before dequantizing."""
        br, bc = self.block
        return {"format": "fp8-e4m3", "weight_block_size": [br, bc],
                "activation_scheme": "dynamic", "quantized_tensors": quantized,
                "dequantized_to": dtype,
                "summary": f"fp8-e4m3 block {br}x{bc} dequantized to {dtype}"}


def fp8_scheme(raw: dict, config_path) -> FP8Scheme | None:
    """The block-scaled fp8 scheme config.json declares, None without quantization_config;
    a BrazeError naming the field for any other quantization."""
    q = raw.get("quantization_config")
    if q is None:
        return None
    where = f"{config_path}: quantization_config"
    if not isinstance(q, dict):
        raise BrazeError(f"{where} is {q!r}, not an object; braze reads {SUPPORTED}")

    def refuse(key, value, wanted):
        raise BrazeError(f"{where}.{key} is {value!r}; braze reads only {wanted} "
                         f"(DeepSeek-V3's block-scaled FP8: {SUPPORTED}); use a bf16 copy "
                         f"of the checkpoint otherwise")

    method = q.get("quant_method")
    if method != "fp8":
        refuse("quant_method", method, "'fp8'")
    fmt = q.get("fmt", "e4m3")                  # absent: transformers' default, e4m3
    if fmt != "e4m3":
        refuse("fmt", fmt, "'e4m3'")
    act = q.get("activation_scheme", "dynamic")
    if act != "dynamic":
        refuse("activation_scheme", act, "'dynamic' (weights-only scales)")
    block = q.get("weight_block_size", [128, 128])   # absent: transformers' default
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        refuse("weight_block_size", block, "two positive integers such as [128, 128]")
    return FP8Scheme((block[0], block[1]))


def without_quantization(raw: dict) -> dict:
    """config.json for the artifact, which holds dequantized weights."""
    return {k: v for k, v in raw.items() if k != "quantization_config"}


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int]) -> torch.Tensor:
    """float32 `q.float() * scale_inv` with each scale over its block of the last two
    dims; edge blocks may be partial. Never builds a weight-sized scale tensor: the
    scales are expanded over rows only and applied one column block at a time."""
    br, bc = block
    rows, cols = q.shape[-2:]
    w = q.to(torch.float32)
    s = scale_inv.to(torch.float32).repeat_interleave(br, dim=-2)[..., :rows, :]
    for j in range(math.ceil(cols / bc)):
        w[..., j * bc:(j + 1) * bc] *= s[..., j:j + 1]
    return w


class FP8Checkpoint(Checkpoint):
    """A checkpoint whose fp8 weights read as float32 (then converted to the compile
    dtype like any weight); the `*_scale_inv` tensors are not among its names."""

    def __init__(self, model_dir: Path, scheme: FP8Scheme, log=None):
        super().__init__(model_dir)
        self.scheme = scheme
        all_files = self.files
        self.scale_files = {n: f for n, f in all_files.items() if n.endswith(SCALE_SUFFIX)}
        self.files = {n: f for n, f in all_files.items() if not n.endswith(SCALE_SUFFIX)}
        self.scales = {n[:-len(SCALE_SUFFIX)]: n for n in self.scale_files}
        orphan = next((s for w, s in sorted(self.scales.items()) if w not in self.files), None)
        if orphan:
            raise BrazeError(f"{self.dir}: scale tensor {orphan!r} has no weight "
                             f"{orphan[:-len(SCALE_SUFFIX)]!r} beside it in the checkpoint")
        if not self.scales:
            raise BrazeError(f"{self.dir}: config.json declares fp8 quantization, but the "
                             f"checkpoint has no *{SCALE_SUFFIX} tensors")
        self.progress = Progress(log, len(self.scales), "fp8 tensors")
        if log:
            log(f"fp8 checkpoint: {len(self.scales)} weights in float8_e4m3fn with "
                f"{scheme.block[0]}x{scheme.block[1]} block scales, dequantized on read")

    def get(self, name: str) -> torch.Tensor:
        t = super().get(name)
        scale_name = self.scales.get(name)
        if scale_name is None:
            if t.dtype in FP8_DTYPES:
                raise BrazeError(f"weight {name!r} is stored in {t.dtype} but the checkpoint "
                                 f"in {self.dir} has no {name + SCALE_SUFFIX!r} to dequantize it")
            return t
        if t.dtype != torch.float8_e4m3fn:
            raise BrazeError(f"weight {name!r} has a {SCALE_SUFFIX} but is stored in "
                             f"{t.dtype}; braze dequantizes float8_e4m3fn weights")
        self.progress.start()
        scale = self._holding(scale_name, self.scale_files[scale_name]).get_tensor(scale_name)
        br, bc = self.scheme.block
        want = tuple(t.shape[:-2]) + (math.ceil(t.shape[-2] / br), math.ceil(t.shape[-1] / bc))
        if tuple(scale.shape) != want:
            raise BrazeError(f"{scale_name!r} has shape {list(scale.shape)}, but weight "
                             f"{list(t.shape)} in {br}x{bc} blocks needs {list(want)} (does "
                             f"quantization_config.weight_block_size match the checkpoint?)")
        w = dequantize_blocks(t, scale, self.scheme.block)
        self.progress.step(t.numel() + scale.numel() * scale.element_size())
        return w


__all__ = ["FP8Scheme", "FP8Checkpoint", "fp8_scheme", "dequantize_blocks",
           "without_quantization"]
