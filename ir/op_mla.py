"""Multi-head latent attention (DeepSeek's MLA) over a latent KV cache.

The cache of an MLA layer, `%kv_latent.L`, is [NB, block_size, 1, kv_lora_rank + rope]:
per token one row holding the normed latent c (kv_lora_rank) and the rotated rope key
k_r shared by every head, instead of per-head K and V. With W = w_kv_b viewed
[H, nope + v, kv_lora_rank], split into W_UK [H, nope, R] and W_UV [H, v, R]:

    expanded  k[h] = (c W_UK[h]^T, k_r)     v[h] = c W_UV[h]^T
              o[h] = softmax(q[h] . k[h] * scale) v[h]                     (mla_attention)
    absorbed  q'[h] = (q_nope[h] W_UK[h], q_rope[h])                       [H, R + rope]
              o'[h] = softmax(q'[h] . cache_row * scale) cache_row[:R]     (latent_attention)
              o[h]  = o'[h] W_UV[h]^T

which are the same numbers: q_nope . (c W_UK^T) = (q_nope W_UK) . c. The absorbed form
reads one latent row per cached token for all heads (multi-query attention with a
kv_lora_rank + rope key and a kv_lora_rank value), the expanded form materialises
per-head K and V. `mla_attention` is what the model states; the `absorb-mla` pass
rewrites it into the absorbed form, whose `latent_attention` has a Triton kernel.

    latent_cache_write(kv [T, 1, D], cache [NB, bs, 1, D], slot_mapping)
    mla_attention(q [T, H, nope + rope], cache, w_kv_b [H * (nope + v), R], query_start_loc,
                  seq_lens, block_tables) {scale, kv_lora_rank} -> [T, H, v]
    latent_attention(q [T, H, R + rope], cache, query_start_loc, seq_lens, block_tables)
                  {scale, kv_lora_rank} -> [T, H, R]
"""

from __future__ import annotations

import torch

from .errors import BrazeError
from .op_attention import _paged_attention
from .ops import REQUIRED, OpDef, register
from .types import TensorType


def _latent_cache_write_infer(types, attrs):
    kv, cache, slots = types
    if kv.rank != 3 or cache.rank != 4 or kv.shape[1:] != cache.shape[2:]:
        raise BrazeError(f"latent_cache_write: kv {kv} does not fit cache {cache}")
    if slots.rank != 1 or slots.dtype not in ("i64", "i32"):
        raise BrazeError(f"latent_cache_write: slot_mapping must be 1-D integer, got {slots}")
    return []


def _latent_cache_write(kv, cache, slot_mapping):
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    cache.view(-1, *cache.shape[2:])[slots] = kv[: slot_mapping.shape[0]][valid].to(cache.dtype)
    return ()


register(OpDef("latent_cache_write", ("kv", "cache", "slot_mapping"),
               _latent_cache_write_infer, _latent_cache_write, writes=(1,),
               doc="store each token's latent + rope key row at its slot; slot -1 is skipped"))


def _check_cache(op, cache, rank):
    if cache.rank != 4 or cache.shape[2] != 1:
        raise BrazeError(f"{op}: the latent cache must be [NB, block_size, 1, D], got {cache}")
    d = cache.shape[3]
    if isinstance(d, int) and not 0 < rank < d:
        raise BrazeError(f"{op}: kv_lora_rank {rank} does not leave a rope part in cache {cache}")
    return d - rank


def _mla_infer(types, attrs):
    q, cache, w, qsl, seq_lens, tables = types
    rank = attrs["kv_lora_rank"]
    rope = _check_cache("mla_attention", cache, rank)
    if q.rank != 3 or w.rank != 2 or w.shape[1] != rank:
        raise BrazeError(f"mla_attention: want q [T, H, nope + rope] and w_kv_b "
                         f"[H * (nope + v), {rank}]; got {q}, {w}")
    heads, nope = q.shape[1], q.shape[2] - rope
    if not isinstance(heads, int) or w.shape[0] % heads or w.shape[0] // heads <= nope:
        raise BrazeError(f"mla_attention: w_kv_b {w} does not hold {heads} heads of "
                         f"{nope} key + some value dims")
    return [TensorType((q.shape[0], heads, w.shape[0] // heads - nope), q.dtype)]


def _mla_attention(q, cache, w_kv_b, query_start_loc, seq_lens, block_tables, scale,
                   kv_lora_rank):
    """Reference: expand the latents of the blocks the step reads into per-head K and V
    (in the model dtype, as transformers' kv_b_proj does), then paged attention."""
    heads, rank = q.shape[1], kv_lora_rank
    rope = cache.shape[3] - rank
    nope = q.shape[2] - rope
    v_dim = w_kv_b.shape[0] // heads - nope
    block_size = cache.shape[1]
    longest = int(seq_lens.max()) if seq_lens.numel() else 0
    tables = block_tables[:, : max(1, -(-longest // block_size))].long()
    used, local = torch.unique(tables, return_inverse=True)
    lat = cache.index_select(0, used)                                   # [U, bs, 1, R + rope]
    kv = torch.nn.functional.linear(lat[..., :rank].to(q.dtype), w_kv_b.to(q.dtype))
    kv = kv.view(len(used), block_size, heads, nope + v_dim)
    k = torch.cat((kv[..., :nope], lat[..., rank:].to(q.dtype).expand(-1, -1, heads, -1)), -1)
    v = kv[..., nope:]
    return _paged_attention(q, k, v, query_start_loc, seq_lens,
                            local.view(tables.shape).to(torch.int32), scale, 0, True)


register(OpDef("mla_attention",
               ("q", "cache", "w_kv_b", "query_start_loc", "seq_lens", "block_tables"),
               _mla_infer, _mla_attention,
               attrs={"scale": REQUIRED, "kv_lora_rank": REQUIRED}, graph_break=True,
               doc="causal attention of q over each sequence's cached latents, expanded into "
                   "per-head keys and values by w_kv_b (the expanded form of MLA)"))


def _latent_infer(types, attrs):
    q, cache, qsl, seq_lens, tables = types
    rank = attrs["kv_lora_rank"]
    _check_cache("latent_attention", cache, rank)
    if q.rank != 3 or q.shape[2] != cache.shape[3]:
        raise BrazeError(f"latent_attention: q {q} must be [T, H, {cache.shape[3]}] for cache {cache}")
    return [TensorType((q.shape[0], q.shape[1], rank), q.dtype)]


def _latent_attention(q, cache, query_start_loc, seq_lens, block_tables, scale, kv_lora_rank):
    """Reference: multi-query attention whose one key is the whole cache row and whose
    value is its latent part."""
    return _paged_attention(q, cache, cache[..., :kv_lora_rank], query_start_loc, seq_lens,
                            block_tables, scale, 0, True)


register(OpDef("latent_attention",
               ("q", "cache", "query_start_loc", "seq_lens", "block_tables"),
               _latent_infer, _latent_attention,
               attrs={"scale": REQUIRED, "kv_lora_rank": REQUIRED}, graph_break=True,
               doc="the absorbed form of MLA: every head of q (W_UK already folded in) attends "
                   "over the cached rows; the output is the weighted latent, before W_UV"))
