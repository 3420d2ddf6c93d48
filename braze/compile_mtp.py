"""`braze compile` for a checkpoint with a multi-token-prediction layer (DeepSeek-V3's
num_nextn_predict_layers): the layer becomes a second, small graph of the artifact.

It is traced (frontend/mtp.py), optimised with the passes that need no step plan
(canonicalisation; at -O2 the main pipeline's fusions, logits pruned to the sampled
rows, no segments or memory plan), its derived
weights are computed, and it is written beside the main graph (codegen/mtp_writer.py)
sharing the main graph's embedding and LM head. braze/compiler.py lowers it into a
launch plan of its own (codegen/plan.py, written by codegen/emit.py emit_mtp_kernels),
which runtime/mtp_proposer.py runs with backend interpret or cuda (the reference
interpreter with backend reference).

`prepare_assistant` does the same for Gemma 4's assistant model (`--mtp-assistant DIR`,
frontend/gemma4_assistant.py), run by runtime/assistant_proposer.py.
"""

from __future__ import annotations

from braze.frontend.mtp import trace_mtp, mtp_loader
from braze.ir import verify
from braze.passes import PassContext, PassManager
from braze.passes.manager import pipeline
from braze.passes.shard import rank_loader

from .compiler import materialize

# -O2: the main pipeline's fusions (prune-logits too: the proposer samples one row per
# sequence), but no segments or memory plan: the MTP calls run eagerly, in shapes the
# main graph's buckets do not bound (a catch-up covers every new position)
_EAGER = ("split-segments", "plan-memory")


def mtp_passes(opt_level: int) -> list[str]:
    if opt_level < 2:
        return [] if opt_level == 0 else ["canonicalize"]
    return [p for p in pipeline(2) if p not in _EAGER]


def prepare_mtp(loaded, opts, main_graph, log, main_shards=None):
    """-> (MTPGraph, its weight loader: one per rank of a tensor-parallel artifact, its
    shards in `MTPGraph.shards`), or (None, None) when there is no MTP layer to compile
    (none in the checkpoint, or an incomplete one: then its tensors ship as they are and
    the runtime refuses method 'mtp'). `main_shards`: the main graph's weight slices (the
    shard pass's records), which the shared embedding and LM head must match."""
    if not loaded.mtp:
        return None, None
    from braze.ir.errors import BrazeError
    try:
        mtp = trace_mtp(loaded, opts.block_size, log=log)
    except BrazeError as e:
        # the main model is fine: compile it, and say why method 'mtp' will be refused
        log(f"note: {e}; the MTP layer is not compiled (speculative method 'mtp' will be "
            f"refused), its tensors ship as they are")
        return None, None
    load, bad = _optimise(loaded, opts, mtp, main_graph, main_shards or {})
    if bad:
        log(f"MTP: the main graph's {bad} is not the one the MTP layer reads after "
            f"optimisation; the layer's tensors ship as they are")
        return None, None
    return mtp, load


def _optimise(loaded, opts, mtp, main_graph, main_shards=None):
    """Run the MTP passes on the second graph (the shard pass first for a tensor-parallel
    artifact, as for the main graph) and derive its weights: -> (its loader, or one per
    rank; the first shared param or cache the main graph no longer has as the graph reads
    it, or whose slices per rank differ from the main graph's)."""
    graph = mtp.graph
    verify(graph)
    tp = opts.tensor_parallel_size
    names = (["shard"] if tp > 1 else []) + mtp_passes(opts.opt_level)
    ctx = PassContext(options=opts.to_json())
    if names:
        PassManager(names, ctx=ctx).run(graph)
        verify(graph)
    shards = ctx.records.get("shards", {})
    mtp.shards = {n: s for n, s in shards.items() if n not in mtp.shared}
    if tp > 1:
        load = materialize(graph, None, [rank_loader(mtp_loader(loaded, mtp), shards, r)
                                         for r in range(tp)])
    else:
        load = materialize(graph, mtp_loader(loaded, mtp))
    for name in mtp.shared:
        main = main_graph.params.get(name)
        if main is None or main.type != graph.params[name].type:
            return load, name
        if tp > 1 and (main_shards or {}).get(name) != shards.get(name):
            return load, f"{name} (split across ranks differently)"
    main_inputs = {v.name: v.type for v in main_graph.inputs}
    for v in graph.inputs:
        if v.name.startswith("k_cache.") or v.name.startswith("v_cache."):
            if main_inputs.get(v.name) != v.type:
                return load, v.name
    return load, None


def prepare_assistant(loaded, opts, main_graph, kv_groups, assistant_dir, log,
                      traced_inputs=None, main_shards=None):
    """-> (MTPGraph, its weight loader, or one per rank) for Gemma 4's assistant in
    `assistant_dir`; widens the target's window groups in `kv_groups` (the manifest's) to
    what it reads. `traced_inputs`: the target's inputs before sharding (the assistant is
    traced whole, then sharded like the target)."""
    from braze.frontend.gemma4_assistant import assistant_windows, trace_assistant
    from braze.ir.errors import BrazeError
    mtp = trace_assistant(loaded, assistant_dir, opts.block_size, kv_groups, log=log,
                          cache_types=traced_inputs)
    load, bad = _optimise(loaded, opts, mtp, main_graph, main_shards)
    if bad:
        raise BrazeError(f"--mtp-assistant: the optimised target's {bad} is not the one the "
                         f"assistant reads; compile with --opt-level 0 and report this")
    assistant_windows(mtp.graph, kv_groups)
    return mtp, load
