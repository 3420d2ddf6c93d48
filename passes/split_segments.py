"""split-segments: cut the schedule into the pieces the runtime captures as CUDA graphs
(the rule itself is ir/segments.py's, which the runtime shares).

An op whose registry entry says `graph_break=True` runs eagerly between captured
graphs in piecewise mode. Attention is one: our kernels' grids depend only on T, S
and MB, so mode full captures them too, but the cut keeps piecewise mode open to
attention lowerings whose launch depends on per-step metadata (a torch call that
reads the step on the host). With `cudagraph_mode` (a compile option):

    piecewise  every break op is its own eager "break" segment; the runs of ops
               between them are "graph" segments, captured once per batch bucket
    full       one "graph" segment for the whole forward, break ops included, which
               the runtime captures once per bucket for every batch (and once more
               for decode-only steps at buckets with T == S); if a break op is bound
               as a host-reading torch call it replays the piecewise cut instead
    none       one "eager" segment: nothing is captured

Segments are `[kind, first_node_index, last_node_index]` (inclusive), cover every
node exactly once and in order; an empty graph segment (two adjacent breaks, a
break first or last) is not emitted. `graph_breaks` counts the break segments.

Before (cudagraph_mode="piecewise"):
    %0: f32[T, 2, 4] = mul(%q) {scalar=2.0}
    %1: f32[T, 2, 4] = paged_attention(%0, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.5}
    %2: f32[T, 2, 4] = add(%1, %q)
    %3: f32[T, 2, 4] = paged_attention(%2, %k_cache.0, %v_cache.0, %query_start_loc, %seq_lens, %block_tables) {scale=0.5}
    %4: f32[T, 2, 4] = neg(%3)
After: the same nodes, and
    meta {segments=[["graph", 0, 0], ["break", 1, 1], ["graph", 2, 2], ["break", 3, 3], ["graph", 4, 4]], graph_breaks=2, cudagraph_mode="piecewise"}

The indices point into `g.nodes`: any pass that adds, removes or reorders nodes
afterwards invalidates them, which is why this pass runs (with plan-memory) last.
"""

from __future__ import annotations

from braze.ir import Graph
from braze.ir.errors import BrazeError
from braze.ir.segments import CUDAGRAPH_MODES, segments_for

from .manager import PassContext, register_pass

@register_pass("split-segments", stage="schedule", options=("cudagraph_mode",))
def split_segments(g: Graph, ctx: PassContext) -> int:
    """Record g.meta["segments"] (graph / break / eager runs of nodes) for CUDA-graph capture."""
    mode = ctx.option("cudagraph_mode", "piecewise")
    if mode not in CUDAGRAPH_MODES:
        raise BrazeError(f"cudagraph_mode must be one of {', '.join(CUDAGRAPH_MODES)}, got {mode!r}")
    segments = segments_for(g, mode)
    g.meta["segments"] = segments
    g.meta["graph_breaks"] = sum(1 for s in segments if s[0] == "break")
    g.meta["cudagraph_mode"] = mode
    g.meta.pop("full_capture", None)      # written by earlier versions; the runtime decides
    return len(segments)
