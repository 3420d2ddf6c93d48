#!/usr/bin/env python
"""Host overhead of one engine decode step with many running requests, the model excluded.

A tiny random Llama checkpoint (with the tiny byte-level BPE tokenizer of braze/tiny.py)
is compiled with `max_num_seqs` = --requests and served by `Engine(backend="reference")`.
The model forward is replaced by a stub (`engine.runner.graphs.run` monkeypatched in this
script, the engine itself is unchanged) that returns one of a few preallocated random
logits tensors of the step's padded shape, so every step samples real, varying tokens
that go through detokenisation, but no model work is done. What remains is the host's
part of a step:

    schedule       Scheduler.schedule (running requests first, block growth)
    prepare        PersistentBatch.prepare: deltas to the device rows, the step's static
                   inputs (input_ids, positions, slot_mapping, ...) built from them
    forward stub   bucket_for + returning the preallocated logits (the model is excluded)
    sample         PersistentBatch.sample: a greedy argmax for an all-greedy step, else
                   runtime.sampler.sample_batch (Gumbel-max over [S, vocab], --temperature
                   > 0). Device work on a GPU; on the CPU it is done here, so the vocab is
                   kept small (--vocab, default 512) and sample_batch is also timed by
                   itself (see below)
    write_sampled  the sampled tokens written into the persistent batch rows
    execute other  the rest of ModelRunner.execute (bucket choice, logits slice, the step
                   result)
    commit         Scheduler.commit (KV block bookkeeping, prefix-cache hashes)
    bookkeeping    the rest of Engine.step: the sampled tokens read back to the host, per
                   request stop checks (max_tokens, stop ids), detokenisation of stop-string requests,
                   RequestOutput building (the residual of the step after the pieces above)

The reference backend runs steps one after the other (no async scheduling): each step's
tokens are applied in the same step. On a GPU the engine overlaps this host work with the
device's work on the previous step; the host time still bounds the step rate whenever it
exceeds the forward (small models, small batches).

Passes, each over --steps decode steps with all --requests requests decoding (the script
checks that every timed step reports exactly one new token for each of them, none finished):

    clean     only a clock around Engine.step: the figure to compare with the target; also
              the stepping thread's CPU time per step (time.thread_time), which a busy
              shared machine does not inflate
    phases    wrappers (time.perf_counter) around the per-step pieces above
    detail    also wrappers around the per-request pieces of bookkeeping (
              IncrementalDetokenizer.update / output_delta, _output); these add ~1 us per
              request, so their absolute values are inflated, their split is what counts
    ops       one step under a TorchFunctionMode counting torch calls per piece (attribute
              reads excluded): on a GPU each is roughly a kernel launch or a copy
    sampling  sample_batch by itself on [requests, vocab] and [requests, 16] logits, with
              and without top-p, and its torch-call count (what a GPU pays per launch)
    --profile cProfile over the clean steps: top --profile-top functions by cumulative
              and by self time

DESIGN §10 target: host work per decode step for 256 running requests under 1 ms.
On a GPU the step also pays for replaying the CUDA graphs (host side of graph launch)
and one device->host copy of the sampled tokens; neither is measured here.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --profile --json host.json
    python benchmarks/host_overhead.py --requests 64 --steps 500
    python benchmarks/host_overhead.py --temperature 0.8 --top-p 0.9   # filtered sampling path
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results_file import ResultsFile

TARGET_MS = 1.0
BLOCK_SIZE = 16
LOGITS_BANK = 8          # preallocated logits tensors the stub cycles through
STEP_PIECES = ("schedule", "prepare", "forward_stub", "sample", "write_sampled", "commit")
DETAIL_PIECES = ("detok_update", "_output", "detok_output_delta")


# -- setup ------------------------------------------------------------------------------------

def build_artifact(tmp: Path, args) -> tuple[Path, int]:
    """Tiny llama checkpoint (+ tokenizer) compiled for --requests sequences; (path, vocab)."""
    import braze
    from braze.tiny import make_checkpoint

    with contextlib.redirect_stderr(io.StringIO()):
        ckpt = make_checkpoint("llama", tmp / "model", seed=0, vocab_size=args.vocab,
                               max_position_embeddings=args.max_model_len,
                               num_hidden_layers=1)
    out = tmp / "host.braze"
    braze.compile(ckpt, out, opt_level=args.opt_level, targets="",
                  max_num_seqs=args.requests, max_num_tokens=args.max_num_tokens,
                  max_model_len=args.max_model_len, dtype="float32")
    return out, args.vocab


def make_engine(artifact: Path, args):
    from braze.runtime.engine import Engine

    per_req = math.ceil(args.max_model_len / BLOCK_SIZE)
    eng = Engine(artifact, backend="reference", freeze_gc=True,
                 num_kv_blocks=args.requests * per_req + 16,
                 max_num_seqs=args.requests, max_num_tokens=args.max_num_tokens,
                 sampler=args.sampler, fused_prepare=args.fused_prepare)
    return eng


def install_stub(eng, vocab: int, tok_vocab: int, seed: int = 0):
    """Replace the model forward by a stub returning preallocated logits [T_pad, vocab].

    Each bank entry is random with special ids (pad, bos, eos) and ids outside the
    tokenizer masked out, so argmax (greedy) picks a different real token per row and step.
    """
    import torch

    graphs = eng.runner.graphs
    gen = torch.Generator().manual_seed(seed)
    rows = graphs.max_num_tokens
    bank = []
    for _ in range(LOGITS_BANK):
        t = torch.randn(rows, vocab, generator=gen, dtype=torch.float32)
        t[:, :3] = -1e4
        t[:, tok_vocab:] = -1e4
        bank.append(t)
    state = {"k": 0}

    def stub_run(num_tokens: int, num_seqs: int, decode_only: bool):
        T, _ = graphs.bucket_for(num_tokens, num_seqs)
        state["k"] += 1
        return bank[state["k"] % LOGITS_BANK][:T]

    graphs.run = stub_run
    return stub_run


def add_requests(eng, args, vocab: int) -> None:
    import random

    from braze.runtime.sampler import SamplingParams

    rng = random.Random(0)
    max_tokens = args.max_model_len - args.prompt_len - 1
    for i in range(args.requests):
        prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=i if args.temperature > 0 else None,
                            stop=list(args.stop or []), output_kind=args.output_kind)
        eng.add_request(f"r{i}", prompt, sp)


def warm_up(eng, args) -> int:
    """Step until every request runs and has sampled, then --warmup decode steps; returns
    the number of prefill steps."""
    R = args.requests
    prefill = 0
    for _ in range(10_000):
        eng.step()
        prefill += 1
        if eng.num_running() == R and eng.num_waiting() == 0 and all(
                r.num_computed == r.num_tokens - 1 for r in eng.requests.values()):
            break
    else:
        raise SystemExit("requests never all reached decode")
    for _ in range(args.warmup):
        check_step(eng, eng.step(), R)
    return prefill


OUTPUT_KIND = ["delta"]


def check_step(eng, outs, R: int) -> None:
    if OUTPUT_KIND[0] == "final":      # no per-step reports: every request still running
        if outs or eng.num_running() != R:
            raise SystemExit(f"a timed step finished a request ({len(outs)} outputs, "
                             f"{eng.num_running()} running); raise --max-model-len")
        return
    if len(outs) != R or any(o.finished for o in outs) or any(len(o.new_token_ids) != 1
                                                               for o in outs):
        raise SystemExit(f"a timed step did not decode one token for each of {R} requests "
                         f"({len(outs)} outputs); raise --max-model-len")


# -- instrumentation --------------------------------------------------------------------------

class Clock:
    """Accumulates perf_counter time per piece for the current step; wrappers nest."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self.current: list[str] = ["engine"]
        self.missing: list[str] = []
        self._undo: list = []

    def wrap(self, obj, attr: str, key: str, on_class: bool = False) -> None:
        """Time every call of obj.attr under `key`. on_class: obj is a class and attr a
        plain method (every instance is timed); otherwise an instance or module attribute."""
        acc, cur, pc = self.acc, self.current, time.perf_counter
        if not hasattr(obj, attr):          # the engine changed: report the piece as missing
            self.missing.append(f"{getattr(obj, '__name__', type(obj).__name__)}.{attr}")
            return
        acc.setdefault(key, 0.0)
        had = attr in getattr(obj, "__dict__", {})
        orig = obj.__dict__[attr] if had else None
        fn = orig if on_class else getattr(obj, attr)

        def timed(*a, **kw):
            cur.append(key)
            t = pc()
            try:
                return fn(*a, **kw)
            finally:
                acc[key] += pc() - t
                cur.pop()

        setattr(obj, attr, timed)
        self._undo.append((obj, attr, had, orig))

    def reset(self) -> None:
        for k in self.acc:
            self.acc[k] = 0.0

    def restore(self) -> None:
        for obj, attr, had, orig in reversed(self._undo):
            if had:
                setattr(obj, attr, orig)
            else:
                delattr(obj, attr)
        self._undo.clear()


