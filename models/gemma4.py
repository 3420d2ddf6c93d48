"""Gemma 4 text decoder (`Gemma4ForCausalLM`), written like gemma3.py.

What differs from Gemma 3, each as plain torch the passes see:
  - RMSNorm scales by w (not 1 + w), in float32 before the cast back (style "f32"); the
    values get a weightless norm; no 1/sqrt(d) attention scale (the q/k norms do it);
  - global (full-attention) layers have their own head_dim and, with attention_k_eq_v,
    their own kv head count, with v taken from k's projection (before k's norm);
  - proportional RoPE on global layers: the whole head rotates with zero frequencies
    past the first partial_rotary_factor of the pairs (rope.py); sliding layers rotate
    with their own RoPE;
  - per-layer inputs (PLE, hidden_size_per_layer_input P): a second embedding table
    [V', L * P] plus a projection of the token embedding, normed and averaged, gives
    each layer a [T, P] input that gates a small bottleneck added to the residual;
  - the MoE block beside the dense MLP (enable_moe_block): its router reads the
    normed, scaled residual, its experts a separately normed one, and each expert's
    routing weight is multiplied by a learned per-expert scale; both outputs are normed
    and summed before the post-feedforward norm;
  - each layer's output times its `layer_scalar`;
  - KV sharing: the last num_kv_shared_layers layers have no k/v projections and attend
    over an earlier layer's cache (PagedAttention's cache_layer), writing none;
  - double-width MLPs on the shared layers (use_double_wide_mlp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import Attention
from .layers import ACT_FNS, MLP, RMSNorm, RotaryEmbedding, apply_rope, lm_head, soft_cap
from .moe import Experts
from .spec import ModelSpec


class Gemma4Attention(Attention):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        g = spec.gemma4
        super().__init__(spec, layer, dtype, norm_style="f32", head_dim=g.head_dims[layer],
                         num_kv_heads=g.kv_heads[layer], v_proj=not g.k_eq_v[layer],
                         kv_from=g.kv_from[layer])
        self.shared = g.kv_from[layer] is not None
        self.k_eq_v = g.k_eq_v[layer]
        if not self.shared:
            self.v_norm = RMSNorm(self.head_dim, spec.rms_norm_eps, dtype, "f32", with_scale=False)

    def forward(self, x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables):
        d = self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(-1, self.num_heads, d)), cos, sin, d // 2)
        k = v = None
        if not self.shared:
            k = self.k_proj(x).view(-1, self.num_kv_heads, d)
            v = k if self.k_eq_v else self.v_proj(x).view(-1, self.num_kv_heads, d)
            k = apply_rope(self.k_norm(k), cos, sin, d // 2)
            v = self.v_norm(v)
        o = self.attn(q, k, v, slot_mapping, query_start_loc, seq_lens, block_tables)
        return self.o_proj(o.reshape(-1, self.num_heads * d))


class Gemma4Router(nn.Module):
    """Routing weights [T, E]: softmax (f32) of proj(norm(x) * scale / sqrt(H)), top-k,
    renormalised, times the chosen experts' per_expert_scale, zero elsewhere."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        h, g = spec.hidden_size, spec.gemma4
        self.norm = RMSNorm(h, spec.rms_norm_eps, dtype, "f32", with_scale=False)
        self.proj = nn.Linear(h, g.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(h))
        self.per_expert_scale = nn.Parameter(torch.ones(g.num_experts))
        self.root_size = h ** -0.5
        self.top_k = g.top_k
        self.out_dtype = dtype

    def forward(self, x):
        logits = self.proj(self.norm(x) * self.scale * self.root_size)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        # scale after the scatter: w * s[e] at each chosen e, the same products transformers
        # forms with per_expert_scale[top_k_index] (and 0 * s elsewhere)
        routing = torch.zeros_like(probs).scatter(1, chosen, weights) * self.per_expert_scale
        return routing.to(self.out_dtype)


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        h, eps, g = spec.hidden_size, spec.rms_norm_eps, spec.gemma4
        self.self_attn = Gemma4Attention(spec, layer, dtype)
        self.mlp = MLP(h, g.intermediate[layer], spec.hidden_act, spec.mlp_bias)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(h, eps, dtype, "f32"))
        self.act = ACT_FNS[spec.hidden_act]
        self.moe = bool(g.num_experts)
        if self.moe:
            self.router = Gemma4Router(spec, dtype)
            self.experts = Experts(g.num_experts, h, g.moe_intermediate)
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                         "pre_feedforward_layernorm_2"):
                setattr(self, name, RMSNorm(h, eps, dtype, "f32"))
        self.ple = bool(g.ple_dim)
        if self.ple:
            self.per_layer_input_gate = nn.Linear(h, g.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(g.ple_dim, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps, dtype, "f32")
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, x, per_layer_input, cos, sin, slot_mapping, query_start_loc, seq_lens,
                block_tables):
        a = self.self_attn(self.input_layernorm(x), cos, sin, slot_mapping, query_start_loc,
                           seq_lens, block_tables)
        h = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            e = self.experts.dense(self.pre_feedforward_layernorm_2(h), self.router(h), self.act)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(e)
        h = h + self.post_feedforward_layernorm(m)
        if self.ple:
            p = self.act(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(p))
        return h * self.layer_scalar


