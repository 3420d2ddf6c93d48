"""Model families by the `architectures` entry of config.json, and their checkpoint names.

Each IR parameter is filled from the checkpoint by a `WeightSource`:
  - the same name (most weights),
  - another name (Mixtral's `block_sparse_moe` is our `mlp`),
  - a stack of per-expert tensors (`experts.{e}.gate_proj.weight` -> `experts.gate_proj`),
  - a slice of a fused tensor (transformers 5's `experts.gate_up_proj` layout).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from braze.ir.errors import BrazeError

from .decoder import CausalLM
from .deepseek_v3 import DeepseekV3ForCausalLM
from .gemma3 import Gemma3ForCausalLM
from .gemma4 import Gemma4ForCausalLM
from .layers import RotaryEmbedding
from .rope import longrope_frequencies, rope_frequencies
from .spec import ModelSpec, spec_from_config

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3",
    "DeepseekV3ForCausalLM": "deepseek_v3",

    "Gemma4ForCausalLM": "gemma4",
}


@dataclass(frozen=True)
class TextOf:
    """A multimodal architecture whose language model braze compiles alone (text-only)."""
    text_architecture: str       # the CausalLM class its language model is
    final_softcap: bool          # does the multimodal model soft-cap its logits?


# frontend/multimodal.py maps their configs and weight names. transformers'
# Gemma3ForConditionalGeneration applies no final logit soft-cap (its Gemma3ForCausalLM does)
MULTIMODAL = {
    "Gemma3ForConditionalGeneration": TextOf("Gemma3ForCausalLM", final_softcap=False),
    "Gemma4ForConditionalGeneration": TextOf("Gemma4ForCausalLM", final_softcap=True),
}


# families whose real checkpoints overflow float16 (vLLM refuses float16 for them too):
# an asked-for --dtype float16 is refused, a config.json float16 compiles in bfloat16
FLOAT16_UNSTABLE = {
    "gemma3": "its activations outgrow float16's range (garbage or <pad> output)",
}


# used only when config.json names no architectures (e.g. a config built in code)
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "mixtral",
               "qwen3_moe": "qwen3_moe", "phi3": "phi3",
               "gemma3_text": "gemma3", "gemma4_text": "gemma4", "deepseek_v3": "deepseek_v3"}


def family_of(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and getattr(config, "model_type", None) in MODEL_TYPES:
        return MODEL_TYPES[config.model_type]
    named = ", ".join(archs) or f"(none; model_type {getattr(config, 'model_type', '?')!r})"
    raise BrazeError(f"unsupported architecture {named}; braze supports: "
                     f"{', '.join(supported_architectures())}")


def supported_architectures() -> list[str]:
    """What config.json's `architectures` may name (the multimodal ones compile text-only)."""
    return [*ARCHITECTURES, *MULTIMODAL]


def build_spec(config) -> ModelSpec:
    spec = spec_from_config(config, family_of(config))
    if spec.architecture == "?":
        spec.architecture = type(config).__name__.replace("Config", "ForCausalLM")
    return spec


def build_model(spec: ModelSpec, dtype: torch.dtype) -> nn.Module:
    """The traceable module, with weights on the meta device (the frontend never needs them).

    Only the RoPE frequencies are real: they are computed here, not read from the checkpoint.
    """
    if spec.family == "gemma4":
        rotary, local = gemma4_rotaries(spec, dtype)
        with torch.device("meta"), _no_init():
            return Gemma4ForCausalLM(spec, dtype, rotary, local)
    rotary = rotary_embedding(spec.rope, spec, dtype)
    if spec.family == "gemma3":
        local = rotary_embedding(spec.rope_local or spec.rope, spec, dtype)
        with torch.device("meta"), _no_init():
            return Gemma3ForCausalLM(spec, dtype, rotary, local)
    with torch.device("meta"), _no_init():
        if spec.family == "deepseek_v3":
            return DeepseekV3ForCausalLM(spec, dtype, rotary)
        return CausalLM(spec, dtype, rotary)


def gemma4_rotaries(spec: ModelSpec, dtype: torch.dtype):
    """Gemma 4's (global, local) RoPE: per layer type, each with its own head_dim."""
    dims = {bool(w): d for w, d in zip(spec.sliding_windows, spec.gemma4.head_dims)}
    rotary = rotary_embedding(spec.rope, spec, dtype, dims.get(False, spec.head_dim))
    local = rotary_embedding(spec.rope_local or spec.rope, spec, dtype,
                             dims.get(True, spec.head_dim))
    return rotary, local