def wrap_step_pieces(clock: Clock, eng) -> None:
    runner, batch = eng.runner, eng.runner.batch
    clock.wrap(eng.scheduler, "schedule", "schedule")
    clock.wrap(eng.scheduler, "commit", "commit")
    clock.wrap(runner, "execute", "execute")
    clock.wrap(batch, "prepare", "prepare")
    clock.wrap(runner.graphs, "run", "forward_stub")
    clock.wrap(batch, "sample", "sample")
    clock.wrap(batch, "write_sampled", "write_sampled")


def wrap_detail_pieces(clock: Clock, eng) -> None:
    from braze.runtime.detokenizer import IncrementalDetokenizer

    clock.wrap(eng, "_output", "_output")
    clock.wrap(IncrementalDetokenizer, "update", "detok_update", on_class=True)
    clock.wrap(IncrementalDetokenizer, "output_delta", "detok_output_delta", on_class=True)


def timed_steps(eng, n: int, R: int, clock: Clock | None = None,
                cpu: list[float] | None = None) -> tuple[list[float], dict]:
    """n steps; per-step total seconds, and the per-piece seconds of each step. `cpu`, if
    given, receives each step's CPU seconds of this thread (time.thread_time): on a machine
    other processes share, the wall clock also counts the time the step waited for a core."""
    totals: list[float] = []
    pieces: dict[str, list[float]] = {}
    pc, tt = time.perf_counter, time.thread_time
    for _ in range(n):
        if clock is not None:
            clock.reset()
        c, t = tt(), pc()
        outs = eng.step()
        totals.append(pc() - t)
        if cpu is not None:
            cpu.append(tt() - c)
        check_step(eng, outs, R)
        if clock is not None:
            for k, v in clock.acc.items():
                pieces.setdefault(k, []).append(v)
    return totals, pieces


