"""`braze compile` for a checkpoint with a multi-token-prediction layer (DeepSeek-V3's
num_nextn_predict_layers): the layer becomes a second, small graph of the artifact.

It is traced (frontend/mtp.py), optimised with the passes that need no step plan
(canonicalisation; at -O2 also merged projections and the fused MoE), its derived
weights are computed, and it is written beside the main graph (codegen/mtp_writer.py)
sharing the main graph's embedding and LM head. The runtime runs it with the reference
interpreter (runtime/mtp_proposer.py); it has no Triton launch plan of its own yet.
"""

from __future__ import annotations

from braze.frontend.mtp import trace_mtp, mtp_loader
from braze.ir import verify
from braze.passes import PassContext, PassManager

MTP_PASSES = {0: [], 1: ["canonicalize"],
              2: ["canonicalize", "merge-projections", "fuse-moe", "canonicalize"]}


def prepare_mtp(loaded, opts, main_graph, log):
    """-> (MTPGraph, its weight loader), or (None, None) when there is no MTP layer to
    compile (none in the checkpoint; an incomplete one, or a tensor-parallel artifact:
    then its tensors ship as they are and the runtime refuses method 'mtp')."""
    if not loaded.mtp:
        return None, None
    if opts.tensor_parallel_size > 1:
        log("MTP: not compiled into a graph for a tensor-parallel artifact (its shared LM "
            "head is sharded); the layer's tensors ship as they are")
        return None, None
    from braze.ir.errors import BrazeError
    from .compiler import materialize
    try:
        mtp = trace_mtp(loaded, opts.block_size, log=log)
    except BrazeError as e:
        # the main model is fine: compile it, and say why method 'mtp' will be refused
        log(f"note: {e}; the MTP layer is not compiled (speculative method 'mtp' will be "
            f"refused), its tensors ship as they are")
        return None, None
    graph = mtp.graph
    verify(graph)
    names = MTP_PASSES[min(opts.opt_level, 2)]
    if names:
        PassManager(names, ctx=PassContext(options=opts.to_json())).run(graph)
        verify(graph)
    load = materialize(graph, mtp_loader(loaded, mtp))
    for name in mtp.shared:
        main = main_graph.params.get(name)
        if main is None or main.type != graph.params[name].type:
            log(f"MTP: the main graph's {name} is not the one the MTP layer reads after "
                f"optimisation; the layer's tensors ship as they are")
            return None, None
    return mtp, load