def rotary_embedding(rope: dict, spec: ModelSpec, dtype: torch.dtype,
                     head_dim: int = 0) -> RotaryEmbedding:
    """cos/sin for `rope` (a rope_parameters dict), its frequencies real tensors."""
    kind = rope.get("rope_type") or rope.get("type")
    head_dim = head_dim or spec.head_dim
    if kind == "longrope":
        short, long, scaling, original = longrope_frequencies(rope, head_dim,
                                                              spec.max_position_embeddings)
        # one factor set for every position, so that a query and the cached keys it reads
        # always rotate alike (a per-position switch broke attention across `original`)
        return RotaryEmbedding(long if longrope_uses_long(spec, original) else short,
                               scaling, dtype)
    inv_freq, scaling = rope_frequencies(rope, head_dim, spec.max_position_embeddings)
    return RotaryEmbedding(inv_freq, scaling, dtype)


@contextlib.contextmanager
def _no_init():
    """Skip the random initialisation of meta weights: it computes nothing, yet its dynamo
    guard costs about a second on first use."""
    saved = [(cls, cls.reset_parameters) for cls in (nn.Linear, nn.Embedding)]
    try:
        for cls, _ in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved:
            cls.reset_parameters = fn


@dataclass
class WeightSource:
    names: list[str]                  # checkpoint tensors read
    kind: str = "copy"                # copy | stack | slice
    dim: int = 0                      # slice: dimension and range
    start: int = 0
    stop: int = 0
    total: int = 0                    # slice: the fused tensor's size along dim


_ATTN_PROJ = re.compile(r"^(model\.layers\.\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$")
_MLP_PROJ = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate|up)_proj\.weight$")
# the experts sit in the MLP (`.mlp.experts`), or beside it in the layer (Gemma 4)
_EXPERT = re.compile(r"^(model\.layers\.\d+(?:\.mlp)?)\.experts\.(gate_proj|up_proj|down_proj)$")
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def weight_sources(spec: ModelSpec, param: str, shape: tuple, available: set[str]) -> WeightSource:
    """Where the checkpoint keeps IR parameter `param` (its expected shape is `shape`)."""
    if param not in available:
        fused = _fused_projection(spec, param, shape, available)
        if fused is not None:
            return fused
    m = _EXPERT.match(param)
    if m:
        prefix, proj = m.groups()
        n = spec.moe.num_experts if spec.moe else spec.gemma4.num_experts
        fused = f"{prefix}.experts.gate_up_proj"
        if proj != "down_proj" and fused in available:
            inter = shape[1]
            lo = 0 if proj == "gate_proj" else inter
            return WeightSource([fused], "slice", dim=1, start=lo, stop=lo + inter,
                                total=2 * inter)
        if f"{prefix}.experts.{proj}" in available:
            return WeightSource([f"{prefix}.experts.{proj}"])
        if spec.family == "mixtral":
            layer = prefix.removesuffix(".mlp")
            names = [f"{layer}.block_sparse_moe.experts.{e}.{_MIXTRAL_NAMES[proj]}.weight"
                     for e in range(n)]
        else:
            names = [f"{prefix}.experts.{e}.{proj}.weight" for e in range(n)]
        return WeightSource(names, "stack")
    if spec.family == "mixtral" and ".mlp.gate." in param and param not in available:
        return WeightSource([param.replace(".mlp.gate.", ".block_sparse_moe.gate.")])
    return WeightSource([param])


def _fused_projection(spec: ModelSpec, param: str, shape: tuple, available: set[str]):
    """Phi-3's fused checkpoint tensors: `qkv_proj` rows are q, k, v; `gate_up_proj`
    rows gate then up. Our model keeps the projections apart (merge-projections fuses
    them again, so an -O2 artifact still ships one GEMM)."""
    m = _ATTN_PROJ.match(param)
    if m:
        prefix, which, kind = m.groups()
        fused = f"{prefix}.self_attn.qkv_proj.{kind}"
        if fused not in available:
            return None
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        start = {"q": 0, "k": q, "v": q + kv}[which]
        return WeightSource([fused], "slice", dim=0, start=start, stop=start + shape[0],
                            total=q + 2 * kv)
    m = _MLP_PROJ.match(param)
    if m:
        prefix, which = m.groups()
        fused = f"{prefix}.mlp.gate_up_proj.weight"
        if fused not in available:
            return None
        start = 0 if which == "gate" else shape[0]
        return WeightSource([fused], "slice", dim=0, start=start, stop=start + shape[0],
                            total=2 * shape[0])
    return None


def longrope_uses_long(spec: ModelSpec, original: int) -> bool:
    """Does a longrope model rotate with its long factors? Yes when the artifact serves
    sequences longer than original_max_position_embeddings, as vLLM decides by its
    max_model_len: transformers picks per forward call by the sequence's length, which for
    a KV cache would leave keys rotated one way and later queries another."""
    return (spec.max_model_len or spec.max_position_embeddings) > original
