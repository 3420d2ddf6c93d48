"""Structured-output throughput against unconstrained generation, in-process (braze.LLM).

Runs the same batch of prompts three ways: unconstrained, under a regex, and under a
JSON schema, each with seeded temperature-1 sampling, and reports output tokens/s, the
ratio to unconstrained (median of --repeats runs, the modes interleaved so that load
from other processes hits them alike), and the host time the grammar work took per step
(bitmask fill + masking). The constraints cannot complete within max_tokens (a regex
and a JSON string with a minimum length longer than max_tokens tokens can spell), so
every run generates the same number of tokens. Also reports the time to compile the
schema (cold) and a cache hit.

    python benchmarks/structured_throughput.py --artifact model.braze [--backend reference]
    python benchmarks/structured_throughput.py --tiny        # builds the tiny random llama

Not a test: record what it prints in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from arg_checks import at_least, cuda_needed

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"},
                                           "text": {"type": "string", "minLength": 2000}},
          "required": ["id", "text"], "additionalProperties": False}
REGEX = r"[a-z ,.]{2000}"
# a typical schema for --mask-vocab (no long minimum length, which xgrammar unrolls)
MASK_SCHEMA = {"type": "object", "properties": {"id": {"type": "integer"},
                                                "text": {"type": "string"},
                                                "tags": {"type": "array",
                                                         "items": {"type": "string"}}},
               "required": ["id", "text", "tags"], "additionalProperties": False}


def tiny_artifact() -> Path:
    import braze
    from braze.tiny import make_checkpoint
    d = Path(tempfile.mkdtemp(prefix="braze-structured-bench-"))
    ck = make_checkpoint("llama", d / "model", seed=1)
    braze.compile(ck, d / "a.braze", opt_level=0, targets="")
    return d / "a.braze"


class GrammarTimer:
    """Host seconds spent in the model runner's grammar step (bitmask fill + masking)."""

    def __init__(self, runner):
        self.seconds, self.steps = 0.0, 0
        inner = runner._constrain

        def timed(logits, chunks):
            t0 = time.perf_counter()
            out = inner(logits, chunks)
            self.seconds += time.perf_counter() - t0
            self.steps += 1
            return out
        runner._constrain = timed


def run(llm, prompts, max_tokens, constraint, seed, timer):
    from braze.runtime.sampler import SamplingParams
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i,
                             ignore_eos=True, structured_outputs=constraint)
              for i in range(len(prompts))]
    s0, n0 = timer.seconds, timer.steps
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    steps = timer.steps - n0
    return {"seconds": dt, "output_tokens": n, "tokens_per_s": n / dt,
            "grammar_ms_per_step": 1e3 * (timer.seconds - s0) / steps if steps else 0.0,
            "finish": sorted({o.finish_reason for o in outs})}


