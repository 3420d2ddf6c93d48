"""The batch contract: the inputs every model graph takes, by name and type.

One step of any batch (prefill and decode sequences mixed) is described by:

    input_ids        i64[T]      token ids; padding tokens past query_start_loc[S] are ignored
    positions        i64[T]      position of each token in its sequence
    slot_mapping     i64[T]      KV-cache slot of each token; -1 = padding, not written
    query_start_loc  i32[S + 1]  offsets of each sequence's new tokens in the step
    seq_lens         i32[S]      each sequence's length after this step (cached + new)
    block_tables     i32[S, MB]  each sequence's cache blocks, in order
    logits_indices   i64[S]      the token rows whose logits are sampled (last of each sequence)

plus one cache pair per layer, `k_cache.L` and `v_cache.L`, each
`[NB, block_size, num_kv_heads, head_dim]` in the model dtype.
The compiled kernels and the runtime use this same contract.
"""

from __future__ import annotations

from .types import MB, NB, S, T, TensorType

STEP_INPUTS: dict[str, TensorType] = {
    "input_ids": TensorType((T,), "i64"),
    "positions": TensorType((T,), "i64"),
    "slot_mapping": TensorType((T,), "i64"),
    "query_start_loc": TensorType((S + 1,), "i32"),
    "seq_lens": TensorType((S,), "i32"),
    "block_tables": TensorType((S, MB), "i32"),
    "logits_indices": TensorType((S,), "i64"),
}


def cache_names(layer: int) -> tuple[str, str]:
    return f"k_cache.{layer}", f"v_cache.{layer}"


def cache_type(block_size: int, num_kv_heads: int, head_dim: int, dtype: str) -> TensorType:
    return TensorType((NB, block_size, num_kv_heads, head_dim), dtype)


def default_buckets(max_num_tokens: int) -> list[int]:
    """The padded token counts steps run at: 1, 2, 4, then every 8 up to 256, every 16 up
    to 512, every 32 up to 1024, then 8 per doubling (at most 12.5% padding); capped at and
    always including the maximum. The compiler specialises kernels for these sizes and the
    runtime captures a CUDA graph for each."""
    out, b = [1, 2, 4], 8
    while b < max_num_tokens:
        out.append(b)
        if b < 256:
            b += 8
        elif b < 512:
            b += 16
        elif b < 1024:
            b += 32
        else:
            b += (1 << (b.bit_length() - 1)) // 8
    out = [x for x in out if x < max_num_tokens]
    return out + [max_num_tokens]


def bucket_sizes(tokens: int, max_num_seqs: int, max_blocks: int) -> dict[str, int]:
    """The step symbols of a bucket of `tokens` padded tokens: at most one sequence per token."""
    return {"T": tokens, "S": min(tokens, max_num_seqs), "MB": max_blocks}
