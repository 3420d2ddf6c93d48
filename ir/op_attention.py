"""Attention over the paged KV cache: the one primitive that is not plain tensor math.

The batch contract (shared by the reference interpreter, the kernels and the
runtime; see docs/batch-contract.md):

    k_cache.L, v_cache.L  [NB, block_size, num_kv_heads, head_dim]  one pair per layer
    slot_mapping          i64[T]     cache slot (block * block_size + offset) of each
                                     token; -1 for padding tokens (not written)
    query_start_loc       i32[S + 1] token offsets of each sequence's new tokens in the step
    seq_lens              i32[S]     each sequence's length after this step (cached + new)
    block_tables          i32[S, MB] the cache blocks of each sequence, in order

A sequence's new tokens are its last `n = query_start_loc[s+1] - query_start_loc[s]`
positions, so one step can mix prefill (n > 1, possibly after a cached prefix)
and decode (n == 1) sequences. Tokens past `query_start_loc[S]` are padding and
produce zeros.
"""

from __future__ import annotations

import torch

from .errors import BrazeError
from .ops import REQUIRED, OpDef, register
from .types import TensorType


def _cache_write_infer(types, attrs):
    k, v, k_cache, v_cache, slots = types
    if k.rank != 3 or k_cache.rank != 4 or k.shape[1:] != k_cache.shape[2:]:
        raise BrazeError(f"cache_write: k {k} does not fit cache {k_cache}")
    if v.shape[1:] != v_cache.shape[2:]:
        raise BrazeError(f"cache_write: v {v} does not fit cache {v_cache}")
    if slots.rank != 1 or slots.dtype not in ("i64", "i32"):
        raise BrazeError(f"cache_write: slot_mapping must be 1-D integer, got {slots}")
    return []


def _cache_write(k, v, k_cache, v_cache, slot_mapping):
    # No shape here depends on device data: -O0/-O1 artifacts run this op as an extern
    # inside captured CUDA graphs, where a boolean-mask index (a hidden nonzero, a host
    # sync) fails the capture. A padding token (slot -1) writes, instead, what some valid
    # token of the step writes at that token's slot (duplicate indices carrying equal
    # values); in a step of padding only, every token rewrites slot 0 with its own value.
    n = slot_mapping.shape[0]
    if n == 0:
        return ()
    valid = slot_mapping >= 0
    rep = torch.argmax(valid.to(torch.int32))              # a valid token, if there is one
    src = torch.where(valid, torch.arange(n, device=slot_mapping.device), rep)
    any_valid = valid.any()
    slots = torch.where(any_valid, slot_mapping[src].long(), 0)
    for x, cache in ((k, k_cache), (v, v_cache)):
        flat = cache.view(-1, *cache.shape[2:])
        flat[slots] = torch.where(any_valid, x[:n][src].to(cache.dtype), flat[slots])
    return ()


register(OpDef("cache_write", ("k", "v", "k_cache", "v_cache", "slot_mapping"),
               _cache_write_infer, _cache_write, writes=(2, 3),
               doc="store each token's k and v at its slot; slot -1 is skipped"))


def _attention_infer(types, attrs):
    q, k_cache, v_cache, qsl, seq_lens, block_tables = types
    if q.rank != 3 or k_cache.rank != 4 or q.shape[2] != k_cache.shape[3]:
        raise BrazeError(f"paged_attention: q {q} does not match cache {k_cache}")
    hq, hkv = q.shape[1], k_cache.shape[2]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise BrazeError(f"paged_attention: {hq} query heads are not a multiple of {hkv} kv heads")
    out_dim = v_cache.shape[3]
    return [TensorType((q.shape[0], hq, out_dim), q.dtype)]


def _paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                     scale, sliding_window, causal, softcap=0.0):
    """Reference: gather each sequence's keys from its blocks and attend in float32.

    Sequences with one new token (decodes) are done together, padded to the longest;
    the others (prefill chunks) one at a time, each a batch of its own tokens."""
    out = torch.zeros(q.shape[0], q.shape[1], v_cache.shape[3], dtype=q.dtype, device=q.device)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    decodes = []
    for s, length in enumerate(lengths):
        n = starts[s + 1] - starts[s]
        if n > length:
            raise BrazeError(f"paged_attention: sequence {s} has {n} new tokens but length {length}")
        if n == 1:
            decodes.append(s)
        elif n > 1:
            _attend(q, k_cache, v_cache, out, [s], starts, lengths, block_tables, scale,
                    sliding_window, causal, softcap)
    if decodes:
        _attend(q, k_cache, v_cache, out, decodes, starts, lengths, block_tables, scale,
                sliding_window, causal, softcap)
    return out


