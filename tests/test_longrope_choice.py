"""longrope's factor set is chosen once per artifact (models/registry.longrope_uses_long,
vLLM's rule): the short factors when the artifact serves at most the original length, the
long ones at every position otherwise. Checked against transformers, which picks per
forward call: the same set whenever a call stays within, or passes, the original length.
A per-position switch (what braze did before) rotated keys below the original length one
way and queries past it another, so a chunk past it read its cached prefix wrongly."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import braze
from braze.ir.contract import SeqChunk
from braze.runtime import Executor, open_artifact
from braze.tiny import make_checkpoint

from conftest import hf_model, run_step, take_blocks

ORIGINAL = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Phi-3 of 256 positions whose longrope switches at 64 (scale 4)."""
    d = tmp_path_factory.mktemp("longrope")
    with contextlib.redirect_stderr(io.StringIO()):
        return make_checkpoint("phi3", d / "model", seed=3,
                               original_max_position_embeddings=ORIGINAL)


def _executor(checkpoint, tmp_path, logs, **options):
    out = tmp_path / "a.braze"
    braze.compile(checkpoint, out, opt_level=0, targets="", log=logs.append, **options)
    return Executor(open_artifact(out), backend="reference", num_blocks=16)


def assert_two_chunks_match_transformers(checkpoint, ex, ids, split):
    """`ids` prefilled in two chunks (the second reading the first's cached keys): the last
    token's logits are transformers' for the whole sequence in one call."""
    with torch.no_grad():
        want = hf_model(checkpoint)(torch.tensor([ids])).logits[0]
    blocks = take_blocks(ex, -(-len(ids) // ex.block_size))
    run_step(ex, [SeqChunk(ids[:split], 0, blocks)])
    got = run_step(ex, [SeqChunk(ids[split:], split, blocks)])
    torch.testing.assert_close(got[0], want[-1], atol=1e-4, rtol=1e-4)


def test_an_artifact_within_the_original_length_uses_the_short_factors(checkpoint, tmp_path):
    logs = []
    ex = _executor(checkpoint, tmp_path, logs, max_model_len=ORIGINAL)
    ids = [1] + [(11 * i) % 200 + 3 for i in range(39)]
    assert_two_chunks_match_transformers(checkpoint, ex, ids, 25)
    assert not any("long factors" in m for m in logs)


def test_an_artifact_past_the_original_length_uses_the_long_factors_everywhere(checkpoint,
                                                                               tmp_path):
    """A prompt of 100 tokens (past 64) in two chunks: the second chunk's queries, all past
    64, read keys of the first chunk at positions below 64; transformers rotates them all
    with the long factors in its one call, and so must the artifact."""
    logs = []
    ex = _executor(checkpoint, tmp_path, logs)          # max_model_len 256 > 64
    ids = [1] + [(7 * i) % 200 + 3 for i in range(99)]
    assert_two_chunks_match_transformers(checkpoint, ex, ids, 70)
    assert any("long factors at every position" in m and "--max-model-len 64" in m
               for m in logs), logs
