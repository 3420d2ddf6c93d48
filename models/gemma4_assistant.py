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

With use_ordered_embeddings the head is masked: the vocabulary is cut into C clusters
(token_ordering lists each cluster's tokens), the top-k clusters by centroids(y) are
kept and every other token's logit is the row's lowest kept logit minus 1 (transformers
takes the lowest over its whole batch, of one row when it drafts). Here the kept logits
come from the dense head (the same dot products) and the clusters as a mask over it.

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


class _MaskedEmbedding(nn.Module):
    """use_ordered_embeddings: the centroids, and each token's cluster (`cluster_of`, i64
    [V], computed from the checkpoint's token_ordering)."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int):
        super().__init__()
        self.centroids = nn.Linear(hidden, num_centroids, bias=False)
        self.cluster_of = nn.Parameter(torch.zeros(vocab, dtype=torch.int64),
                                       requires_grad=False)
        self.top_k = top_k

    def forward(self, y, logits):
        c = self.centroids(y)                                     # [T, C]
        top, chosen = torch.topk(c, self.top_k, dim=-1)
        kept = torch.zeros_like(c).scatter(1, chosen, top * 0.0 + 1.0)
        allowed = kept.index_select(1, self.cluster_of) > 0.5     # [T, V]
        far = torch.full_like(logits, -3.0e38)
        low = -torch.amax(torch.where(allowed, -logits, far), dim=-1, keepdim=True) - 1.0
        return torch.where(allowed, logits, logits * 0.0 + low)


class _Assistant(nn.Module):
    """The assistant's own modules, named as in its checkpoint."""

    def __init__(self, spec: ModelSpec, backbone_hidden: int, dtype: torch.dtype,
                 ordered: tuple[int, int] | None = None):
        super().__init__()
        h = spec.hidden_size
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.model = Gemma4Model(spec, dtype)
        self.pre_projection = nn.Linear(2 * backbone_hidden, h, bias=False)
        self.post_projection = nn.Linear(h, backbone_hidden, bias=False)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(h, spec.vocab_size, bias=False)
        self.masked_embedding = (_MaskedEmbedding(h, spec.vocab_size, *ordered)
                                 if ordered else None)


class _TargetEmbedding(nn.Module):
    def __init__(self, target: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(target.vocab_size, target.hidden_size)


class Gemma4Assistant(nn.Module):
    """forward(): the batch contract plus `hidden_states` [T, Hb] (the target's final
    hidden state at the position before each token). Returns logits and h'."""

    def __init__(self, spec: ModelSpec, target: ModelSpec, dtype: torch.dtype,
                 rotary_emb: RotaryEmbedding, rotary_emb_local: RotaryEmbedding,
                 ordered: tuple[int, int] | None = None):
        """`ordered`: (num_centroids, centroid_intermediate_top_k) with
        use_ordered_embeddings, else None."""
        super().__init__()
        self.embed_scale = _scale(target.hidden_size ** 0.5, dtype)
        self.model = _TargetEmbedding(target)
        self.assistant = _Assistant(spec, target.hidden_size, dtype, ordered)
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
        logits = lm_head(a, y)
        if a.masked_embedding is not None:
            logits = a.masked_embedding(y, logits)
        return {"logits": logits, "hidden_states": a.post_projection(y)}
