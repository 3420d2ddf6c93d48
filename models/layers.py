"""Reference building blocks written as plain torch math, the way HF writes them.

The passes recognise these patterns (RMSNorm, rotate-half RoPE, SwiGLU) and
replace them; keep them in their textbook form. Shapes are never read from
tensors (`x.shape`): reshapes use -1 for the token dimension so tracing stays
symbolic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACT_FNS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    """RMSNorm, normalised in float32, in the forms the checkpoints use (`style`):

      "plain"   w * n.to(dtype)                    Llama, Qwen, Mixtral, Phi-3 (cast, then scale)
      "gemma"   (n * (1 + w.float())).to(dtype)    Gemma 3: stored as w - 1, scaled in f32
      "f32"     (n * w.float()).to(dtype)          Gemma 4: scaled in f32, then the one cast

    with n = x.f32 * rsqrt(mean(x.f32^2) + eps). `with_scale=False` has no weight at all
    (Gemma 4's value norm and router norm): n.to(dtype)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, style: str = "plain",
                 with_scale: bool = True):
        super().__init__()
        if style not in ("plain", "gemma", "f32"):
            raise ValueError(f"RMSNorm style {style!r}")
        if with_scale:
            self.weight = nn.Parameter(torch.zeros(size) if style == "gemma" else torch.ones(size))
        self.with_scale = with_scale
        self.style = style
        self.eps = eps
        self.out_dtype = dtype

    def forward(self, x):
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        if not self.with_scale:
            return h.to(self.out_dtype)
        if self.style == "plain":
            return self.weight * h.to(self.out_dtype)
        if self.style == "gemma":
            return (h * (1.0 + self.weight.float())).to(self.out_dtype)
        return (h * self.weight.float()).to(self.out_dtype)


def lm_head(model, x):
    """The LM head of a causal-LM module: the input embedding's weight when the model ties
    them (`model.tie_word_embeddings`), else `model.lm_head`."""
    if model.tie_word_embeddings:
        return F.linear(x, model.model.embed_tokens.weight)
    return model.lm_head(x)


def soft_cap(x, cap: float):
    """cap * tanh(x / cap): Gemma's logit soft-capping."""
    return torch.tanh(x / cap) * cap


def rotate_half(x, half: int):
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin, half: int):
    """NeoX-style rotation of x [T, heads, head_dim] by cos/sin [T, 1, head_dim]."""
    return (x * cos) + (rotate_half(x, half) * sin)


def apply_partial_rope(x, cos, sin, rotary_dim: int):
    """RoPE on the first rotary_dim of each head, the rest passed through (Phi-3, Phi-4)."""
    rotated = apply_rope(x[..., :rotary_dim], cos, sin, rotary_dim // 2)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin per position from inv_freq (computed at compile time, stored as a parameter)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype):
        super().__init__()
        # a (frozen) Parameter, not a buffer: fx proxies parameters, so the graph refers
        # to @model.rotary_emb.inv_freq by name instead of baking in a constant
        self.inv_freq = nn.Parameter(inv_freq, requires_grad=False)
        self.attention_scaling = attention_scaling
        self.out_dtype = dtype

    def forward(self, positions):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()
        sin = emb.sin()
        if self.attention_scaling != 1.0:
            cos = cos * self.attention_scaling
            sin = sin * self.attention_scaling
        return cos.to(self.out_dtype)[:, None, :], sin.to(self.out_dtype)[:, None, :]


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = ACT_FNS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
