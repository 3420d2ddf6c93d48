"""The paged KV cache: per-layer block tensors (which sequence holds which block is
runtime/block_manager.py's business) and their default size.

Layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]` (the batch
contract, ir/contract.py). A token at position p of a sequence lives in block
`block_table[p // block_size]` at offset `p % block_size`, i.e. slot
`block * block_size + offset`.
"""

from __future__ import annotations

import torch

from braze.ir import Graph
from braze.ir.contract import CACHE_PREFIXES
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype


class KVCache:
    def __init__(self, graph: Graph, num_blocks: int, device="cpu"):
        self.tensors: dict[str, torch.Tensor] = {}
        self.block_size = None
        self._layout = {}
        for v in graph.inputs:
            if v.name.startswith(CACHE_PREFIXES):
                _, bs, heads, dim = v.type.shape
                self.block_size = bs
                self._layout[v.name] = ((bs, heads, dim), torch_dtype(v.type.dtype))
        if self.block_size is None:
            raise BrazeError(f"graph @{graph.name} has no k_cache inputs: not a decoder graph")
        self.device = device
        self._allocate(num_blocks)

    def _allocate(self, num_blocks: int, per_tensor: dict[str, int] | None = None) -> None:
        per_tensor = per_tensor or {}
        self.tensors = {name: torch.zeros((per_tensor.get(name, num_blocks),) + shape,
                                          dtype=dtype, device=self.device)
                        for name, (shape, dtype) in self._layout.items()}
        self.num_blocks = num_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_block_of(self._layout)

    def bytes_per_block_of(self, names) -> int:
        """The bytes of one block of the caches `names` (a KV cache group's layers)."""
        total = 0
        for name in names:
            shape, dtype = self._layout[name]
            n = dtype.itemsize
            for d in shape:
                n *= d
            total += n
        return total

    def resize(self, num_blocks: int, per_tensor: dict[str, int] | None = None) -> None:
        """Reallocate for `num_blocks` (or, per cache tensor, `per_tensor`'s count: a hybrid
        cache's window groups have pools of their own size), dropping the contents: before
        the first step (which blocks hold what is the engine's block manager's business)."""
        self.tensors = {}
        self._allocate(num_blocks, per_tensor)

    def group_names(self, layers) -> list[str]:
        """The cache tensors of `layers` (a KV cache group's)."""
        want = {str(x) for x in layers}
        return [n for n in self._layout if n.rsplit(".", 1)[1] in want]


def default_num_blocks(cache: KVCache, device, max_num_seqs: int, max_blocks: int,
                       reserve_bytes: int = 0, gpu_memory_utilization: float = 0.9,
                       cpu_bytes: int = 1 << 30, bytes_per_block: int | None = None) -> int:
    """How many KV blocks to allocate when the user does not say.

    On a GPU: what is left of `gpu_memory_utilization` of the device after the weights
    (already loaded) and `reserve_bytes` (activations, CUDA graph pool). On the CPU: enough
    for every sequence at full length, capped at `cpu_bytes`, but always one full sequence.
    `bytes_per_block`: a block's bytes when not every cache tensor has one per block (the
    full-attention group of a hybrid cache, runtime/hybrid_cache.py).
    """
    per = bytes_per_block or cache.bytes_per_block
    want = max_num_seqs * max_blocks
    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        budget = free - int((1 - gpu_memory_utilization) * total) - reserve_bytes
        n = budget // per
        if n < max_blocks:
            raise BrazeError(
                f"not enough GPU memory for the KV cache: {max(budget, 0) >> 20} MiB left after "
                f"the weights holds {max(n, 0)} blocks, one full sequence needs {max_blocks}; "
                f"compile with a smaller --max-model-len or pass num_kv_blocks")
        return int(min(n, want))
    return int(max(min(want, cpu_bytes // per), min(max_blocks, want) or 1))
