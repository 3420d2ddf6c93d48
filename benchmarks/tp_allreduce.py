#!/usr/bin/env python
"""Collective traffic of a tensor-parallel decode step, from the compiled graph, against
an NVLink roofline.

For each full-size model shape (config.json only, no weights; shapes from
compile_time.py) and tensor-parallel size N, the traced graph goes through the `shard`
pass and the -O2 pipeline as `braze compile --tensor-parallel-size N` runs them. Every
`all_reduce` and `all_gather` left in the graph is counted at a decode step of B
sequences (T = S = R = B), in bfloat16:

  payload   the bytes of each collective's result
  wire      what each rank sends in a ring: 2 (N-1)/N x payload for an all-reduce,
            (N-1)/N x payload for an all-gather
  roofline  wire / NVLink bandwidth per direction (H100 NVLink 4: 450 GB/s each way),
            a lower bound on the step's communication time, latency excluded

With `--expert-parallel` every MoE model is also compiled with `--expert-parallel`
(whole experts per rank) and printed beside its tensor-parallel row; the `experts x
inter` column is the fused MoE's expert weights on one rank (experts held x intermediate
size of each), which is what differs: the collectives are the same (one all-reduce after
each MoE block either way).

    python benchmarks/tp_allreduce.py
    python benchmarks/tp_allreduce.py --models llama3-8b --tp 2 4 8 --batch 1 64
    python benchmarks/tp_allreduce.py --models qwen3-30b-a3b --tp 2 4 8 --expert-parallel
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

NVLINK_GBS = 450.0      # H100 SXM NVLink 4, per direction


def collectives(model: str, n: int, expert_parallel: bool = False):
    """The collectives of the compiled graph, and each fused MoE's (experts, intermediate)
    held on one rank."""
    from compile_time import write_config

    from braze.config import CompileOptions
    from braze.frontend import load_model
    from braze.passes import PassContext, PassManager
    with tempfile.TemporaryDirectory() as d, contextlib.redirect_stderr(io.StringIO()):
        write_config(model, d)
        loaded = load_model(d, with_weights=False)
        opts = CompileOptions(dtype="bfloat16", max_model_len=4096, max_num_tokens=8192,
                              tensor_parallel_size=n, expert_parallel=expert_parallel)
        opts.dtype = loaded.dtype
        ctx = PassContext(options=opts.to_json())
        PassManager(["shard"] + PassManager.for_level(2).names(), ctx=ctx).run(loaded.graph)
    g = loaded.graph
    moe = {(node.operands[3].type.shape[0], node.operands[3].type.shape[2])
           for node in g.nodes if node.op in ("fused_moe", "fused_moe_routed")}
    return [(node.op, node.results[0].type) for node in g.nodes
            if node.op in ("all_reduce", "all_gather")], moe


def main(argv=None) -> None:
    from compile_time import MODELS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama3-8b", "qwen3-30b-a3b"],
                    choices=sorted(MODELS))
    ap.add_argument("--tp", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--expert-parallel", action="store_true",
                    help="also compile MoE models with --expert-parallel and compare")
    a = ap.parse_args(argv)
    for flag, values, least in (("--tp", a.tp, 2), ("--batch", a.batch, 1)):
        if min(values) < least:
            ap.error(f"{flag} {min(values)}: give {least} or more")
    from braze.ir.errors import BrazeError
    print("| model | TP | mode | experts x inter /rank | batch | all_reduce | all_gather "
          "| payload MiB | wire MiB/rank | NVLink roofline us |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for model in a.models:
        for n in a.tp:
            try:
                cs, moe = collectives(model, n)
                _rows(model, n, "TP", moe, cs, a.batch)
                if a.expert_parallel and moe:      # a dense model has no experts to place
                    cs, moe = collectives(model, n, expert_parallel=True)
                    _rows(model, n, "EP", moe, cs, a.batch)
            except BrazeError as e:     # a size the model's heads or experts do not divide
                ap.error(f"--models {model} --tp {n}: {e}")


def _rows(model, n, mode, moe, cs, batches):
    shape = ", ".join(f"{e}x{i}" for e, i in sorted(moe)) or "-"
    ar = sum(op == "all_reduce" for op, _ in cs)
    for b in batches:
        bind = {"T": b, "S": b, "R": b}     # R: the logits rows, one per sequence
        payload = wire = 0.0
        for op, t in cs:
            nbytes = 2
            for d in t.concrete_shape(bind):
                nbytes *= d
            payload += nbytes
            wire += nbytes * (n - 1) / n * (2 if op == "all_reduce" else 1)
        print(f"| {model} | {n} | {mode} | {shape} | {b} | {ar} | {len(cs) - ar} "
              f"| {payload / 2**20:.2f} | {wire / 2**20:.2f} "
              f"| {wire / (NVLINK_GBS * 1e9) * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
