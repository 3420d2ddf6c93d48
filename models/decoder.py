"""The decoder-only transformer shared by Llama, Mistral, Qwen3, Mixtral, Qwen3-MoE and Phi-3.

Module names mirror Hugging Face's (`model.layers.0.self_attn.q_proj`, ...), so
IR parameter names are checkpoint names wherever the layouts agree; the family
table in registry.py maps the rest (stacked experts, Mixtral's names).

forward() takes the batch contract (docs/batch-contract.md) and returns logits
for every token of the step.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import MLP, RMSNorm, lm_head, RotaryEmbedding, apply_partial_rope, apply_rope
from .moe import DenseMoE
from .primitives import PagedAttention
from .spec import ModelSpec


class Attention(nn.Module):
    """q/k/v/o projections, optional per-head q/k norms, RoPE, paged attention.

    Shared by every family; the Gemmas pass what differs: the norm style, and for Gemma 4
    a per-layer head_dim and kv head count, no v projection (v from k's: `v_proj=False`)
    or no k/v at all (`kv_from`: the layer reads that earlier layer's cache)."""

    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype, norm_style: str = "plain",
                 head_dim: int = 0, num_kv_heads: int = 0, v_proj: bool = True,
                 kv_from: int | None = None):
        super().__init__()
        h, d = spec.hidden_size, head_dim or spec.head_dim
        kv = num_kv_heads or spec.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, kv, d
        bias = spec.attention_bias
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=bias)
        if kv_from is None:
            self.k_proj = nn.Linear(h, kv * d, bias=bias)
            if v_proj:
                self.v_proj = nn.Linear(h, kv * d, bias=bias)
        # Qwen2 has q/k/v biases but none on o_proj
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=bias and spec.o_proj_bias)
        self.rotary_dim = spec.rotary_dim or d
        self.qk_norm = spec.qk_norm
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps, dtype, norm_style)
            if kv_from is None:
                self.k_norm = RMSNorm(d, spec.rms_norm_eps, dtype, norm_style)
        self.local = bool(spec.sliding_windows[layer])
        self.attn = PagedAttention(layer, spec.num_heads, kv, d,
                                   scale=spec.attn_scale or d ** -0.5,
                                   sliding_window=spec.sliding_windows[layer],
                                   softcap=spec.attn_softcap, cache_layer=kv_from)

    def forward(self, x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables):
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.rotary_dim < self.head_dim:
            q = apply_partial_rope(q, cos, sin, self.rotary_dim)
            k = apply_partial_rope(k, cos, sin, self.rotary_dim)
        else:
            q = apply_rope(q, cos, sin, self.head_dim // 2)
            k = apply_rope(k, cos, sin, self.head_dim // 2)
        o = self.attn(q, k, v, slot_mapping, query_start_loc, seq_lens, block_tables)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(spec, layer, dtype)
        if spec.moe_layers[layer]:
            m = spec.moe
            self.mlp = DenseMoE(spec.hidden_size, m.num_experts, m.top_k, m.intermediate_size,
                                m.norm_topk_prob, spec.hidden_act, dtype)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, spec.mlp_bias)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)

    def forward(self, x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, slot_mapping,
                               query_start_loc, seq_lens, block_tables)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, dtype) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.model = DecoderModel(spec, dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.to(dtype)
        # after .to(dtype): the frequencies stay float32, as HF keeps them
        self.model.rotary_emb = rotary_emb

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices):
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables)
        x = self.model.norm(x)
        return lm_head(self, x)
