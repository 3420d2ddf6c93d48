"""Collectives across the ranks of a tensor-parallel group, and the vocab-parallel lookup.

The `shard` pass (passes/shard.py) writes these into the graph of one rank; every rank
runs the same graph over its own weight shards (SPMD). Their reference implementations
call torch.distributed on the default process group (gloo on CPUs, NCCL on GPUs), which
the runtime initialises before the first step (runtime/parallel.py). With a
`group_size` of 1 they are the identity; with more and no process group they refuse,
naming what is missing, rather than compute one rank's partial result.

    %5: f32[T, 64] = all_reduce(%4) {group_size=2}          sum over the ranks
    %9: f32[T, 256] = all_gather(%8) {group_size=2}         %8: f32[T, 128]; rank order
    %9: f32[T, 301] = all_gather(%8) {group_size=2, size=301}
                                                              %8: f32[T, 160]; the first 301
                                                              of the 320 (a padded vocabulary)
    %0: f32[T, 64] = embedding_shard(%input_ids, @w, @tp.vocab_start)
                                                              rows of ids outside this rank's
                                                              vocab slice are zero

Neither collective is a graph break: NCCL collectives are capturable in CUDA graphs, so
they stay inside captured segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import BrazeError
from .ops import REQUIRED, OpDef, register
from .types import TensorType


def group_world(group_size: int, op: str) -> int:
    """The size of the initialised default process group, checked against `group_size`."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise BrazeError(f"{op} over {group_size} ranks needs a torch.distributed process group "
                         f"of {group_size} ranks and none is initialised; run a tensor-parallel "
                         f"artifact with `braze generate`, `braze serve`, braze.LLM or torchrun")
    world = dist.get_world_size()
    if world != group_size:
        raise BrazeError(f"{op} expects {group_size} ranks, the process group has {world}")
    return world


def _group_size(attrs: dict, op: str) -> int:
    n = attrs["group_size"]
    if not isinstance(n, int) or n < 1:
        raise BrazeError(f"{op}: group_size must be a positive int, got {n!r}")
    return n


def _all_reduce_infer(types, attrs):
    _group_size(attrs, "all_reduce")
    return [types[0]]


def all_reduce(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size == 1:
        return x.clone()
    group_world(group_size, "all_reduce")
    out = x.contiguous().clone()      # functional: the operand is left as it was
    torch.distributed.all_reduce(out)
    return out


register(OpDef("all_reduce", ("x",), _all_reduce_infer, all_reduce,
               attrs={"group_size": REQUIRED}, extern=True, returns_dense=True,
               doc="the elementwise sum of x over the ranks of the tensor-parallel group"))


def _all_gather_infer(types, attrs):
    n = _group_size(attrs, "all_gather")
    (x,) = types
    if x.rank < 1:
        raise BrazeError(f"all_gather: needs at least 1-D input, got {x}")
    whole = x.shape[-1] * n
    size = attrs.get("size")
    if size is not None and not (isinstance(size, int) and 0 < size <= whole):
        raise BrazeError(f"all_gather: size must be an int in [1, {whole}] (the gathered "
                         f"last dim), got {size!r}")
    return [TensorType(x.shape[:-1] + (whole if size is None else size,), x.dtype)]


def all_gather(x: torch.Tensor, group_size: int, size: int | None = None) -> torch.Tensor:
    if group_size == 1:
        out = x.clone()
    else:
        group_world(group_size, "all_gather")
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(group_size)]
        torch.distributed.all_gather(parts, x)
        out = torch.cat(parts, dim=-1)
    return out if size is None or size == out.shape[-1] else out[..., :size].contiguous()


# row i of the result depends only on row i of each rank's x: prune-logits may gather the
# sampled rows before it (every rank gathers the same rows)
register(OpDef("all_gather", ("x",), _all_gather_infer, all_gather,
               attrs={"group_size": REQUIRED, "size": None}, extern=True, returns_dense=True,
               last_dim_rowwise=True,
               doc="the last dim of x concatenated over the ranks, in rank order; with "
                   "`size`, only its first `size` entries (a padded vocabulary's real ones)"))


def _embedding_shard_infer(types, attrs):
    ids, w, start = types
    if ids.dtype not in ("i64", "i32") or w.rank != 2:
        raise BrazeError(f"embedding_shard: needs integer ids and a 2-D table, got {ids} and {w}")
    if start.shape != (1,) or start.dtype != "i64":
        raise BrazeError(f"embedding_shard: start must be i64[1], got {start}")
    return [TensorType(ids.shape + (w.shape[1],), w.dtype)]


def embedding_shard(ids: torch.Tensor, weight: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    local = ids - start
    inside = (local >= 0) & (local < weight.shape[0])
    out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), weight)
    return out * inside.unsqueeze(-1).to(out.dtype)


register(OpDef("embedding_shard", ("ids", "weight", "start"), _embedding_shard_infer,
               embedding_shard, extern=True, returns_dense=True,
               doc="weight[ids - start] for the ids in this rank's vocab slice "
                   "[start, start + rows), zero for the others (summed over ranks, the lookup)"))
