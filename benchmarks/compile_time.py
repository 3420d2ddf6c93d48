#!/usr/bin/env python
"""Compile-time benchmark of the braze frontend and -O2 pass pipeline on full-size shapes.

For each model shape, only `config.json` is written to a temporary directory
(no weights), then we time:

  trace   braze.frontend.load_model(dir, with_weights=False): AutoConfig read,
          model built on the meta device, torch.fx trace, mapping to braze IR
  verify  braze.ir.verify(graph)                 (the traced graph)
  print   braze.ir.print_graph(graph)            (traced graph -> text)
  parse   braze.ir.parse_graph(text)             (text -> graph)
  passes  PassManager.for_level(2, ctx=PassContext(options=opts)).run(graph) on the
          traced graph, as braze/compiler.py runs it: opts is CompileOptions(dtype=
          "bfloat16", max_model_len=<max_position_embeddings>, max_num_tokens=8192),
          validated, dtype then set to the traced one; includes pass discovery
          (the pass modules' first import), timed per pass by the manager
  verify2 braze.ir.verify(graph)                 (the optimised graph, as the compiler does)

  pipeline = trace + verify + passes + verify2   (what `braze compile` does before
                                                  packaging; print and parse not included)

The round trip is checked (untimed) before the passes: the parsed graph verifies
and prints to the same text. Each repeat runs in a fresh Python process by
default (cold state: fx, AutoConfig and op-registry caches empty, pass modules
not imported; imports of torch/transformers/braze are timed apart and not
counted), and the best of `--repeat` runs is reported: each phase and each pass
its own minimum, `pipeline` the best run's total. Passes slower than
--slow-pass (0.5 s) in the best run are then cProfiled, each in a fresh process.

DESIGN target: trace (and the whole pipeline) under 5 s per model on a 2-core CPU.

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --repeat 5 --json results.json
    python benchmarks/compile_time.py --models llama3-8b --profile
    python benchmarks/compile_time.py --models qwen3-30b-a3b --profile-pass fuse-norm
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

from results_file import ResultsFile

TARGET_TRACE_S = 5.0
PHASES = ("trace", "verify", "print", "parse")
PIPELINE_PHASES = ("passes", "verify2")
TIMED = ("import",) + PHASES + PIPELINE_PHASES + ("pipeline",)
OPT_LEVEL = 2
MAX_NUM_TOKENS = 8192
SLOW_PASS_S = 0.5


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


def phi4_mini_config():
    """Phi-4-mini-instruct: fused qkv/gate_up, rope on 96 of 128 dims, longrope, tied."""
    from transformers import Phi3Config
    return Phi3Config(
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=200064, max_position_embeddings=131072,
        original_max_position_embeddings=4096, partial_rotary_factor=0.75,
        tie_word_embeddings=True, sliding_window=262144,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0] * 48, "long_factor": [1.0 + i / 8 for i in range(48)]},
        dtype="bfloat16", architectures=["Phi3ForCausalLM"])


def gemma3_27b_config():
    """Gemma 3 27B (text): 62 layers, 5 local (window 1024) to 1 global, two RoPE bases."""
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(
        hidden_size=5376, num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
        head_dim=128, intermediate_size=21504, vocab_size=262208, query_pre_attn_scalar=168,
        sliding_window=1024, sliding_window_pattern=6, max_position_embeddings=131072,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        dtype="bfloat16", architectures=["Gemma3ForCausalLM"])


def deepseek_v3_config():
    """DeepSeek-V3 (671B): MLA (q_lora 1536, kv_lora 512, rope 64), 256 experts in 8 groups,
    3 dense first layers, YaRN x40, one MTP layer declared (no weights here)."""
    from transformers import DeepseekV3Config
    return DeepseekV3Config(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, vocab_size=129280,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, num_nextn_predict_layers=1,
        rope_parameters={"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        dtype="bfloat16", architectures=["DeepseekV3ForCausalLM"])

def gemma4_26b_a4b_config():
    """A Gemma 4 26B-A4B-like text shape (published figures; the exact config.json was not
    at hand): 30 layers, 5 local (window 1024) to 1 global, global head_dim 512 with 2 kv
    heads and v = k, proportional RoPE, 128 experts top-8 beside a dense MLP."""
    from transformers import Gemma4TextConfig
    return Gemma4TextConfig(
        hidden_size=2816, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True,
        intermediate_size=2112, vocab_size=262144, sliding_window=1024,
        max_position_embeddings=262144, hidden_size_per_layer_input=0, enable_moe_block=True,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        final_logit_softcapping=30.0, dtype="bfloat16", architectures=["Gemma4ForCausalLM"])


def gemma4_e2b_config():
    """A Gemma 4 E2B-like text shape (published figures): 35 layers, per-layer inputs of
    256, the last 20 layers sharing the KV cache of earlier ones, double-wide MLPs there."""
    from transformers import Gemma4TextConfig
    return Gemma4TextConfig(
        hidden_size=1536, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
        head_dim=256, global_head_dim=512, intermediate_size=6144, vocab_size=262144,
        layer_types=["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                     for i in range(35)],
        sliding_window=512, max_position_embeddings=131072, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262144, num_kv_shared_layers=20, use_double_wide_mlp=True,
        final_logit_softcapping=30.0, dtype="bfloat16", architectures=["Gemma4ForCausalLM"])


MODELS = {
    "llama3-8b": llama3_8b_config,
    "qwen3-30b-a3b": qwen3_30b_a3b_config,
    "phi4-mini": phi4_mini_config,
    "gemma3-27b": gemma3_27b_config,
    "deepseek-v3": deepseek_v3_config,

    "gemma4-26b-a4b": gemma4_26b_a4b_config,
    "gemma4-e2b": gemma4_e2b_config,
}


# -- one measurement ------------------------------------------------------------

def write_config(model: str, model_dir: str) -> None:
    """Write only config.json for `model` into `model_dir` (no weights, no tokenizer)."""
    MODELS[model]().save_pretrained(model_dir)


class GcTimer:
    """Time spent in the cyclic garbage collector (gc.callbacks), and full (gen 2) collections.

    cProfile and the pass manager's timer charge a collection to whatever code was
    allocating when it started; this tells how much of a pass is the collector."""

    def __init__(self):
        self.s, self.full, self._t = 0.0, 0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.s += time.perf_counter() - self._t
            self.full += info["generation"] == 2

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)

    def snapshot(self) -> tuple[float, int]:
        return self.s, self.full


def compile_options(loaded, opt_level: int = OPT_LEVEL, max_num_tokens: int = MAX_NUM_TOKENS):
    """The options `braze compile --dtype bfloat16` would use for `loaded` (see compiler.py)."""
    from braze.config import CompileOptions

    opts = CompileOptions(opt_level=opt_level, dtype="bfloat16", max_num_tokens=max_num_tokens,
                          max_model_len=loaded.spec.max_position_embeddings)
    opts.validate()
    opts.dtype = loaded.dtype          # as the compiler does after tracing
    return opts


def measure(model: str, model_dir: str, opt_level: int = OPT_LEVEL,
            max_num_tokens: int = MAX_NUM_TOKENS) -> dict:
    """Run the phases once on the config in `model_dir`; return timings and sizes.

    The config is written by the caller (in another process by default): building a
    transformers config class in code imports modules (e.g. `LlamaConfig` pulls in
    torch._dynamo) that a real `load_model` of a model directory would pay for itself.
    """
    t0 = time.perf_counter()
    import torch
    import transformers

    import braze.ir as ir
    from braze.config import CompileOptions  # noqa: F401  (imported as braze.compiler does)
    from braze.frontend import load_model
    from braze.passes import PassContext, PassManager
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
    del parsed
    ir_nodes, params = len(graph.nodes), len(graph.params)
    elements = 0
    for p in graph.params.values():
        shape = p.type.shape
        if all(isinstance(d, int) for d in shape):
            elements += math.prod(shape)

    # the -O pipeline on the traced graph, as braze.compiler.compile runs it
    opts = compile_options(loaded, opt_level, max_num_tokens)
    ops_before, nodes_before = graph.op_counts(), len(graph.nodes)
    gc_per_pass: list[tuple[float, int]] = []
    with GcTimer() as gct:
        t = time.perf_counter()
        ctx = PassContext(options=opts.to_json())
        manager = PassManager.for_level(opts.opt_level, ctx=ctx,   # first call imports the passes
                                        after_each=lambda name, i, g: gc_per_pass.append(
                                            gct.snapshot()))
        setup_s = time.perf_counter() - t
        gc_setup = gct.snapshot()
        records = manager.run(graph)
        passes_s = time.perf_counter() - t
    gc_marks = [gc_setup] + gc_per_pass

    t = time.perf_counter()
    ir.verify(graph)
    verify2_s = time.perf_counter() - t
    memory = graph.meta.get("memory") or {}
    segments = graph.meta.get("segments")

    return {
        "model": model, "architecture": loaded.spec.architecture, "dtype": loaded.dtype,
        "config_files": files, "ir_nodes": ir_nodes, "params": params,
        "param_elements": elements, "text_chars": len(text),
        "import_s": import_s, "trace_s": trace_s, "verify_s": verify_s,
        "print_s": print_s, "parse_s": parse_s,
        "passes_s": passes_s, "verify2_s": verify2_s,
        "pipeline_s": trace_s + verify_s + passes_s + verify2_s,
        "opt_level": opts.opt_level, "options": opts.to_json(),
        "pass_setup_ms": setup_s * 1000,
        "passes": [{"name": r.name, "matches": r.matches, "ms": r.ms, "ops_after": r.ops_after,
                    "gc_ms": (gc_marks[i + 1][0] - gc_marks[i][0]) * 1000,
                    "gc_full": gc_marks[i + 1][1] - gc_marks[i][1]}
                   for i, r in enumerate(records)],
        "passes_gc_s": gct.s, "passes_gc_full": gct.full,
        "nodes_before": nodes_before, "nodes_after": len(graph.nodes),
        "ops_before": ops_before, "ops_after": graph.op_counts(),
        "refusals": len(ctx.refusals),
        "arena_bytes": memory.get("arena_bytes"), "bindings": memory.get("bindings"),
        "segments": None if segments is None else len(segments),
        "graph_breaks": graph.meta.get("graph_breaks"),
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


def profile_passes(model: str, model_dir: str, names: list[str], top: int,
                   opt_level: int = OPT_LEVEL, max_num_tokens: int = MAX_NUM_TOKENS) -> None:
    """Run the -O pipeline (cold, in this process) pass by pass, cProfiling only the passes
    in `names` (every occurrence), each separately; top functions by self and cumulative time.

    One PassManager per pass with the shared PassContext is what PassManager.run does."""
    import cProfile
    import io
    import pstats

    import braze.ir as ir
    from braze.frontend import load_model
    from braze.passes import PIPELINES, PassContext, PassManager

    loaded = load_model(model_dir, with_weights=False)
    graph = loaded.graph
    ir.verify(graph)
    opts = compile_options(loaded, opt_level, max_num_tokens)
    ctx = PassContext(options=opts.to_json())
    PassManager.for_level(opts.opt_level, ctx=ctx)        # pass discovery, not profiled
    pipeline = PIPELINES[opts.opt_level]
    unknown = sorted(set(names) - set(pipeline))
    if unknown:
        raise SystemExit(f"not in the -O{opts.opt_level} pipeline: {', '.join(unknown)}")
    for i, name in enumerate(pipeline):
        manager = PassManager([name], ctx=ctx)
        if name not in names:
            manager.run(graph)
            continue
        prof = cProfile.Profile()
        with GcTimer() as gct:
            t = time.perf_counter()
            prof.enable()
            (rec,) = manager.run(graph)
            prof.disable()
            wall = time.perf_counter() - t
        print(f"== cProfile: {model} -O{opts.opt_level} pass {i + 1} {name}: {rec.matches} "
              f"matches, {rec.ms:.0f} ms under the profiler ({wall:.2f} s wall), "
              f"{rec.ops_after} ops after; of that {gct.s * 1000:.0f} ms in the garbage "
              f"collector ({gct.full} full collections), charged by cProfile to the "
              f"function that was allocating ==")
        for key, label in (("tottime", "self (tottime)"), ("cumulative", "cumulative")):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(top)
            body = out.getvalue().strip().splitlines()
            start = next((j for j, line in enumerate(body) if "ncalls" in line), 0)
            print(f"-- top {top} by {label} --")
            print("\n".join(line for line in body[start:] if line.strip()))
    ir.verify(graph)


def _run_worker(model: str, model_dir: str, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, "--dir", model_dir,
           *(extra or [])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"worker for {model} failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------

def best_of(runs: list[dict]) -> dict:
    best = dict(min(runs, key=lambda r: r["trace_s"]))   # its log and breakdown
    for key in TIMED:
        best[key + "_s"] = min(r[key + "_s"] for r in runs)
    best["runs"] = [{k + "_s": r[k + "_s"] for k in TIMED} for r in runs]
    best["pass_setup_ms"] = min(r["pass_setup_ms"] for r in runs)
    passes = []
    for i, p in enumerate(best["passes"]):
        same = [r["passes"][i] for r in runs]
        if any((q["name"], q["matches"], q["ops_after"]) != (p["name"], p["matches"],
                                                              p["ops_after"]) for q in same):
            raise SystemExit(f"{best['model']}: pass {i + 1} {p['name']} differs between runs")
        fastest = min(same, key=lambda q: q["ms"])
        passes.append(dict(p, ms=fastest["ms"], gc_ms=fastest["gc_ms"],
                           gc_full=fastest["gc_full"], ms_runs=[q["ms"] for q in same]))
    best["passes"] = passes
    return best


def table(results: list[dict], target: float) -> str:
    level = results[0]["opt_level"]
    head = ["model", "IR nodes", "params", "weights", "trace s", "verify s", "print s",
            "parse s", f"trace < {target:g} s", f"-O{level} passes s", "verify2 s",
            "pipeline s", f"pipeline < {target:g} s"]
    rows = [head]
    for r in results:
        rows.append([r["model"], str(r["ir_nodes"]), str(r["params"]),
                     f"{r['param_elements'] / 1e9:.2f}B",
                     *(f"{r[p + '_s']:.3f}" for p in PHASES),
                     "ok" if r["trace_s"] < target else "OVER",
                     *(f"{r[p + '_s']:.3f}" for p in PIPELINE_PHASES + ("pipeline",)),
                     "ok" if r["pipeline_s"] < target else "OVER"])
    return _markdown(rows)


def summary_table(results: list[dict]) -> str:
    level = results[0]["opt_level"]
    head = ["model", "nodes traced", f"nodes -O{level}", "op kinds", "refusals",
            f"arena bytes (T={results[0]['options']['max_num_tokens']})", "arena MiB",
            "segments", "graph breaks"]
    rows = [head]
    for r in results:
        arena = r["arena_bytes"]
        rows.append([r["model"], str(r["nodes_before"]), str(r["nodes_after"]),
                     f"{len(r['ops_before'])} -> {len(r['ops_after'])}", str(r["refusals"]),
                     "-" if arena is None else f"{arena:,}",
                     "-" if arena is None else f"{arena / 2**20:.1f}",
                     "-" if r["segments"] is None else str(r["segments"]),
                     "-" if r["graph_breaks"] is None else str(r["graph_breaks"])])
    return _markdown(rows)


def pass_table(r: dict, slow_ms: float) -> str:
    many = len(r["passes"][0]["ms_runs"]) > 1 if r["passes"] else False
    head = ["#", "pass", "matches", "ms" + (" (best)" if many else ""),
            "of which GC ms", "full GCs", *(["ms (all runs)"] if many else []), "ops after",
            "share"]
    total = r["pass_setup_ms"] + sum(p["ms"] for p in r["passes"])
    rows = [head, ["", "(pass discovery: first import)", "", f"{r['pass_setup_ms']:.1f}", "", "",
                   *([""] if many else []), str(r["nodes_before"]),
                   f"{r['pass_setup_ms'] / total:.0%}"]]
    for i, p in enumerate(r["passes"], 1):
        mark = " (slow)" if p["ms"] > slow_ms else ""
        rows.append([str(i), p["name"] + mark, str(p["matches"]), f"{p['ms']:.1f}",
                     f"{p['gc_ms']:.1f}", str(p["gc_full"]),
                     *([" / ".join(f"{m:.0f}" for m in p["ms_runs"])] if many else []),
                     str(p["ops_after"]), f"{p['ms'] / total:.0%}"])
    rows.append(["", "sum", "", f"{total:.1f}", f"{sum(p['gc_ms'] for p in r['passes']):.1f}",
                 str(sum(p["gc_full"] for p in r["passes"])), *([""] if many else []),
                 str(r["nodes_after"]), ""])
    return _markdown(rows, left=2)


def ops_lines(r: dict) -> str:
    def fmt(counts):
        return ", ".join(f"{op} {n}" for op, n in counts.items())
    return (f"  before ({r['nodes_before']} nodes): {fmt(r['ops_before'])}\n"
            f"  after  ({r['nodes_after']} nodes): {fmt(r['ops_after'])}")


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


def _markdown(rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table: the first `left` columns left-aligned, the rest right-aligned."""
    head = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i < left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":"
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Time braze's frontend (trace to IR), verifier, IR text round trip and "
                    "-O2 pass pipeline on full-size model shapes (config.json only, no weights).",
        epilog=f"DESIGN target: trace and the whole pipeline (trace + verify + passes + "
               f"verify) under {TARGET_TRACE_S:g} s per model on a 2-core CPU.")
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
                    help=f"target in seconds for trace and for the whole pipeline "
                         f"(default {TARGET_TRACE_S:g})")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a model's trace or pipeline time is over the target")
    ap.add_argument("--opt-level", type=int, choices=(0, 1, 2), default=OPT_LEVEL,
                    help=f"pass pipeline to run after tracing (default {OPT_LEVEL})")
    ap.add_argument("--max-num-tokens", type=int, default=MAX_NUM_TOKENS, metavar="T",
                    help=f"compile option the memory plan is sized for (default "
                         f"{MAX_NUM_TOKENS})")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, cProfile the trace of each model (fresh process)")
    ap.add_argument("--slow-pass", type=float, default=SLOW_PASS_S, metavar="SECONDS",
                    help=f"afterwards, cProfile each pass slower than this in the best run, "
                         f"in a fresh process (default {SLOW_PASS_S:g}; 0 profiles every "
                         f"pass, a negative value none)")
    ap.add_argument("--profile-pass", action="append", default=[], metavar="NAME",
                    help="also cProfile this pass for every model (repeatable)")
    ap.add_argument("--profile-top", type=int, default=15, metavar="N",
                    help="functions to show per profile (default 15)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print every run and the frontend's own log lines")
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--profile-worker", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--profile-passes-worker", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(args.worker, args.dir, args.opt_level, args.max_num_tokens)))
        return 0
    if args.profile_worker:
        profile(args.profile_worker, args.dir, args.profile_top)
        return 0
    if args.profile_passes_worker:
        profile_passes(args.profile_passes_worker, args.dir, args.profile_pass, args.profile_top,
                       args.opt_level, args.max_num_tokens)
        return 0
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    from braze.passes import pipeline
    passes = pipeline(args.opt_level)
    for name in args.profile_pass:
        if name not in passes:
            ap.error(f"--profile-pass {name}: not a pass of the -O{args.opt_level} pipeline, "
                     f"which runs {', '.join(dict.fromkeys(passes))}")
    level_args = ["--opt-level", str(args.opt_level), "--max-num-tokens", str(args.max_num_tokens)]

    mode = "in-process (warm)" if args.in_process else "fresh process per run (cold)"
    load = _loadavg()
    print(f"braze compile-time benchmark: best of {args.repeat}, {mode}, -O{args.opt_level}, "
          f"max_num_tokens {args.max_num_tokens}; {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load average {_fmt_load(load)} (1/5/15 min)",
          flush=True)
    out = ResultsFile(args.json, {
        "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "python": platform.python_version(), "platform": platform.platform(),
        "load_average_at_start": load, "repeat": args.repeat,
        "mode": "in-process" if args.in_process else "subprocess",
        "opt_level": args.opt_level, "max_num_tokens": args.max_num_tokens,
        "target_trace_s": args.target, "target_pipeline_s": args.target})
    results = out.results
    for model in args.models:
        runs = []
        for i in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix=f"braze-{model}-") as tmp:
                write_config(model, tmp)
                r = (measure(model, tmp, args.opt_level, args.max_num_tokens) if args.in_process
                     else _run_worker(model, tmp, level_args))
            runs.append(r)
            if args.verbose:
                print(f"  {model} run {i + 1}: import {r['import_s']:.2f}s, " + ", ".join(
                    f"{p} {r[p + '_s']:.3f}s" for p in PHASES + PIPELINE_PHASES + ("pipeline",)),
                    flush=True)
                for line in r["log"]:
                    print(f"    | {line}")
        out.add(best_of(runs))
    r0 = results[0]
    imports = "" if args.in_process else (
        f"; imports of torch/transformers/braze (not counted) best "
        f"{min(r['import_s'] for r in results):.2f}s")
    load_end = _loadavg()
    print(f"torch {r0['torch']}, transformers {r0['transformers']}{imports}; "
          f"load average at the end {_fmt_load(load_end)}\n")
    print(table(results, args.target))
    print("\npipeline = trace + verify + passes + verify2 (the best run's total; the other "
          "columns are each phase's best)")
    split = breakdown_table(results)
    if split:
        print("\ntrace split (from the frontend's log):\n" + split)
    slow_ms = args.slow_pass * 1000
    if args.opt_level:
        print(f"\n-O{args.opt_level} result (max_num_tokens {args.max_num_tokens}, "
              f"max_model_len = max_position_embeddings):\n" + summary_table(results))
        for r in results:
            print(f"\n-O{args.opt_level} passes, {r['model']} (ms per pass as the pass manager "
                  f"times it; best of {args.repeat} per pass):")
            print(pass_table(r, slow_ms if args.slow_pass >= 0 else float("inf")))
            print("ops:\n" + ops_lines(r))

    over = [r["model"] for r in results if r["trace_s"] >= args.target]
    if over:
        print(f"\nover the {args.target:g} s trace target: {', '.join(over)}")
    over_pipeline = [r["model"] for r in results if r["pipeline_s"] >= args.target]
    if over_pipeline:
        print(f"\nover the {args.target:g} s pipeline target: {', '.join(over_pipeline)}")
    out.finish(load_average_at_end=load_end, torch=r0["torch"], transformers=r0["transformers"])
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
    for r in results:
        names = sorted({p["name"] for p in r["passes"]
                        if (args.slow_pass >= 0 and p["ms"] > slow_ms)
                        or p["name"] in args.profile_pass})
        if not names:
            continue
        print()
        with tempfile.TemporaryDirectory(prefix=f"braze-{r['model']}-") as tmp:
            write_config(r["model"], tmp)
            res = subprocess.run([sys.executable, os.path.abspath(__file__),
                                  "--profile-passes-worker", r["model"], "--dir", tmp,
                                  "--profile-top", str(args.profile_top), *level_args,
                                  *(a for n in names for a in ("--profile-pass", n))])
        if res.returncode:
            return res.returncode
    return 1 if (args.strict and (over or over_pipeline)) else 0


def _loadavg() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _fmt_load(load) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


if __name__ == "__main__":
    sys.exit(main())
