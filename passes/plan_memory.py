"""plan-memory: place every intermediate in one static arena, reusing space by liveness.

Captured CUDA graphs bake in their buffers' addresses, so every intermediate gets
a fixed offset in one arena allocated once, shared by all segments and all batch
buckets. Sizes are the worst case, with the symbols bound from the compile options:
T = max_num_tokens, S = max_num_seqs, MB = ceil(max_model_len / block_size); a
smaller step uses the first bytes of each slot, at the same offsets.

What is planned: node results. Graph inputs and params have their own storage;
graph outputs are returned to the caller, so they (and any value an output is a
view of) are left out and listed under "returned". A value lives from its
defining node to its last reader, both inclusive: a kernel never writes its
result over an operand it is still reading. Results of view ops (reshape,
permute, unsqueeze, squeeze, expand, slice, select, split) are strided views in
the kernels: they take no space, are listed under "aliases" with the value that
owns their storage (`%name`, or `@param`; a view that is an output is listed in
both), and keep that owner alive until their own last reader. A reshape that
torch could not express as a view of its source's strides (a flatten after a
transpose or a strided slice) is a copy with its own buffer; strides are found
by running the view ops on meta tensors at two probe sizes.

`buffers` holds each planned value's [offset, nbytes] (nbytes unrounded; offsets
256-byte aligned). Offsets come from two placements, keeping the smaller arena:
walking the schedule with a best-fit allocator over the freed intervals, and
placing the largest values first, each into the tightest gap among the values
whose lifetimes overlap its own (greedy by size; on the traced llama, mistral,
qwen3 and mixtral graphs it reaches the lower bound, the largest live set).

Before:
    %0: f32[T, 64] = neg(%x)
    %1: f32[T, 64] = exp(%0)
    %2: f32[T, 64] = neg(%1)
    %3: f32[64*T] = reshape(%1) {shape=[-1]}
    %4: f32[64*T] = exp(%3)
    %5: f32[64*T] = reshape(%2) {shape=[-1]}
    %6: f32[64*T] = add(%4, %5)
After (max_num_tokens=4): the same nodes, and
    meta {memory={"arena_bytes": 3072, "alignment": 256, "bindings": {"T": 4, "S": 256, "MB": 128, "R": 256},
          "buffers": {"0": [0, 1024], "1": [1024, 1024], "2": [0, 1024], "4": [2048, 1024]},
          "aliases": {"3": "%1", "5": "%2"}, "returned": ["6"]}}
(on one line; %2 reuses %0's bytes, %1 stays live through its view %3.)

Lifetimes are node indices: a pass that changes nodes afterwards invalidates the plan,
which is why this pass runs last.
"""

from __future__ import annotations

import bisect

from braze.ir import Graph
from braze.ir.contract import StepLimits
from braze.ir.errors import BrazeError
from braze.ir.layout import Layouts
from braze.ir.types import SYMBOLS, TensorType, torch_dtype

from .manager import PassContext, register_pass

ALIGN = 256
BY_SIZE_BUDGET = 1_000_000


def bindings_from(ctx: PassContext) -> dict[str, int]:
    return StepLimits.from_options(ctx.options).bindings()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _FreeList:
    """Best-fit over free intervals; space freed at the top lowers the used end."""

    def __init__(self):
        self.free: list[list[int]] = []     # [offset, size], sorted by offset, coalesced
        self.end = 0
        self.peak = 0

    def alloc(self, size: int) -> int:
        best = None
        for i, (off, sz) in enumerate(self.free):
            if sz >= size and (best is None or sz < self.free[best][1]):
                best = i
        if best is None:
            off = self.end
            self.end += size
            self.peak = max(self.peak, self.end)
            return off
        off, sz = self.free[best]
        if sz == size:
            del self.free[best]
        else:
            self.free[best] = [off + size, sz - size]
        return off

    def release(self, off: int, size: int) -> None:
        i = bisect.bisect(self.free, [off, size])
        if i < len(self.free) and off + size == self.free[i][0]:
            size += self.free.pop(i)[1]
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == off:
            off, size = self.free[i - 1][0], self.free[i - 1][1] + size
            del self.free[i - 1]
            i -= 1
        if off + size == self.end:
            self.end = off
        else:
            self.free.insert(i, [off, size])


def place_in_order(bufs: list[tuple], n_nodes: int) -> tuple[dict, int]:
    """Online: walk the schedule, best-fit each new value into the space freed so far.
    `bufs` is [(name, first, last, aligned_size)] in definition order."""
    arena, offsets, dies_at = _FreeList(), {}, {}
    for name, first, last, size in bufs:
        dies_at.setdefault(last, []).append((name, size))
    pos = 0
    for i in range(n_nodes):
        while pos < len(bufs) and bufs[pos][1] == i:
            name, _, _, size = bufs[pos]
            offsets[name] = arena.alloc(size)
            pos += 1
        for name, size in dies_at.get(i, ()):
            arena.release(offsets[name], size)
    return offsets, arena.peak