class GcWatch:
    """Collections and seconds in the cyclic garbage collector while active."""

    def __init__(self):
        self.s, self.n, self._t = 0.0, 0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.s += time.perf_counter() - self._t
            self.n += 1

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def count_torch_calls(eng, clock: Clock, R: int, steps: int = 3) -> dict[str, dict[str, int]]:
    """Torch function calls per piece (mean over `steps` steps), by function name."""
    from torch.overrides import TorchFunctionMode

    counts: dict[str, dict[str, int]] = {}
    cur = clock.current
    in_kernel = [False]

    def note(name: str) -> None:
        d = counts.setdefault(cur[-1], {})
        d[name] = d.get(name, 0) + 1

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
            if not in_kernel[0] and not name.endswith("__get__"):
                note(name)
            return func(*args, **(kwargs or {}))

    # A Triton kernel launched by the engine (--sampler triton, --fused-prepare) is one
    # launch on a GPU; under the interpreter its body runs torch ops of its own, which a GPU
    # never pays on the host.
    class OneLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **kw):
                note("triton launch")
                in_kernel[0] = True
                try:
                    return self.kernel[grid](*a, **kw)
                finally:
                    in_kernel[0] = False
            return launch
    wrapped = [k for k in (eng.runner.batch.sampling.kernel, eng.runner.batch.prepare_kernel)
               if k is not None]
    for k in wrapped:
        k.kernel = OneLaunch(k.kernel)
    try:
        with Count():
            for _ in range(steps):
                check_step(eng, eng.step(), R)
    finally:
        for k in wrapped:
            k.kernel = k.kernel.kernel
    return {k: {n: c / steps for n, c in v.items()} for k, v in counts.items()}


