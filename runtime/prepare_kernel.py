"""One Triton launch that writes a step's inputs into the static buffers: the work of
runtime/input_batch.py `PersistentBatch.prepare` (~20 small device ops a step: gathers,
arithmetic, copies, the padding fills), which on a GPU run between two graph replays.

Loaded as source text (braze/kernel_modules.py `load_source`), never imported: the runtime
JIT-compiles it on the GPU, or runs it under the interpreter on the CPU.

The host uploads one int64 [6, S] tensor per step, the columns of its chunks: the row of the
persistent batch, the new tokens, the first new position, the token count through this
chunk (the running sum the torch path computes with cumsum), the sequence length after
the step, and whether it samples (read by the sampler, not here). Program s < S writes sequence s; programs S .. S_pad - 1 write the padded
sequences; program S_pad pads the tokens [T, T_pad) and the logits rows [S, R_pad):
    input_ids[t]      token_ids[row, pos]                   (t: the chunk's tokens, in order)
    positions[t]      pos = start + i
    slot_mapping[t]   block_table[row, pos // BS] * BS + pos % BS     (padding: -1)
    lora_slots[t]     lora_slot[row]                         (if the artifact has LoRA; padding -1)
    query_start_loc[s + 1]  ends[s]                          (padded sequences: T)
    seq_lens[s]       seq_len[s]                             (padded sequences: 0)
    block_tables[s]   block_table[row]
    logits_indices[s] ends[s] - 1                            (padded rows: 0)
"""

import triton
import triton.language as tl
# tl.zeros is a @jit function of triton.language, which the interpreter does not patch in a
# process that imported triton without TRITON_INTERPRET: tl.full is a builtin


@triton.jit
def prepare_step_kernel(meta_ptr, S, S_pad, T, T_pad, R_pad,
                        token_ids_ptr, stride_tok, block_table_ptr, stride_bt, lora_slot_ptr,
                        input_ids_ptr, positions_ptr, slot_mapping_ptr, qsl_ptr, seq_lens_ptr,
                        block_tables_ptr, stride_bts, logits_indices_ptr, lora_out_ptr, MB,
                        BS: tl.constexpr, BLOCK: tl.constexpr, HAS_LORA: tl.constexpr):
    s = tl.program_id(0)
    if s < S:
        row = tl.load(meta_ptr + s)
        n = tl.load(meta_ptr + S + s)
        start = tl.load(meta_ptr + 2 * S + s)
        end = tl.load(meta_ptr + 3 * S + s)
        first = end - n
        tok_row = token_ids_ptr + row * stride_tok
        bt_row = block_table_ptr + row * stride_bt
        if HAS_LORA:
            slot_of_row = tl.load(lora_slot_ptr + row)
        for i in range(0, n, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            ok = offs < n
            pos = start + offs
            t = first + offs
            tl.store(input_ids_ptr + t, tl.load(tok_row + pos, mask=ok, other=0), mask=ok)
            tl.store(positions_ptr + t, pos, mask=ok)
            blk = tl.load(bt_row + pos // BS, mask=ok, other=0).to(tl.int64)
            tl.store(slot_mapping_ptr + t, blk * BS + pos % BS, mask=ok)
            if HAS_LORA:
                tl.store(lora_out_ptr + t, tl.full([BLOCK], 0, tl.int32) + slot_of_row, mask=ok)
        tl.store(qsl_ptr + s + 1, end.to(tl.int32))
        tl.store(seq_lens_ptr + s, tl.load(meta_ptr + 4 * S + s).to(tl.int32))
        tl.store(logits_indices_ptr + s, end - 1)
        out_row = block_tables_ptr + s.to(tl.int64) * stride_bts
        for j in range(0, MB, BLOCK):
            cols = j + tl.arange(0, BLOCK)
            tl.store(out_row + cols, tl.load(bt_row + cols, mask=cols < MB), mask=cols < MB)
    elif s < S_pad:
        tl.store(qsl_ptr + s + 1, tl.full((), 0, tl.int32) + T)
        tl.store(seq_lens_ptr + s, 0)
    else:
        for i in range(T, T_pad, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            ok = offs < T_pad
            zeros = tl.full([BLOCK], 0, tl.int64)
            tl.store(input_ids_ptr + offs, zeros, mask=ok)
            tl.store(positions_ptr + offs, zeros, mask=ok)
            tl.store(slot_mapping_ptr + offs, zeros - 1, mask=ok)
            if HAS_LORA:
                tl.store(lora_out_ptr + offs, tl.full([BLOCK], 0, tl.int32) - 1, mask=ok)
        for i in range(S, R_pad, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            tl.store(logits_indices_ptr + offs, tl.full([BLOCK], 0, tl.int64), mask=offs < R_pad)
