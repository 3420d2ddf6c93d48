"""The one model primitive that is not plain torch: attention over the paged KV cache.

A leaf module for tracing: the frontend maps each call to the IR ops
`cache_write` (store this step's k and v at their slots) and `paged_attention`
(attend over everything cached for each sequence), adding the layer's cache
tensors `%k_cache.L` and `%v_cache.L` as graph inputs.

With `cache_layer` set (Gemma 4's KV sharing) the layer writes nothing and attends over
that earlier layer's cache: no cache of its own exists, and k and v are None.
"""

from __future__ import annotations

from torch import nn


class PagedAttention(nn.Module):
    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int = 0, softcap: float = 0.0,
                 cache_layer: int | None = None):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap          # scores -> softcap * tanh(scores / softcap); 0: none
        self.cache_layer = layer if cache_layer is None else cache_layer   # whose cache it reads

    def forward(self, q, k, v, slot_mapping, query_start_loc, seq_lens, block_tables):
        raise RuntimeError("PagedAttention is a tracing primitive; run the traced braze graph")


class PagedLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek's MLA) over a latent KV cache.

    forward(q [T, H, nope + rope], latent [T, 1, kv_lora_rank + rope], w_kv_b
    [H * (nope + v), kv_lora_rank], ...) -> [T, H, v]. The frontend maps it to
    `latent_cache_write` (each token's latent and rope key into `%kv_latent.L`, one
    `kv_lora_rank + rope` row per token, instead of full per-head K and V) and
    `mla_attention`, which expands the cached latents with `w_kv_b` into keys and values
    (ir/op_mla.py); the `absorb-mla` pass turns that into the absorbed form."""

    def __init__(self, layer: int, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, scale: float):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.scale = scale

    def forward(self, q, latent, w_kv_b, slot_mapping, query_start_loc, seq_lens, block_tables):
        raise RuntimeError("PagedLatentAttention is a tracing primitive; run the traced braze graph")
