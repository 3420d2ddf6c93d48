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
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.out_dtype = dtype

    def forward(self, x):
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(self.out_dtype)


def rotate_half(x, half: int):
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin, half: int):
    """NeoX-style rotation of x [T, heads, head_dim] by cos/sin [T, 1, head_dim]."""
    return (x * cos) + (rotate_half(x, half) * sin)


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
