#!/usr/bin/env python
"""Compile-time benchmark of the braze frontend on full-size model shapes.

For each model shape, only `config.json` is written to a temporary directory
(no weights), then we time:

  trace   braze.frontend.load_model(dir, with_weights=False): AutoConfig read,
          model built on the meta device, torch.fx trace, mapping to braze IR
  verify  braze.ir.verify(graph)
  print   braze.ir.print_graph(graph)            (graph -> text)
  parse   braze.ir.parse_graph(text)             (text -> graph)

The round trip is checked (untimed): the parsed graph verifies and prints to
the same text. Each repeat runs in a fresh Python process by default (cold
state: fx, AutoConfig and op-registry caches empty; imports are timed apart
and not counted in `trace`), and the best of `--repeat` runs is reported.

DESIGN target: trace under 5 s per model on a 2-core CPU.

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --repeat 5 --json results.json
    python benchmarks/compile_time.py --models llama3-8b --profile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

TARGET_TRACE_S = 5.0
PHASES = ("trace", "verify", "print", "parse")


# -- model shapes -------------------------------------------------------------

def llama3_8b_config():
    from transformers import LlamaConfig
    return LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        dtype="bfloat16", architectures=["LlamaForCausalLM"])


def qwen3_30b_a3b_config():
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        intermediate_size=6144, vocab_size=151936, norm_topk_prob=True,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"])


MODELS = {
    "llama3-8b": llama3_8b_config,
    "qwen3-30b-a3b": qwen3_30b_a3b_config,
}


# -- one measurement ------------------------------------------------------------

def write_config(model: str, model_dir: str) -> None:
    """Write only config.json for `model` into `model_dir` (no weights, no tokenizer)."""
    MODELS[model]().save_pretrained(model_dir)


def measure(model: str, model_dir: str) -> dict:
    """Run the four phases once on the config in `model_dir`; return timings and sizes.

    The config is written by the caller (in another process by default): building a
    transformers config class in code imports modules (e.g. `LlamaConfig` pulls in
    torch._dynamo) that a real `load_model` of a model directory would pay for itself.
    """
    t0 = time.perf_counter()
    import torch
    import transformers

    import braze.ir as ir
    from braze.frontend import load_model
    import_s = time.perf_counter() - t0

    files = sorted(os.listdir(model_dir))
    log_lines: list[tuple[float, str]] = []
    t = time.perf_counter()
    loaded = load_model(model_dir, with_weights=False,
                        log=lambda line: log_lines.append((time.perf_counter() - t, line)))
    trace_s = time.perf_counter() - t
    graph = loaded.graph

    t = time.perf_counter()
    ir.verify(graph)
    verify_s = time.perf_counter() - t

    t = time.perf_counter()
    text = ir.print_graph(graph)
    print_s = time.perf_counter() - t

    t = time.perf_counter()
    parsed = ir.parse_graph(text)
    parse_s = time.perf_counter() - t

    ir.verify(parsed)
    if ir.print_graph(parsed) != text:
        raise SystemExit(f"{model}: print -> parse -> print is not the identity")

    elements = 0
    for p in graph.params.values():
        shape = p.type.shape
        if all(isinstance(d, int) for d in shape):
            elements += math.prod(shape)
    return {
        "model": model, "architecture": loaded.spec.architecture, "dtype": loaded.dtype,
        "config_files": files, "ir_nodes": len(graph.nodes), "params": len(graph.params),
        "param_elements": elements, "text_chars": len(text),
        "import_s": import_s, "trace_s": trace_s, "verify_s": verify_s,
        "print_s": print_s, "parse_s": parse_s,
        "log": [f"{at:6.3f}s {line}" for at, line in log_lines],
        "breakdown": breakdown(log_lines, trace_s),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


_TRACED = re.compile(r"traced \d+ fx nodes in ([\d.]+)s, mapped to \d+ IR nodes in ([\d.]+)s")


def breakdown(log_lines: list[tuple[float, str]], trace_s: float) -> dict | None:
    """Split `trace` using the frontend's own log lines (None if their wording changed).

    config: AutoConfig read (includes transformers' lazy imports for the family)
    build:  the model built on the meta device, RoPE frequencies
    fx:     torch.fx symbolic trace;  map: fx nodes -> IR (shape inference)
    rest:   after the mapping (collecting computed tensors)
    """
    at_model = next((at for at, line in log_lines if line.startswith("model: ")), None)
    traced = next(((at, _TRACED.search(line)) for at, line in log_lines
                   if _TRACED.search(line)), None)
    if at_model is None or traced is None:
        return None
    at_traced, m = traced
    fx_s, map_s = float(m.group(1)), float(m.group(2))
    return {"config_s": at_model, "build_s": max(0.0, at_traced - at_model - fx_s - map_s),
            "fx_s": fx_s, "map_s": map_s, "rest_s": trace_s - at_traced}


def profile(model: str, model_dir: str, top: int) -> None:
    """cProfile the trace phase (cold, in this process), top functions by cumulative time."""
    import cProfile
    import io
    import pstats

    import braze.ir  # noqa: F401  (imports are not what we profile)
    from braze.frontend import load_model

    prof = cProfile.Profile()
    prof.enable()
    load_model(model_dir, with_weights=False)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("cumulative").print_stats(top)
    print(f"== cProfile: load_model({model}, with_weights=False), top {top} by cumulative ==")
    print(out.getvalue().rstrip())


def _run_worker(model: str, model_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, "--dir", model_dir]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"worker for {model} failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------

def best_of(runs: list[dict]) -> dict:
    best = dict(min(runs, key=lambda r: r["trace_s"]))   # its log and breakdown
    for key in ("import_s",) + tuple(f"{p}_s" for p in PHASES):
        best[key] = min(r[key] for r in runs)
    best["runs"] = [{k: r[k] for k in ("import_s",) + tuple(f"{p}_s" for p in PHASES)}
                    for r in runs]
    return best


def table(results: list[dict], target: float) -> str:
    head = ["model", "IR nodes", "params", "weights", "trace s", "verify s", "print s",
            "parse s", f"trace < {target:g} s"]
    rows = [head]
    for r in results:
        rows.append([r["model"], str(r["ir_nodes"]), str(r["params"]),
                     f"{r['param_elements'] / 1e9:.2f}B",
                     *(f"{r[p + '_s']:.3f}" for p in PHASES),
                     "ok" if r["trace_s"] < target else "OVER"])
    return _markdown(rows)


def breakdown_table(results: list[dict]) -> str:
    head = ["model (best trace run)", "trace s", "config s", "build s", "fx s", "map s", "rest s"]
    rows = [head]
    for r in results:
        b = r.get("breakdown")
        if b:
            rows.append([r["model"], f"{r['trace_s']:.3f}",
                         *(f"{b[k]:.3f}" for k in ("config_s", "build_s", "fx_s", "map_s",
                                                    "rest_s"))])
    return _markdown(rows) if len(rows) > 1 else ""


def _markdown(rows: list[list[str]]) -> str:
    head = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2)
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Time braze's frontend (trace to IR), verifier and IR text round trip "
                    "on full-size model shapes (config.json only, no weights).",
        epilog=f"DESIGN target: trace under {TARGET_TRACE_S:g} s per model on a 2-core CPU.")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                    help="model shapes to benchmark (default: all)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per model; the best of them is reported (default 3)")
    ap.add_argument("--in-process", action="store_true",
                    help="repeat inside this process (warm caches) instead of a fresh process "
                         "per run")
    ap.add_argument("--json", metavar="PATH",
                    help="also write the results as JSON to PATH ('-' for stdout)")
    ap.add_argument("--target", type=float, default=TARGET_TRACE_S,
                    help=f"trace-time target in seconds (default {TARGET_TRACE_S:g})")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a model's trace time is over the target")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, cProfile the trace of each model (fresh process)")
    ap.add_argument("--profile-top", type=int, default=15, metavar="N",
                    help="functions to show per profile (default 15)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print every run and the frontend's own log lines")
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--profile-worker", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(args.worker, args.dir)))
        return 0
    if args.profile_worker:
        profile(args.profile_worker, args.dir, args.profile_top)
        return 0
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    mode = "in-process (warm)" if args.in_process else "fresh process per run (cold)"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"braze compile-time benchmark: best of {args.repeat}, {mode}; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {load:.2f}", flush=True)
    results = []
    for model in args.models:
        runs = []
        for i in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix=f"braze-{model}-") as tmp:
                write_config(model, tmp)
                r = measure(model, tmp) if args.in_process else _run_worker(model, tmp)
            runs.append(r)
            if args.verbose:
                print(f"  {model} run {i + 1}: import {r['import_s']:.2f}s, " + ", ".join(
                    f"{p} {r[p + '_s']:.3f}s" for p in PHASES), flush=True)
                for line in r["log"]:
                    print(f"    | {line}")
        results.append(best_of(runs))
    r0 = results[0]
    imports = "" if args.in_process else (
        f"; imports of torch/transformers/braze (not counted) best "
        f"{min(r['import_s'] for r in results):.2f}s")
    print(f"torch {r0['torch']}, transformers {r0['transformers']}{imports}\n")
    print(table(results, args.target))
    split = breakdown_table(results)
    if split:
        print("\ntrace split (from the frontend's log):\n" + split)

    over = [r["model"] for r in results if r["trace_s"] >= args.target]
    if over:
        print(f"\nover the {args.target:g} s trace target: {', '.join(over)}")
    if args.json:
        doc = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
               "python": platform.python_version(), "platform": platform.platform(),
               "load_average_at_start": load,
               "torch": r0["torch"], "transformers": r0["transformers"],
               "repeat": args.repeat, "mode": "in-process" if args.in_process else "subprocess",
               "target_trace_s": args.target, "results": results}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.profile:
        for model in args.models:
            print()
            with tempfile.TemporaryDirectory(prefix=f"braze-{model}-") as tmp:
                write_config(model, tmp)
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--profile-worker",
                                      model, "--dir", tmp, "--profile-top",
                                      str(args.profile_top)])
            if res.returncode:
                return res.returncode
    return 1 if (args.strict and over) else 0


if __name__ == "__main__":
    sys.exit(main())