def mask_cost(vocab: int, rows: int, repeats: int = 31) -> dict:
    """Grammar work per step at a real model's vocabulary size, without a model: a
    synthetic vocabulary (the 256 single bytes, then random ASCII words of 2..10 letters)
    of `vocab` tokens, the JSON schema's matchers for `rows` requests, each advanced through
    a valid JSON text, timing bitmask fill and masking of f32[rows, vocab] logits (medians)."""
    import random

    import torch
    import xgrammar as xgr

    from braze.runtime.sampler import apply_token_bitmask
    from braze.runtime.structured import apply_bitmask_fast
    rnd = random.Random(0)
    words = {bytes([b]) for b in range(256)}
    letters = b"abcdefghijklmnopqrstuvwxyz ,.0123456789"
    while len(words) < vocab:
        words.add(bytes(rnd.choice(letters) for _ in range(rnd.randint(2, 10))))
    encoded = sorted(words, key=lambda w: (len(w), w))
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[0])
    t0 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(
        json.dumps(MASK_SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - t0
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    for m in matchers:
        assert m.accept_string('{"id": 12, "text": "hello wor')
    mask = xgr.allocate_token_bitmask(rows, vocab)
    logits = torch.randn(rows, vocab)
    fill, fast, plain = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(mask, i)
        fill.append(time.perf_counter() - t0)
        for fn, out in ((apply_bitmask_fast, fast), (apply_token_bitmask, plain)):
            x = logits.clone()
            t0 = time.perf_counter()
            fn(x, mask)
            out.append(time.perf_counter() - t0)

    def median_ms(v):
        return 1e3 * sorted(v)[len(v) // 2]
    return {"vocab": vocab, "rows": rows, "schema_compile_s": compile_s,
            "fill_ms": median_ms(fill), "apply_xgrammar_cpu_ms": median_ms(fast),
            "apply_torch_ms": median_ms(plain)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact")
    ap.add_argument("--tiny", action="store_true", help="build and use the tiny random llama")
    ap.add_argument("--backend", default="reference", choices=("auto", "reference", "interpret", "cuda"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved; the median is kept")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mask-vocab", type=int, metavar="V",
                    help="instead: the grammar work per step alone, at vocabulary size V "
                    "(synthetic vocabulary, no model) for --batch rows")
    a = ap.parse_args(argv)
    at_least(ap, a, batch=1, max_tokens=1, repeats=1)
    if a.mask_vocab is not None:
        at_least(ap, a, mask_vocab=256)      # its synthetic vocabulary starts with 256 bytes
    elif a.backend == "cuda":
        cuda_needed(ap, "--backend cuda")
    if a.mask_vocab:
        r = mask_cost(a.mask_vocab, a.batch)
        print(json.dumps(r, indent=2) if a.json else
              f"vocab {r['vocab']}, {r['rows']} rows: schema compile {r['schema_compile_s']:.2f} s; "
              f"per step: bitmask fill {r['fill_ms']:.2f} ms, masking {r['apply_xgrammar_cpu_ms']:.2f} ms "
              f"(xgrammar CPU kernel) / {r['apply_torch_ms']:.2f} ms (plain torch); "
              f"load average {os.getloadavg()[0]:.1f}")
        return 0
    if not a.artifact and not a.tiny:
        ap.error("give --artifact or --tiny")
    import braze
    from braze.runtime.structured import StructuredOutputsParams
    from braze.ir.errors import BrazeError
    art = a.artifact or tiny_artifact()
    try:
        llm = braze.LLM(art, backend=a.backend, max_num_seqs=a.batch)
    except BrazeError as e:      # no artifact there, one it cannot trust, --batch too big
        ap.error(f"--artifact {art}: {e}")
    prompts = [f"Request {i}:" for i in range(a.batch)]

    schema = StructuredOutputsParams(json=SCHEMA)
    cache = llm.engine.structured.cache
    t0 = time.perf_counter()
    cache.compile(schema)
    compile_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache.compile(schema)
    compile_hit = time.perf_counter() - t0

    modes = {"unconstrained": None, "regex": StructuredOutputsParams(regex=REGEX),
             "json_schema": schema}
    timer = GrammarTimer(llm.engine.runner)
    for c in modes.values():                                   # warm-up (and compile)
        run(llm, prompts, 4, c, 0, timer)
    runs = {k: [] for k in modes}
    for r in range(a.repeats):                                 # interleaved: ABC ABC ...
        for k, c in modes.items():
            runs[k].append(run(llm, prompts, a.max_tokens, c, 1000 * r, timer))
    res = {}
    for k, rs in runs.items():
        rs.sort(key=lambda x: x["tokens_per_s"])
        res[k] = dict(rs[len(rs) // 2], runs_tokens_per_s=[round(x["tokens_per_s"], 1)
                                                              for x in rs])
    base = res["unconstrained"]["tokens_per_s"]
    for k in res:
        res[k]["ratio"] = res[k]["tokens_per_s"] / base
    out = {"artifact": str(art), "backend": a.backend, "batch": a.batch,
           "max_tokens": a.max_tokens, "vocab": llm.engine.structured.vocab_size,
           "schema_compile_s": compile_cold, "schema_cache_hit_s": compile_hit,
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_avg": os.getloadavg(), "modes": res}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{a.backend}, batch {a.batch}, {a.max_tokens} tokens/request, vocab "
              f"{out['vocab']}, load average {out['load_avg'][0]:.1f} on {out['cpus']} CPUs")
        print(f"schema compile {compile_cold * 1e3:.1f} ms cold, {compile_hit * 1e6:.0f} us cached")
        for k, r in res.items():
            print(f"{k:14s} {r['tokens_per_s']:8.1f} tok/s  {r['ratio']:.2f}x  grammar "
                  f"{r['grammar_ms_per_step']:.2f} ms/step  ({r['output_tokens']} tokens, "
                  f"finish {r['finish']}; runs {r['runs_tokens_per_s']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