def sampling_alone(R: int, vocab: int, reps: int = 20) -> dict:
    """runtime.sampler.sample_batch by itself on [R, vocab] and on [R, 16] logits (the
    latter is about its dispatch cost: the same op sequence on almost no data), with
    temperature 0.8 and no filter / top-p 0.9 (sort). ms per call, median of `reps`."""
    import torch

    from braze.runtime.sampler import sample_batch

    out = {}
    gen = torch.Generator().manual_seed(1)
    for v in (vocab, 16):
        logits = torch.randn(R, v, generator=gen)
        args = dict(temperature=torch.full((R,), 0.8), top_k=torch.zeros(R, dtype=torch.int64),
                    top_p=torch.full((R,), 0.9), seeds=torch.arange(R, dtype=torch.int64),
                    counters=torch.full((R,), 7, dtype=torch.int64))
        for filt in (False, True):
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                sample_batch(logits, filter=filt, **args)
                times.append(time.perf_counter() - t)
            out[f"vocab {v}, {'top-p 0.9 (sort)' if filt else 'no filter'}"] = \
                1000 * statistics.median(times)
            if v == 16:
                out[f"torch calls, {'top-p 0.9' if filt else 'no filter'}"] = _count_calls(
                    lambda lg=logits, f=filt, a=args: sample_batch(lg, filter=f, **a))
    return out


