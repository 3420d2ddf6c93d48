"""Run an artifact's graph one step at a time.

Backends: `reference` runs the IR interpreter with torch on any device. The
`cuda` and `interpret` backends (Triton kernels, launch plans, CUDA graphs)
arrive with the codegen work; asking for them now says so.
"""

from __future__ import annotations

import torch

from braze.ir import run_graph
from braze.ir.errors import BrazeError

from .batch import SeqChunk, build_step
from .kv_cache import KVCache
from .loader import Artifact

BACKENDS = ("auto", "cuda", "reference", "interpret")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise BrazeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "reference"
    if backend in ("cuda", "interpret"):
        raise BrazeError(f"backend {backend!r} needs compiled kernels, which this braze version "
                         f"does not build yet; use --backend reference")
    return backend


class Executor:
    def __init__(self, artifact: Artifact, backend: str = "auto", device: str | None = None,
                 num_blocks: int | None = None):
        self.backend = resolve_backend(backend)
        self.artifact = artifact
        self.graph = artifact.graph
        self.device = torch.device(device or "cpu")
        self.params = artifact.load_weights(self.device)
        opts = artifact.options
        self.max_model_len = int(opts["max_model_len"])
        block_size = int(opts["block_size"])
        self.max_blocks = -(-self.max_model_len // block_size)
        if num_blocks is None:
            num_blocks = self.max_blocks * min(int(opts.get("max_num_seqs", 1)), 4)
        self.cache = KVCache(self.graph, num_blocks, self.device)
        # after prune-logits the graph computes logits only for the sampled rows ([S, vocab])
        self.logits_pruned = str(self.graph.outputs["logits"].type.shape[0]) == "S"

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    def step_inputs(self, chunks: list[SeqChunk]) -> dict[str, torch.Tensor]:
        return build_step(chunks, self.block_size, self.max_blocks, device=self.device)

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run one step; returns the graph's logits: every token's, or each sequence's
        sampled row if the graph was compiled with prune-logits."""
        feeds = dict(inputs)
        feeds.update(self.cache.tensors)
        return run_graph(self.graph, feeds, self.params)["logits"]

    def step(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run one step; returns the logits of each sequence's last new token [S, vocab]."""
        inputs = self.step_inputs(chunks)
        logits = self.run(inputs)
        if self.logits_pruned:
            return logits
        return logits.index_select(0, inputs["logits_indices"])
