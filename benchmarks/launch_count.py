"""Launches per decode step of an artifact's bound plans, per batch bucket: what the
decode-only CUDA graph of that bucket replays (a bucket with T == S leaves out the
launches a decode step has nothing for: attention's prefill path). Needs no GPU: the plans are bound (not run) on the CPU.

    python benchmarks/launch_count.py ARTIFACT                  # buckets 1, 16, 64
    python benchmarks/launch_count.py ARTIFACT --buckets 1,8 --by-kernel

At decode sizes a step's time is weight streaming plus about 1-2 us per launch, even
inside a graph; this counts the second part, so that a fusion's saving is known before a
GPU measures it. Extern calls (cuBLAS GEMMs and torch fallbacks) are launches too; views
bind to nothing and are not counted.

A second table counts what the host issues for one step of each bucket in each
cudagraph mode: graph replays plus the launches that run eagerly between them (mode none
launches everything; piecewise replays a graph per run of ops between attention layers
and launches attention eagerly; full replays one graph, for a mixed step as for a decode
one). Each costs the host several microseconds, which a step only hides if the GPU work
queued before it takes longer.
"""

from __future__ import annotations

import argparse
from collections import Counter


def _engine(artifact: str, buckets: list[int]):
    """An interpret-backend engine whose runner has bound every bucket's plan (not run)."""
    from braze.runtime import open_artifact
    from braze.runtime.engine import Engine
    art = open_artifact(artifact)
    return Engine(art, backend="interpret", num_kv_blocks=max(16, max(buckets)),
                  max_num_seqs=min(max(buckets), art.limits.max_num_seqs),
                  max_num_tokens=max(buckets), buckets=buckets)


def count(artifact: str, buckets: list[int], eng=None) -> dict[int, Counter]:
    """Per bucket, the launches of a decode-only step (one token per sequence): the bound
    plan less its decode-idle launches where the bucket has T == S (braze/launch.py)."""
    eng = eng or _engine(artifact, buckets)
    g = eng.runner.graphs
    out = {}
    for T in g.buckets:
        b = g._buckets[T]
        out[T] = Counter(c.name.split("#")[0] for c in b.plan.calls
                         if not (c.decode_idle and b.T == b.S))
    return out


def host_ops(artifact: str, buckets: list[int], eng=None) -> dict[int, dict[str, int]]:
    """Per bucket and cudagraph mode, the graph replays plus eager launches the host issues
    for one mixed step (a decode-only step at T == S issues the same or fewer)."""
    from braze.ir.segments import CUDAGRAPH_MODES
    from braze.runtime.graph_runner import step_runs
    eng = eng or _engine(artifact, buckets)
    g = eng.runner.graphs
    graph = eng.runner.executor.graph
    out = {}
    for T in g.buckets:
        calls = g._buckets[T].plan.calls
        row = {}
        for mode in CUDAGRAPH_MODES:
            _, runs = step_runs(graph, calls, mode)
            row[mode] = sum(1 if kind == "graph" else len(run) for kind, _, _, run in runs if run)
        out[T] = row
    return out


def _bucket_list(text: str) -> list[int]:
    try:
        buckets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
    if not buckets or buckets[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give step sizes of 1 token or more")
    return buckets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--buckets", default="1,16,64", type=_bucket_list,
                    help="comma list of step sizes in tokens (default 1,16,64)")
    ap.add_argument("--by-kernel", action="store_true", help="a line per kernel and bucket")
    args = ap.parse_args(argv)
    buckets = args.buckets
    from braze.ir.errors import BrazeError
    try:
        eng = _engine(args.artifact, buckets)
    except BrazeError as e:         # no artifact there, or buckets beyond its limits
        ap.error(f"--buckets {','.join(map(str, buckets))} on {args.artifact}: {e}")
    got = count(args.artifact, buckets, eng)
    print(f"{args.artifact}: launches per decode step of each bucket's bound plan")
    print("| bucket | launches | Triton kernels | extern calls |")
    print("|---:|---:|---:|---:|")
    for T, c in got.items():
        ext = sum(n for k, n in c.items() if k.startswith("extern."))
        print(f"| {T} | {sum(c.values())} | {sum(c.values()) - ext} | {ext} |")
    ops = host_ops(args.artifact, buckets, eng)
    print("\nhost operations per mixed step (graph replays + eager launches), per cudagraph mode")
    print("| bucket | none | piecewise | full |")
    print("|---:|---:|---:|---:|")
    for T, row in ops.items():
        print(f"| {T} | {row['none']} | {row['piecewise']} | {row['full']} |")
    if args.by_kernel:
        for T, c in got.items():
            print(f"\nbucket {T}:")
            for k, n in c.most_common():
                print(f"  {n:4d}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