def place_by_size(bufs: list[tuple], n_nodes: int) -> tuple[dict, int]:
    """Offline (greedy by size): largest first, each into the tightest gap left by the
    already placed values whose lifetimes overlap its own."""
    live_at: list[list] = [[] for _ in range(n_nodes)]
    offsets, peak = {}, 0
    for name, first, last, size in sorted(bufs, key=lambda b: (-b[3], b[1])):
        seen, busy = set(), []
        for i in range(first, last + 1):
            for other, osize in live_at[i]:
                if other not in seen:
                    seen.add(other)
                    busy.append((offsets[other], offsets[other] + osize))
        best, best_gap, prev = None, None, 0
        for lo, hi in sorted(busy):
            if lo - prev >= size and (best_gap is None or lo - prev < best_gap):
                best, best_gap = prev, lo - prev
            prev = max(prev, hi)
        offsets[name] = prev if best is None else best
        peak = max(peak, offsets[name] + size)
        for i in range(first, last + 1):
            live_at[i].append((name, size))
    return offsets, peak


def _overlap_work(bufs: list[tuple], n_nodes: int) -> int:
    delta = [0] * (n_nodes + 1)
    for _, first, last, _ in bufs:
        delta[first] += 1
        delta[last + 1] -= 1
    live = work = 0
    for d in delta:
        live += d
        work += live * live
    return work


def plan(g: Graph, bindings: dict[str, int], placers=None) -> dict:
    """The memory plan for g (see the module docstring), as a printable dict.
    `placers` (tests) forces the placement heuristics to try."""
    owner: dict = {}           # view result -> the value that owns its storage
    layouts = Layouts()        # every planned value is a dense slot of the arena
    last: dict = {}
    for i, node in enumerate(g.nodes):
        for v in node.operands:
            last[v] = i
        if node.opdef.view:
            if not layouts.is_view(node):
                continue            # a reshape torch cannot view: it gets its own buffer
            src = node.operands[0]
            for r in node.results:
                owner[r] = owner.get(src, src)

    returned = set()
    for v in g.outputs.values():
        returned.add(v)
        if v in owner:
            returned.add(owner[v])
    end: dict = {}
    for v, o in owner.items():
        end[o] = max(end.get(o, -1), last.get(v, -1))

    sizes: dict = {}
    subs = {SYMBOLS[k]: n for k, n in bindings.items()}

    def nbytes(t: TensorType) -> int:
        if t not in sizes:
            numel = t.numel()
            if not isinstance(numel, int):
                unbound = numel.free_symbols - set(subs)
                if unbound:
                    raise BrazeError(f"cannot size {t} for the static arena: "
                                     f"{', '.join(sorted(map(str, unbound)))} has no upper bound")
                numel = int(numel.subs(subs))
            sizes[t] = numel * torch_dtype(t.dtype).itemsize
        return sizes[t]

    bufs, raw = [], {}
    for i, node in enumerate(g.nodes):
        for r in node.results:
            if r not in owner and r not in returned:
                raw[r.name] = nbytes(r.type)
                if raw[r.name]:
                    bufs.append((r.name, i, max(i, last.get(r, i), end.get(r, i)),
                                 _aligned(raw[r.name])))
    # two heuristics, neither always better: keep the smaller arena. The greedy-by-size
    # scan costs about sum(live values at each node ** 2); skip it where that explodes.
    if placers is None:
        placers = [place_in_order]
        if _overlap_work(bufs, len(g.nodes)) <= BY_SIZE_BUDGET:
            placers.append(place_by_size)
    offsets, peak = min((place(bufs, len(g.nodes)) for place in placers), key=lambda p: p[1])
    return {
        "arena_bytes": peak,
        "alignment": ALIGN,
        "bindings": dict(bindings),
        "buffers": {name: [offsets.get(name, 0), n] for name, n in raw.items()},
        "aliases": {v.name: o.ref for v, o in owner.items()},
        "returned": [r.name for n in g.nodes for r in n.results if r in returned],
    }


# after split-segments: the arena it plans is the one the segments share
@register_pass("plan-memory", stage="schedule", after=("split-segments",),
               options=tuple(StepLimits.__dataclass_fields__))
def plan_memory(g: Graph, ctx: PassContext) -> int:
    """Record g.meta["memory"]: one static arena, each intermediate's offset, views as aliases."""
    g.meta["memory"] = plan(g, bindings_from(ctx))
    return len(g.meta["memory"]["buffers"])
