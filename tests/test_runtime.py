"""Step inputs built on the host (the tests' reference path) follow the batch contract."""

from __future__ import annotations

import torch

from braze.ir.contract import SeqChunk, build_step


def test_step_inputs_follow_the_contract():
    s = build_step([SeqChunk([5, 6, 7], 0, [2]), SeqChunk([9], 17, [0, 3])], block_size=16,
                   max_blocks=4, pad_to=6)
    assert s["positions"].tolist() == [0, 1, 2, 17, 0, 0]
    assert s["slot_mapping"].tolist() == [32, 33, 34, 3 * 16 + 1, -1, -1]
    assert s["query_start_loc"].tolist() == [0, 3, 4] and s["seq_lens"].tolist() == [3, 18]
    assert s["logits_indices"].tolist() == [2, 3]
    assert s["block_tables"].shape == (2, 4) and s["block_tables"][1, :2].tolist() == [0, 3]
    assert s["input_ids"].dtype == torch.int64 and s["query_start_loc"].dtype == torch.int32
