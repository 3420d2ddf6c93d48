"""The paged KV cache: per-layer block tensors (which sequence holds which block is
runtime/block_manager.py's business) and their default size.

Layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]` (the batch
contract, ir/contract.py). A token at position p of a sequence lives in block
`block_table[p // block_size]` at offset `p % block_size`, i.e. slot
`block * block_size + offset`.

A hybrid cache's shared pool (runtime/hybrid_cache.py) needs a block id to mean the same
memory in every KV cache group's layers: `share` lays the tensors out in slots, vLLM's
way. Group g's i-th cache tensor of a given per-block byte size is a view of slot i of
that size, a `[num_blocks, bytes]` buffer every group's i-th tensor of that size views,
so block b of any group is row b of the slots, one page. The page is the sum of the
slots: a group with fewer (or smaller) tensors than another leaves part of its pages
unused, which `page_waste` measures. Each view is a contiguous
`[num_blocks, block_size, heads, dim]` tensor, as the kernels expect.
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
        self.shared: list[list[str]] | None = None     # the groups' tensors, when shared
        self._allocate(num_blocks)

    def _allocate(self, num_blocks: int, per_tensor: dict[str, int] | None = None) -> None:
        per_tensor = per_tensor or {}
        self.tensors = {name: torch.zeros((per_tensor.get(name, num_blocks),) + shape,
                                          dtype=dtype, device=self.device)
                        for name, (shape, dtype) in self._layout.items()}
        self.num_blocks = num_blocks
        self.shared = None

    def slots_of(self, groups: list[list[str]]) -> dict[str, tuple[int, int]]:
        """Each cache tensor of `groups` (a list of tensor names per group) -> its slot:
        (its per-block bytes, its index among its group's tensors of that size)."""
        out = {}
        for names in groups:
            count: dict[int, int] = {}
            for name in names:
                z = self.bytes_per_block_of([name])
                out[name] = (z, count.get(z, 0))
                count[z] = count.get(z, 0) + 1
        return out

    def page_bytes(self, groups: list[list[str]]) -> int:
        """One block of a pool `groups` share: the bytes of all their slots."""
        return sum(z for z, _ in set(self.slots_of(groups).values()))

    def page_waste(self, groups: list[list[str]]) -> float:
        """The largest fraction of a shared page one group's block leaves unused."""
        page = self.page_bytes(groups)
        return max(1 - self.bytes_per_block_of(names) / page for names in groups)

    def share(self, num_blocks: int, groups: list[list[str]]) -> None:
        """Reallocate as one pool of `num_blocks` pages the groups share (see the module's
        docstring), dropping the contents; tensors in no group keep blocks of their own."""
        self.tensors = {}
        slots = self.slots_of(groups)
        bufs = {key: torch.zeros((num_blocks, key[0]), dtype=torch.uint8, device=self.device)
                for key in set(slots.values())}
        tensors = {}
        for name, (shape, dtype) in self._layout.items():
            if name in slots:
                tensors[name] = bufs[slots[name]].view(dtype).view((num_blocks,) + shape)
            else:
                tensors[name] = torch.zeros((num_blocks,) + shape, dtype=dtype, device=self.device)
        self.tensors = tensors
        self.num_blocks = num_blocks
        self.shared = [list(names) for names in groups]

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

    def resize(self, num_blocks: int, per_tensor: dict[str, int] | None = None,
               shared: list[list[str]] | None = None) -> None:
        """Reallocate for `num_blocks` (or, per cache tensor, `per_tensor`'s count: a hybrid
        cache's window groups have pools of their own size; or as one pool the `shared`
        groups' tensors share), dropping the contents: before the first step (which
        blocks hold what is the engine's block manager's business)."""
        self.tensors = {}
        if shared:
            self.share(num_blocks, shared)
        else:
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
                f"raise --gpu-memory-utilization (now {gpu_memory_utilization}), compile "
                f"with a smaller --max-model-len, or give --num-kv-blocks")
        return int(min(n, want))
    return int(max(min(want, cpu_bytes // per), min(max_blocks, want) or 1))
