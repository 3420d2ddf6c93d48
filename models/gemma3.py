"""Gemma 3 text decoder (`Gemma3ForCausalLM`), written like decoder.py.

What differs from Llama, each as plain torch the passes see:
  - RMSNorm scales by (1 + w) in float32 before casting back (GemmaRMSNorm), also as
    the per-head q/k norm;
  - sandwich norms: the attention and MLP outputs are normed again before their
    residual add (post_attention_layernorm, post_feedforward_layernorm), and the MLP
    input has its own pre_feedforward_layernorm;
  - GeLU-tanh MLP; embeddings times sqrt(hidden), the factor rounded to the model dtype
    as transformers does;
  - attention scale query_pre_attn_scalar**-0.5; sliding-window layers (layer_types)
    rotate with their own RoPE (rope_parameters["sliding_attention"]);
  - optional tanh soft-caps of attention scores and of the final logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, GemmaRMSNorm, RotaryEmbedding, apply_rope, soft_cap
from .primitives import PagedAttention
from .spec import ModelSpec


class Gemma3Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        bias = spec.attention_bias
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=bias)
        self.q_norm = GemmaRMSNorm(d, spec.rms_norm_eps, dtype)
        self.k_norm = GemmaRMSNorm(d, spec.rms_norm_eps, dtype)
        self.local = bool(spec.sliding_windows[layer])
        self.attn = PagedAttention(layer, spec.num_heads, spec.num_kv_heads, d,
                                   scale=spec.attn_scale, sliding_window=spec.sliding_windows[layer],
                                   softcap=spec.attn_softcap)

    def forward(self, x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables):
        q = self.q_norm(self.q_proj(x).view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin, self.head_dim // 2)
        k = apply_rope(k, cos, sin, self.head_dim // 2)
        o = self.attn(q, k, v, slot_mapping, query_start_loc, seq_lens, block_tables)
        return self.o_proj(o.reshape(-1, self.num_heads * self.head_dim))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_norm_eps
        self.self_attn = Gemma3Attention(spec, layer, dtype)
        self.mlp = MLP(h, spec.intermediate_size, spec.hidden_act, spec.mlp_bias)
        self.input_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype)

    def forward(self, x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables):
        a = self.self_attn(self.input_layernorm(x), cos, sin, slot_mapping, query_start_loc,
                           seq_lens, block_tables)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(spec, i, dtype)
                                    for i in range(spec.num_layers))
        self.norm = GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, rotary_emb: RotaryEmbedding,
                 rotary_emb_local: RotaryEmbedding):
        super().__init__()
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.final_softcap = spec.final_softcap
        # transformers multiplies by a 0-d tensor of sqrt(hidden) cast to the weight dtype
        self.embed_scale = torch.tensor(spec.hidden_size ** 0.5, dtype=dtype, device="cpu").item()
        self.model = Gemma3Model(spec, dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.to(dtype)
        # after .to(dtype): the frequencies stay float32, as HF keeps them
        self.model.rotary_emb = rotary_emb
        self.model.rotary_emb_local = rotary_emb_local

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices):
        x = self.model.embed_tokens(input_ids) * self.embed_scale
        rope = self.model.rotary_emb(positions)
        rope_local = self.model.rotary_emb_local(positions)
        for layer in self.model.layers:
            cos, sin = rope_local if layer.self_attn.local else rope
            x = layer(x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables)
        x = self.model.norm(x)
        if self.tie_word_embeddings:
            logits = F.linear(x, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(x)
        if self.final_softcap:
            logits = soft_cap(logits, self.final_softcap)
        return logits