class Gemma4Model(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        h, g, n = spec.hidden_size, spec.gemma4, spec.num_layers
        self.embed_tokens = nn.Embedding(spec.vocab_size, h)
        self.layers = nn.ModuleList(Gemma4DecoderLayer(spec, i, dtype) for i in range(n))
        self.norm = RMSNorm(h, spec.rms_norm_eps, dtype, "f32")
        if g.ple_dim:
            self.embed_tokens_per_layer = nn.Embedding(g.ple_vocab, n * g.ple_dim)
            self.per_layer_model_projection = nn.Linear(h, n * g.ple_dim, bias=False)
            self.per_layer_projection_norm = RMSNorm(g.ple_dim, spec.rms_norm_eps, dtype, "f32")


def _scale(value: float, dtype: torch.dtype) -> float:
    """transformers multiplies by a 0-d float32 tensor cast to the weight dtype."""
    return torch.tensor(value, dtype=torch.float32, device="cpu").to(dtype).item()


class Gemma4ForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, rotary_emb: RotaryEmbedding,
                 rotary_emb_local: RotaryEmbedding):
        super().__init__()
        g = spec.gemma4
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.final_softcap = spec.final_softcap
        self.embed_scale = _scale(spec.hidden_size ** 0.5, dtype)
        self.num_layers, self.ple_dim = spec.num_layers, g.ple_dim
        self.hidden_output = g.hidden_output
        if g.ple_dim:
            self.ple_embed_scale = _scale(g.ple_dim ** 0.5, dtype)
            self.ple_projection_scale = spec.hidden_size ** -0.5
        self.model = Gemma4Model(spec, dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.to(dtype)
        # after .to(dtype): the frequencies stay float32, as HF keeps them
        self.model.rotary_emb = rotary_emb
        self.model.rotary_emb_local = rotary_emb_local

    def per_layer_inputs(self, input_ids, x):
        """[T, layers, P]: (norm(proj(x) / sqrt(H)) + embed_per_layer(ids)) / sqrt(2)."""
        n, p = self.num_layers, self.ple_dim
        tok = (self.model.embed_tokens_per_layer(input_ids) * self.ple_embed_scale).view(-1, n, p)
        proj = self.model.per_layer_model_projection(x) * self.ple_projection_scale
        proj = self.model.per_layer_projection_norm(proj.view(-1, n, p))
        return (proj + tok) * 2.0 ** -0.5

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices):
        x = self.model.embed_tokens(input_ids) * self.embed_scale
        ple = self.per_layer_inputs(input_ids, x) if self.ple_dim else None
        rope = self.model.rotary_emb(positions)
        rope_local = self.model.rotary_emb_local(positions)
        for i, layer in enumerate(self.model.layers):
            cos, sin = rope_local if layer.self_attn.local else rope
            x = layer(x, ple[:, i, :] if ple is not None else None, cos, sin, slot_mapping,
                      query_start_loc, seq_lens, block_tables)
        x = self.model.norm(x)
        logits = lm_head(self, x)
        if self.final_softcap:
            logits = soft_cap(logits, self.final_softcap)
        if self.hidden_output:
            return {"logits": logits, "hidden_states": x}
        return logits
