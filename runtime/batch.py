"""Build one step's inputs (the batch contract, ir/contract.py) from sequence states.

A step is a list of `SeqChunk`s: for each sequence, the new tokens to run and
how many of its tokens are already in the cache. Prefill chunks (many new
tokens, maybe after a cached prefix) and decode chunks (one token) mix freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from braze.ir.errors import BrazeError


@dataclass
class SeqChunk:
    token_ids: list[int]        # the new tokens of this step
    num_computed: int           # tokens of the sequence already in the cache
    block_table: list[int]      # the sequence's cache blocks (enough for all its tokens)


def build_step(chunks: list[SeqChunk], block_size: int, max_blocks: int | None = None,
               pad_to: int | None = None, device="cpu") -> dict[str, torch.Tensor]:
    ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
    width = max_blocks or max((len(c.block_table) for c in chunks), default=1) or 1
    tables = torch.zeros(len(chunks), width, dtype=torch.int32)
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        total = c.num_computed + n
        if -(-total // block_size) > len(c.block_table):
            raise BrazeError(f"sequence {s} needs {-(-total // block_size)} cache blocks for "
                             f"{total} tokens but has {len(c.block_table)}")
        if len(c.block_table) > width:
            raise BrazeError(f"sequence {s} has {len(c.block_table)} blocks; the block table "
                             f"holds {width} (max_model_len / block_size)")
        for i in range(n):
            p = c.num_computed + i
            positions.append(p)
            slots.append(c.block_table[p // block_size] * block_size + p % block_size)
        ids.extend(c.token_ids)
        qsl.append(qsl[-1] + n)
        seq_lens.append(total)
        tables[s, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
    pad = (pad_to or len(ids)) - len(ids)
    if pad < 0:
        raise BrazeError(f"step has {len(ids)} tokens, more than the padded size {pad_to}")
    ids += [0] * pad
    positions += [0] * pad
    slots += [-1] * pad
    i64 = dict(dtype=torch.int64, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return {
        "input_ids": torch.tensor(ids, **i64),
        "positions": torch.tensor(positions, **i64),
        "slot_mapping": torch.tensor(slots, **i64),
        "query_start_loc": torch.tensor(qsl, **i32),
        "seq_lens": torch.tensor(seq_lens, **i32),
        "block_tables": tables.to(device),
        "logits_indices": torch.tensor([q - 1 for q in qsl[1:]], **i64),
    }
