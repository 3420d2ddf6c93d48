"""DeepSeek-V3 (`DeepseekV3ForCausalLM`), written like decoder.py: reference PyTorch.

What differs from Llama (the numbers are in mla_spec.py):
  - multi-head latent attention: q from q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj;
    kv_a_proj_with_mqa gives a kv_lora_rank latent (normed by kv_a_layernorm) and one
    rope key shared by all heads; RoPE (interleaved pairs when rope_interleave) on the
    rope part of q and k only. The latent and rope key are what the KV cache holds
    (primitives.PagedLatentAttention); kv_b_proj expands them inside the attention.
  - MoE layers after the first first_k_dense_replace: a grouped sigmoid router with
    e_score_correction_bias (router weight and bias kept in float32, as transformers
    does), routed_scaling_factor, optional renormalisation, and shared experts; in the
    dense reference form of moe.py (every expert on every token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import DecoderModel
from .layers import MLP, RMSNorm, RotaryEmbedding, apply_rope, lm_head
from .moe import Experts
from .primitives import PagedLatentAttention
from .spec import ModelSpec

# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default eps
LATENT_NORM_EPS = 1e-6


def apply_interleaved_rope(x, cos, sin, half: int):
    """RoPE of interleaved pairs (x0, x1), (x2, x3), ... as transformers' DeepSeek-V3 does
    it: the rotated evens, then the rotated odds (a fixed permutation of the rope dims,
    the same for q and k, so scores are those of GPT-J style rotation)."""
    cos, sin = cos[..., :half], sin[..., :half]
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MLAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        m = spec.mla
        h, heads = spec.hidden_size, spec.num_heads
        self.num_heads, self.mla = heads, m
        bias = spec.attention_bias
        if m.q_lora_rank:
            self.q_a_proj = nn.Linear(h, m.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = nn.Linear(m.q_lora_rank, heads * m.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, heads * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(heads * m.v_head_dim, h, bias=bias)
        self.attn = PagedLatentAttention(layer, heads, m.kv_lora_rank, m.qk_nope_head_dim,
                                         m.qk_rope_head_dim, m.v_head_dim, m.scale)

    def forward(self, x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables):
        m = self.mla
        nope, rope, rank = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
        if m.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(-1, self.num_heads, m.qk_head_dim)
        q_nope, q_rot = q[..., :nope], q[..., nope:]
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., :rank]).view(-1, 1, rank)
        k_rot = kv[..., rank:].view(-1, 1, rope)
        if m.rope_interleave:
            q_rot = apply_interleaved_rope(q_rot, cos, sin, rope // 2)
            k_rot = apply_interleaved_rope(k_rot, cos, sin, rope // 2)
        else:
            q_rot = apply_rope(q_rot, cos, sin, rope // 2)
            k_rot = apply_rope(k_rot, cos, sin, rope // 2)
        q = torch.cat((q_nope, q_rot), dim=-1)
        cached = torch.cat((latent, k_rot), dim=-1)                  # [T, 1, rank + rope]
        o = self.attn(q, cached, self.kv_b_proj.weight, slot_mapping, query_start_loc,
                      seq_lens, block_tables)
        return self.o_proj(o.reshape(-1, self.num_heads * m.v_head_dim))


class GroupedSigmoidMoE(nn.Module):
    """DeepSeek-V3's MoE in the dense reference form: every routed expert on every token,
    weighted by the sparse routing matrix, plus the shared experts."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        m = spec.moe
        h = spec.hidden_size
        self.moe, self.out_dtype = m, dtype
        self.gate = nn.Linear(h, m.num_experts, bias=False)
        self.gate.e_score_correction_bias = nn.Parameter(torch.zeros(m.num_experts))
        self.experts = Experts(m.num_experts, h, m.intermediate_size)
        self.shared_experts = (MLP(h, m.intermediate_size * m.shared_experts, spec.hidden_act)
                               if m.shared_experts else None)
        from .layers import ACT_FNS
        self.act = ACT_FNS[spec.hidden_act]

    def route(self, x):
        """-> the [T, E] routing matrix (zero where a token did not pick the expert), float32."""
        m = self.moe
        scores = F.linear(x.float(), self.gate.weight).sigmoid()
        choice = scores + self.gate.e_score_correction_bias
        if m.n_group > 1:
            per_group = m.num_experts // m.n_group
            grouped = choice.view(-1, m.n_group, per_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)           # [T, G]
            # the topk_group best groups: those at least as good as the k-th best
            kth = torch.topk(group_scores, m.topk_group, dim=-1)[0][:, m.topk_group - 1:]
            keep = (group_scores >= kth)[:, :, None]
            grouped = torch.where(keep, grouped, torch.full_like(grouped, float("-inf")))
            choice = grouped.reshape(-1, m.num_experts)
        chosen = torch.topk(choice, m.top_k, dim=-1)[1]
        weights = scores.gather(1, chosen)
        if m.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * m.routed_scaling_factor
        return torch.zeros_like(scores).scatter(1, chosen, weights)

    def forward(self, x):
        routing = self.route(x).to(self.out_dtype)
        gate = torch.einsum("th,eih->tei", x, self.experts.gate_proj)
        up = torch.einsum("th,eih->tei", x, self.experts.up_proj)
        out = torch.einsum("tei,ehi->teh", self.act(gate) * up, self.experts.down_proj)
        y = torch.einsum("te,teh->th", routing, out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        self.self_attn = MLAttention(spec, layer, dtype)
        if spec.moe_layers[layer]:
            self.mlp = GroupedSigmoidMoE(spec, dtype)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)

    def forward(self, x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, slot_mapping,
                               query_start_loc, seq_lens, block_tables)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3Model(DecoderModel):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(spec, i, dtype)
                                    for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.tie_word_embeddings = spec.tie_word_embeddings
        # with an MTP layer (models/deepseek_mtp.py) the graph also returns what it reads:
        # the last layer's hidden states before the final norm
        self.hidden_output = bool(spec.mtp_layers)
        self.model = DeepseekV3Model(spec, dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.to(dtype)
        for layer in self.model.layers:          # transformers keeps the router in float32
            if isinstance(layer.mlp, GroupedSigmoidMoE):
                layer.mlp.gate.float()
        self.model.rotary_emb = rotary_emb

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices):
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables)
        h = x
        x = self.model.norm(x)
        logits = lm_head(self, x)
        if self.hidden_output:
            return {"logits": logits, "hidden_states": h}
        return logits
