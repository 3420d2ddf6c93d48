"""Gemma 4's assistant model (`Gemma4AssistantForCausalLM` in transformers), written like
gemma4.py, for the `mtp` speculative method.

The assistant is a small Gemma 4 text decoder whose every layer is KV-shared: it computes
no keys or values and attends over the target's cache, each layer over the cache of the
target's last unshared layer of its own type (transformers' `shared_kv_states`: the
"store" layer of "sliding_attention" and of "full_attention"). At position q (the last
token t_q, whose target KV is not computed yet) it reads

    x = pre_projection(concat(target_embed(t_q) * sqrt(H_target), h))     # [T, 2 Hb] -> [T, H]
    x = layers(x)       # queries at position q; keys: the target's at positions < q
    y = norm(x)
    logits = lm_head(y)                 # the assistant's own (tied) head, no soft-cap
    h' = post_projection(y)             # [T, Hb]: the next guess's h

where h is the target's last hidden state (after its final norm) at position q - 1. The
next guess chains: token = argmax(logits), h = h', same position q, same keys.

transformers masks the shared keys bidirectionally; a sliding layer with window W sees
the last W + 1 of them (|q_idx - kv_idx| <= W, flipped). Here the query sits at
attention position q - 1 (seq_lens = q: keys 0 .. q - 1) with a sliding window of W + 1,
which keeps the same keys. The embedding read is the target's (`model.embed_tokens`,
shared with the main graph); the assistant's own parameters are under `assistant.`.
"""

from __future__ import annotations

import torch
from torch import nn

from .gemma4 import Gemma4Model, _scale
from .layers import RotaryEmbedding, lm_head
from .spec import ModelSpec

PREFIX = "assistant."


class _Assistant(nn.Module):
    """The assistant's own modules, named as in its checkpoint."""

    def __init__(self, spec: ModelSpec, backbone_hidden: int, dtype: torch.dtype):
        super().__init__()
        h = spec.hidden_size
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.model = Gemma4Model(spec, dtype)
        self.pre_projection = nn.Linear(2 * backbone_hidden, h, bias=False)
        self.post_projection = nn.Linear(h, backbone_hidden, bias=False)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(h, spec.vocab_size, bias=False)


class _TargetEmbedding(nn.Module):
    def __init__(self, target: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(target.vocab_size, target.hidden_size)


class Gemma4Assistant(nn.Module):
    """forward(): the batch contract plus `hidden_states` [T, Hb] (the target's final
    hidden state at the position before each token). Returns logits and h'."""

    def __init__(self, spec: ModelSpec, target: ModelSpec, dtype: torch.dtype,
                 rotary_emb: RotaryEmbedding, rotary_emb_local: RotaryEmbedding):
        super().__init__()
        self.embed_scale = _scale(target.hidden_size ** 0.5, dtype)
        self.model = _TargetEmbedding(target)
        self.assistant = _Assistant(spec, target.hidden_size, dtype)
        self.to(dtype)
        self.assistant.model.rotary_emb = rotary_emb
        self.assistant.model.rotary_emb_local = rotary_emb_local

    def forward(self, input_ids, positions, slot_mapping, query_start_loc, seq_lens,
                block_tables, logits_indices, hidden_states):
        a = self.assistant
        e = self.model.embed_tokens(input_ids) * self.embed_scale
        x = a.pre_projection(torch.cat((e, hidden_states), dim=-1))
        rope = a.model.rotary_emb(positions)
        rope_local = a.model.rotary_emb_local(positions)
        for layer in a.model.layers:
            cos, sin = rope_local if layer.self_attn.local else rope
            x = layer(x, None, cos, sin, slot_mapping, query_start_loc, seq_lens, block_tables)
        y = a.model.norm(x)
        return {"logits": lm_head(a, y), "hidden_states": a.post_projection(y)}
