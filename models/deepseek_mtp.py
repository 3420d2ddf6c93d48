"""DeepSeek-V3's multi-token-prediction (next-n) layer, written like deepseek_v3.py.

The checkpoint holds it after the main layers, as `model.layers.{num_hidden_layers}.*`.
At position t it reads the target's last hidden state h_t (before the final norm) and
the embedding of token t+1, and predicts token t+2:

    x = eh_proj(concat(enorm(embed(t+1)), hnorm(h_t)))     # [T, 2H] -> [T, H]
    y = decoder_layer(x)            # MLA attention over its own latent KV cache, MoE/MLP
    logits = lm_head(shared_head.norm(y))

The embedding and the LM head are the target's (DeepSeek-V3 shares them; the copies a
checkpoint may keep under the layer's prefix are not shipped). `y` is an output too:
chaining the layer for a second guess feeds it back in place of h (vLLM does the same).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .deepseek_v3 import DeepseekV3DecoderLayer, GroupedSigmoidMoE
from .layers import RMSNorm, RotaryEmbedding, lm_head
from .spec import ModelSpec


def mtp_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` with the MTP layer (index num_layers) among its layers: MoE when the main
    model's layers past first_k_dense_replace are (DeepSeek-V3's is)."""
    s = copy.copy(spec)
    moe = bool(spec.moe) and (not spec.moe_layers or spec.moe_layers[-1])
    s.moe_layers = list(spec.moe_layers) + [moe]
    return s


class SharedHead(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class MTPLayer(DeepseekV3DecoderLayer):
    """The decoder layer plus what the MTP puts around it (names as in the checkpoint)."""

    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__(spec, layer, dtype)
        h = spec.hidden_size
        self.enorm = RMSNorm(h, spec.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(h, spec.rms_norm_eps, dtype)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(spec, dtype)


class _Model(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        # a ModuleDict keyed by the layer index, so parameter names are the checkpoint's
        self.layers = nn.ModuleDict({str(layer): MTPLayer(spec, layer, dtype)})


class DeepseekV3MTP(nn.Module):
    """forward(): the batch contract plus `hidden_states` [T, H] (the target's h at each
    position; input_ids holds the token after it). Returns logits and the layer's output."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.layer_index = spec.num_layers
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.model = _Model(mtp_spec(spec), spec.num_layers, dtype)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.to(dtype)
        layer = self.model.layers[str(self.layer_index)]
        if isinstance(layer.mlp, GroupedSigmoidMoE):      # the router stays float32
            layer.mlp.gate.float()
        self.model.rotary_emb = rotary_emb

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices, hidden_states):
        layer = self.model.layers[str(self.layer_index)]
        e = layer.enorm(self.model.embed_tokens(input_ids))
        h = layer.hnorm(hidden_states)
        x = layer.eh_proj(torch.cat((e, h), dim=-1))
        cos, sin = self.model.rotary_emb(positions)
        y = layer(x, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables)
        z = layer.shared_head.norm(y)
        logits = lm_head(self, z)
        return {"logits": logits, "hidden_states": y}
