"""Gemma 3 text decoder (`Gemma3ForCausalLM`), written like decoder.py.

What differs from Llama, each as plain torch the passes see:
  - RMSNorm scales by (1 + w) in float32 before casting back (RMSNorm style "gemma"),
    also as the per-head q/k norm (decoder.py's Attention with that norm style);
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
from torch import nn

from .decoder import Attention
from .layers import MLP, RMSNorm, RotaryEmbedding, lm_head, soft_cap
from .spec import ModelSpec


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        h, eps = spec.hidden_size, spec.rms_norm_eps
        self.self_attn = Attention(spec, layer, dtype, norm_style="gemma")
        self.mlp = MLP(h, spec.intermediate_size, spec.hidden_act, spec.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps, dtype, "gemma")
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, "gemma")
        self.pre_feedforward_layernorm = RMSNorm(h, eps, dtype, "gemma")
        self.post_feedforward_layernorm = RMSNorm(h, eps, dtype, "gemma")

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
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, "gemma")


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
        logits = lm_head(self, x)
        if self.final_softcap:
            logits = soft_cap(logits, self.final_softcap)
        return logits