def _attend(q, k_cache, v_cache, out, seqs, starts, lengths, block_tables, scale,
            sliding_window, causal, softcap=0.0):
    """Attention for sequences `seqs`, which all have the same number n of new tokens:
    their keys gathered to the longest one's length L, [B, L, kv heads, dim] (index_select
    on whole blocks: a third of the time of indexing with the block table), masked past
    each one's own length, causally and to the sliding window."""
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    dev = q.device
    lens = torch.tensor([lengths[s] for s in seqs], device=dev)
    L = max(lengths[s] for s in seqs)
    n = starts[seqs[0] + 1] - starts[seqs[0]]
    nb = -(-L // block_size)
    blocks = block_tables[seqs, :nb].flatten().long()
    k = k_cache.index_select(0, blocks).view(len(seqs), nb * block_size, hkv, -1)[:, :L].float()
    v = v_cache.index_select(0, blocks).view(len(seqs), nb * block_size, hkv, -1)[:, :L].float()
    rows = torch.tensor([starts[s] + i for s in seqs for i in range(n)], device=dev)
    qs = q[rows].float().view(len(seqs), n, q.shape[1], q.shape[2]).transpose(1, 2)
    mask = None
    # one token per sequence, all as long as L, no window: every key is visible
    if not (n == 1 and not sliding_window and all(lengths[s] == L for s in seqs)):
        kpos = torch.arange(L, device=dev)
        qpos = lens[:, None] - n + torch.arange(n, device=dev)           # [B, n]
        mask = kpos[None, None, :] < lens[:, None, None]                 # [B, n, L]
        if causal:
            mask = mask & (kpos[None, None, :] <= qpos[:, :, None])
        if sliding_window:
            mask = mask & (kpos[None, None, :] > qpos[:, :, None] - sliding_window)
        mask = mask[:, None]
    # every query row keeps at least its own key (or, not causal, the first), so no row
    # is all -inf; GQA: query head h reads kv head h // group
    if softcap:
        o = _soft_capped(qs, k.transpose(1, 2), v.transpose(1, 2), mask, scale, softcap, group)
    else:
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
            enable_gqa=group > 1)                                        # [B, H, n, dv]
    out[rows] = o.transpose(1, 2).reshape(len(seqs) * n, q.shape[1], v.shape[-1]).to(q.dtype)


def _soft_capped(q, k, v, mask, scale, softcap, group):
    """Attention with scores softcap * tanh(q k^T * scale / softcap) (Gemma 2; Gemma 3 when
    attn_logit_softcapping is set), which scaled_dot_product_attention cannot express."""
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


register(OpDef("paged_attention",
               ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables"),
               _attention_infer, _paged_attention,
               attrs={"scale": REQUIRED, "sliding_window": 0, "causal": True, "softcap": 0.0},
               graph_break=True,
               doc="softmax(q k^T * scale + mask) v over each sequence's cached keys; "
                   "sliding_window=W keeps keys at positions > pos - W; softcap=C > 0 "
                   "replaces the scores s by C * tanh(s / C)"))


def _kernel_attention_infer(types, attrs):
    (out,) = _attention_infer(types, attrs)
    q, k_cache = types[0], types[1]
    if (q.shape[1], q.shape[2], k_cache.shape[2]) != (attrs["num_heads"], attrs["head_dim"],
                                                     attrs["num_kv_heads"]):
        raise BrazeError(f"attention: heads/dims attributes do not match q {q} and cache {k_cache}")
    return [TensorType((q.shape[0], attrs["num_heads"] * types[2].shape[3]), q.dtype)]


def _kernel_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                      sliding_window, causal, num_heads, num_kv_heads, head_dim, softcap=0.0):
    out = _paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                           scale, sliding_window, causal, softcap)
    return out.reshape(out.shape[0], num_heads * v_cache.shape[3])   # -1 fails when T == 0


register(OpDef("attention",
               ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables"),
               _kernel_attention_infer, _kernel_attention,
               attrs={"scale": REQUIRED, "sliding_window": 0, "causal": True, "softcap": 0.0,
                      "num_heads": REQUIRED, "num_kv_heads": REQUIRED, "head_dim": REQUIRED},
               graph_break=True,
               doc="the kernel form of paged_attention: one launch for a mixed prefill+decode "
                   "batch, GQA group num_heads/num_kv_heads, output already [T, heads*head_dim]"))
