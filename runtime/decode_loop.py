"""Several greedy decode steps in a row on the device, with no host read between them.

A draft model (runtime/draft_proposer.py) guesses k tokens by decoding greedily one
token per step for all its sequences. Through `ModelRunner.execute` each step would end
with a device->host read of its tokens and build the next step's batch on the host: k
syncs per proposal. Here the first step is written into the runner's static buffers once
(`PersistentBatch.prepare`, after the block-table entries of every step have gone to the
device), and between steps `advance` moves the buffers on the device: the argmax of step
i is step i+1's `input_ids`, `positions` and `seq_lens` go up by one, `slot_mapping`
comes from the device block table. Each step replays the bucket's bound plan (on cuda its
captured CUDA graph: the buffers it reads never move). Every sampled token is written into
the persistent batch's `token_ids` after its sequence's last, as a normal step does, so
the caller reads all k guesses of every sequence back at once from there.

A sequence runs its own number of steps; after its last it keeps its position, writes no
KV (slot -1: the slots past its reservation are not its own) and its tokens are not
written: its row just rides along in the batch.
"""

from __future__ import annotations

import torch

from .scheduler import ScheduledChunk
from .uploads import upload_values


def advance(static: dict, tables: list[torch.Tensor], block_size: int, rows: torch.Tensor,
            pos: torch.Tensor, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Turn the decode step in the static buffers (one token per sequence: rows `rows` of
    the persistent batch, at positions `pos`) into the next: `tokens` (this step's argmax)
    are its inputs, one position further for the `live` sequences; the others stay where
    they are and write no KV. `tables`: each KV cache group's device block table (group g
    fills `slot_mapping.g<g>`). Returns the next positions. Device ops only."""
    S = rows.shape[0]
    pos = pos + live.to(pos.dtype)
    static["input_ids"][:S] = tokens
    static["positions"][:S] = pos
    static["seq_lens"][:S] = pos + 1
    block, offset = pos // block_size, pos % block_size
    for g, table in enumerate(tables):
        slot = table[rows, block].to(torch.int64) * block_size + offset
        static["slot_mapping" if g == 0 else f"slot_mapping.g{g}"][:S] = torch.where(live, slot, -1)
    return pos


def greedy_steps(runner, chunks: list[ScheduledChunk], block_manager, steps: list[int]) -> None:
    """Decode `chunks` (one token each: a sequence's last, at `start`) greedily, chunk s
    for steps[s] >= 1 steps; the caller has reserved its KV slots up to position
    start + steps[s] - 1. The tokens land in `runner.batch.token_ids` at positions
    start + 1 .. start + steps[s]; nothing is read back here."""
    batch = runner.batch
    K = max(steps)
    hybrid = getattr(block_manager, "num_groups", 1) > 1   # else every group reads the main table
    tables = [batch.block_table] + [batch.group_tables[g - 1] if hybrid else batch.block_table
                                    for g in range(1, batch.num_groups)]
    # the block-table entries the last step reaches go to the device before the first
    batch.send_tables([ScheduledChunk(c.request, n, c.start, True) for c, n in zip(chunks, steps)],
                      block_manager)
    step = runner.forward(chunks, block_manager, decode_only=True)
    rows = step.meta["rows"]
    pos = step.meta["seq_lens"].to(torch.int64) - 1
    left = upload_values(steps, torch.int64, batch.device)
    logits = step.logits
    for i in range(K):
        if i:
            logits = runner.replay_decode(len(chunks))
        tokens, _ = batch.sample(logits, chunks, rows, pos + 1)
        batch.write_sampled(rows, pos + 1, left > i, tokens)
        if i + 1 < K:
            pos = advance(runner.static, tables, batch.block_size, rows, pos, tokens,
                          left > i + 1)