def _count_calls(fn) -> int:
    from torch.overrides import TorchFunctionMode

    n = [0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", "")
            n[0] += not name.endswith("__get__")
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return n[0]


def profile_steps(eng, n: int, R: int, top: int) -> str:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        check_step(eng, eng.step(), R)
    prof.disable()
    out = []
    for key, label in (("cumulative", "cumulative"), ("tottime", "self (tottime)")):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        body = s.getvalue().strip().splitlines()
        start = next((j for j, line in enumerate(body) if "ncalls" in line), 0)
        out.append(f"-- top {top} by {label} (over {n} steps; divide by {n} for per step) --")
        out.extend(line for line in body[start:] if line.strip())
    return "\n".join(out)


# -- report -----------------------------------------------------------------------------------

def summary(xs: list[float]) -> dict:
    ms = sorted(x * 1000 for x in xs)
    return {"mean_ms": statistics.fmean(ms), "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99),
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


def _pct(sorted_ms: list[float], p: float) -> float:
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    k = (len(sorted_ms) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


def breakdown(totals: list[float], pieces: dict[str, list[float]]) -> dict[str, dict]:
    """Per-piece mean/p50/p99 ms per step, with the residuals 'execute other' and
    'bookkeeping' (and, in the detail pass, the split of bookkeeping)."""
    n = len(totals)
    def get(k):
        return pieces.get(k, [0.0] * n)

    rows: dict[str, list[float]] = {}
    for k in ("schedule", "prepare", "forward_stub"):
        rows[k] = get(k)
    rows["sample (greedy argmax or sample_batch)"] = get("sample")
    rows["write_sampled"] = get("write_sampled")
    inner = ("prepare", "forward_stub", "sample", "write_sampled")
    rows["execute other (bucket choice, logits slice, ...)"] = [e - sum(get(k)[i] for k in inner)
                             for i, e in enumerate(get("execute"))]
    rows["commit"] = get("commit")
    rows["bookkeeping"] = [t - s - e - c for t, s, e, c in
                           zip(totals, get("schedule"), get("execute"), get("commit"))]
    if "_output" in pieces:
        out_, upd, delta = get("_output"), get("detok_update"), get("detok_output_delta")
        rows["  detokenise (stop-string requests only)"] = [u + d for u, d in zip(upd, delta)]
        rows["  outputs (_output less output_delta)"] = [o - d for o, d in zip(out_, delta)]
        rows["  stop checks and step loop"] = [b - o - u for b, o, u in
                                               zip(rows["bookkeeping"], out_, upd)]
    rows["total"] = totals
    return {k: summary(v) for k, v in rows.items()}


def table(bd: dict[str, dict], total_mean: float) -> str:
    head = ["piece", "mean ms", "p50 ms", "p99 ms", "% of step"]
    rows = [head]
    for k, s in bd.items():
        pct = "" if total_mean <= 0 else f"{100 * s['mean_ms'] / total_mean:.1f}"
        rows.append([k, f"{s['mean_ms']:.3f}", f"{s['p50_ms']:.3f}", f"{s['p99_ms']:.3f}", pct])
    return _markdown(rows)


def _short(name: str) -> str:
    for pre, to in (("TensorBase.", "."), ("Tensor.", "."), ("_VariableFunctionsClass.", "torch."),
                    ("_TensorBase.", ".")):
        if name.startswith(pre):
            return to + name[len(pre):]
    return name


def ops_table(counts: dict[str, dict[str, float]], top: int = 5) -> str:
    order = ["engine", "schedule", "execute", "prepare", "forward_stub", "sample",
             "write_sampled", "commit"]
    rows = [["piece", "torch calls/step", "most frequent"]]
    total = 0.0
    for k in order + sorted(set(counts) - set(order)):
        d = counts.get(k, {})
        n = sum(d.values())
        total += n
        common = ", ".join(f"{_short(name)} {c:g}" for name, c in
                           sorted(d.items(), key=lambda kv: -kv[1])[:top])
        rows.append([k if k != "execute" else "execute (not in a piece below)", f"{n:g}",
                     common or "-"])
    rows.append(["all", f"{total:g}", ""])
    return _markdown(rows, left=1, text_cols=(2,))


def _markdown(rows: list[list[str]], left: int = 1, text_cols=()) -> str:
    """A Markdown table: the first `left` columns and `text_cols` left-aligned, the rest
    right-aligned."""
    head = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i < left or i in text_cols else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) if i < left or i in text_cols
                                        else "-" * (w + 1) + ":"
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def _loadavg():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _fmt_load(load) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Host time per engine decode step with many running requests, the model "
                    "forward replaced by a stub (scheduling, input preparation, sampling, "
                    "bookkeeping).",
        epilog=f"DESIGN target: under {TARGET_MS:g} ms per decode step for 256 running requests.")
    ap.add_argument("--requests", type=int, default=256,
                    help="running requests = max_num_seqs (default 256)")
    ap.add_argument("--steps", type=int, default=300,
                    help="timed decode steps per pass (default 300)")
    ap.add_argument("--warmup", type=int, default=20,
                    help="decode steps before timing (default 20)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--vocab", type=int, default=512,
                    help="model vocab; the tiny tokenizer covers at most ~536 ids, logits "
                         "beyond it are masked (default 512). Sampling cost on the CPU grows "
                         "with it; on a GPU it is device work")
    ap.add_argument("--max-num-tokens", type=int, default=512,
                    help="token budget per step (default 512; >= --requests)")
    ap.add_argument("--opt-level", type=int, choices=(0, 1, 2), default=2,
                    help="compile level of the tiny artifact (default 2: logits pruned)")
    ap.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    ap.add_argument("--top-p", type=float, default=1.0, help="default 1.0 (no filter)")
    ap.add_argument("--top-k", type=int, default=0, help="default 0 (no filter)")
    ap.add_argument("--sampler", choices=("torch", "triton"), default="torch",
                    help="EngineOptions.sampler: torch ops (default) or the fused Triton "
                         "kernel for steps no row restricts (here under the interpreter: "
                         "its CPU time means nothing, its torch-call count does)")
    ap.add_argument("--fused-prepare", action="store_true",
                    help="EngineOptions.fused_prepare: the step's inputs by one Triton kernel "
                         "(here under the interpreter: its torch-call count is what matters)")
    ap.add_argument("--stop", action="append", metavar="TEXT",
                    help="a stop string for every request (repeatable; default none)")
    ap.add_argument("--output-kind", choices=("delta", "final"), default="delta",
                    help="delta (default): the engine reports every request every step, as "
                         "when streaming; final: only finished ones, as LLM.generate does")
    ap.add_argument("--no-detail", action="store_true",
                    help="skip the per-request detail pass")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile --steps clean steps: top functions by cumulative and "
                         "self time")
    ap.add_argument("--profile-top", type=int, default=25, metavar="N",
                    help="functions per profile listing (default 25)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    ap.add_argument("--target-ms", type=float, default=TARGET_MS,
                    help=f"target per step (default {TARGET_MS:g})")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 if the clean mean is over the target")
    ap.add_argument("--budget", type=float, default=100.0, metavar="SECONDS",
                    help="stop adding passes once this much time has gone (default 100)")
    args = ap.parse_args(argv)
    OUTPUT_KIND[0] = args.output_kind
    if args.requests < 1 or args.steps < 1 or args.warmup < 0 or args.prompt_len < 1:
        ap.error("--requests, --steps, --prompt-len must be positive, --warmup >= 0")
    if args.max_num_tokens < args.requests:
        ap.error("--max-num-tokens must be at least --requests (one decode token each)")
    if args.vocab < 8:
        ap.error("--vocab must be at least 8")
    passes = 2 + (not args.no_detail) + args.profile
    # tokens a request can generate: while the others still prefill (the first admitted
    # decode meanwhile), the warm-up, every pass, the torch-call count, a margin
    prefill_steps = -(-args.requests * args.prompt_len // args.max_num_tokens)
    need = args.prompt_len + prefill_steps + args.warmup + passes * args.steps + 3 + 8
    args.max_model_len = -(-need // BLOCK_SIZE) * BLOCK_SIZE

    t_start = time.perf_counter()
    import torch
    import transformers

    torch.set_num_threads(1)       # the host does this work on one thread; stable numbers
    load = _loadavg()
    print(f"braze host-overhead benchmark: {args.requests} requests decoding, "
          f"{args.steps} steps per pass, vocab {args.vocab}, prompt {args.prompt_len}, "
          f"max_num_tokens {args.max_num_tokens}, -O{args.opt_level}, temperature "
          f"{args.temperature:g}, top_p {args.top_p:g}, top_k {args.top_k}, sampler "
          f"{args.sampler}{', fused prepare' if args.fused_prepare else ''}; {os.cpu_count()} "
          f"CPUs, Python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} thread), load average {_fmt_load(load)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="braze-host-") as tmp:
        t = time.perf_counter()
        artifact, vocab = build_artifact(Path(tmp), args)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        eng = make_engine(artifact, args)
        engine_s = time.perf_counter() - t
        tok_vocab = eng.tokenizer.vocab_size if eng.tokenizer is not None else vocab
        install_stub(eng, vocab, min(tok_vocab, vocab))
        add_requests(eng, args, min(tok_vocab, vocab))
        prefill_steps = warm_up(eng, args)
        print(f"checkpoint + compile {build_s:.1f}s, engine {engine_s:.1f}s, "
              f"{prefill_steps} prefill steps + {args.warmup} warm-up decode steps; "
              f"logits pruned: {eng.runner.executor.logits_pruned}, "
              f"max_model_len {args.max_model_len}, {eng.runner.num_kv_blocks} KV blocks",
              flush=True)
        R = args.requests
        out = ResultsFile(args.json, {
            "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "load_average_at_start": load,
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "target_ms": args.target_ms, "prefill_steps": prefill_steps}, results={})
        results = out.results

        clean_cpu: list[float] = []
        with GcWatch() as gcw:
            clean, _ = timed_steps(eng, args.steps, R, cpu=clean_cpu)
        out.put("clean", {**summary(clean), "gc_collections": gcw.n, "gc_ms": gcw.s * 1000,
                          "cpu": summary(clean_cpu)})
        print(f"clean: host {results['clean']['mean_ms']:.3f} ms per step (mean)", flush=True)

        clock = Clock()
        wrap_step_pieces(clock, eng)
        phases_tot, phases_pieces = timed_steps(eng, args.steps, R, clock)
        out.put("phases", breakdown(phases_tot, phases_pieces))
        out.put("torch_calls", count_torch_calls(eng, clock, R))
        if not args.no_detail and time.perf_counter() - t_start < args.budget:
            wrap_detail_pieces(clock, eng)
            det_tot, det_pieces = timed_steps(eng, args.steps, R, clock)
            out.put("detail", breakdown(det_tot, det_pieces))
        clock.restore()
        out.put("sampling_alone_ms", sampling_alone(R, vocab))
        prof_text = None
        if args.profile and time.perf_counter() - t_start < args.budget:
            prof_text = profile_steps(eng, args.steps, R, args.profile_top)
        stats = eng.stats()

    c = results["clean"]
    ok = c["mean_ms"] < args.target_ms
    print(f"\nclean: {c['n']} decode steps of {R} requests, host ms per step: "
          f"mean {c['mean_ms']:.3f}, p50 {c['p50_ms']:.3f}, p99 {c['p99_ms']:.3f}, "
          f"min {c['min_ms']:.3f}, max {c['max_ms']:.3f}; {c['gc_collections']} gc collections "
          f"({c['gc_ms']:.1f} ms); target < {args.target_ms:g} ms: "
          f"{'ok' if ok else 'MISSED'} ({c['mean_ms'] / args.target_ms:.1f}x the target); "
          f"per request {1000 * c['mean_ms'] / R:.2f} us")
    print(f"clean, CPU time of the stepping thread (not counting waits for a core on a shared "
          f"machine): mean {c['cpu']['mean_ms']:.3f}, p50 {c['cpu']['p50_ms']:.3f}, "
          f"p99 {c['cpu']['p99_ms']:.3f} ms per step")
    ph = results["phases"]
    print(f"\nphases (perf_counter wrappers around the per-step pieces; step total "
          f"{ph['total']['mean_ms']:.3f} ms mean vs {c['mean_ms']:.3f} clean):")
    print(table(ph, ph["total"]["mean_ms"]))
    if "detail" in results:
        d = results["detail"]
        print(f"\ndetail (also per-request wrappers, ~1 us each, {R} requests: absolute values "
              f"inflated; step total {d['total']['mean_ms']:.3f} ms):")
        print(table(d, d["total"]["mean_ms"]))
    print("\ntorch calls per step (TorchFunctionMode, attribute reads excluded; on a GPU "
          "roughly one kernel launch or copy each):")
    print(ops_table(results["torch_calls"]))
    sa = results["sampling_alone_ms"]
    print(f"\nsample_batch by itself on {R} rows, temperature 0.8 (the engine calls it only "
          f"when a request samples; all-greedy steps take an argmax). ms per call, and torch "
          f"calls (the op count is what a GPU pays on the host, the vocab-16 time is close to "
          f"its CPU dispatch cost):")
    print(_markdown([["logits", "no filter ms", "top-p 0.9 ms"]] + [
        [f"[{R}, {v}]", f"{sa[f'vocab {v}, no filter']:.3f}",
         f"{sa[f'vocab {v}, top-p 0.9 (sort)']:.3f}"] for v in (vocab, 16)] + [
        ["torch calls", f"{sa['torch calls, no filter']}", f"{sa['torch calls, top-p 0.9']}"]]))
    if clock.missing:
        print(f"\nnot found in the engine (pieces reported as 0): {', '.join(clock.missing)}")
    if prof_text:
        print(f"\n== cProfile over {args.steps} clean steps ==")
        print(prof_text)
    load_end = _loadavg()
    print(f"\nload average at the end {_fmt_load(load_end)}; wall {time.perf_counter() - t_start:.1f}s")

    out.finish(load_average_at_end=load_end, meets_target=ok, engine_stats=stats,
               profile=prof_text)
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
