"""Where a graph is cut for CUDA-graph capture: one rule, used by the split-segments pass
(which records the cut in the artifact) and by the runtime (for a mode it was not compiled
for).

An op whose registry entry says `graph_break=True` runs eagerly between captured graphs.

    none       one "eager" segment: nothing is captured
    piecewise  each break op is its own eager "break" segment; the runs of ops between
               them are "graph" segments, captured once per batch bucket
    full       one "graph" segment for the whole forward, break ops included: it serves
               any batch when every break op lowers to launches fixed by the bucket's
               sizes (our attention kernels), which only the runtime knows once it has
               bound the plans (runtime/graph_runner.py falls back to piecewise when a
               break op is bound as a torch call that reads the step on the host)

Segments are `[kind, first, last]` node indices (inclusive), covering every node once,
in order; an empty graph segment (adjacent breaks, a break first or last) is left out.
"""

from __future__ import annotations

CUDAGRAPH_MODES = ("none", "piecewise", "full")


def segments_for(g, mode: str) -> list[list]:
    n = len(g.nodes)
    if n == 0:
        return []
    if mode == "none":
        return [["eager", 0, n - 1]]
    if mode == "full":
        return [["graph", 0, n - 1]]
    out, start = [], 0
    for i, node in enumerate(g.nodes):
        if node.opdef.graph_break:
            if start < i:
                out.append(["graph", start, i - 1])
            out.append(["break", i, i])
            start = i + 1
    if start < n:
        out.append(["graph", start, n - 1])
    return out

