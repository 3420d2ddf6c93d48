#!/usr/bin/env python
"""The cost of the sampler's options: ms per sampling step for --requests rows, options
off against on, through the engine's real path (`PersistentBatch.sample`: host flags,
the rows' token histories for penalties, `sample_batch`, raw logprobs).

Cases, each on [requests, vocab] float32 logits (new random logits every step):

    greedy        argmax, no options (the cheapest path)
    sampled       temperature 0.8, top-k 50, top-p 0.9, seeded (the Gumbel-max path)
    sampled+opts  the same plus every option on every row: presence, frequency and
                  repetition penalties over a --history-token history, 16 logit_bias
                  entries, min_tokens with 2 stop ids banned, 4 single-token and 4
                  multi-token bad words, logprobs=5
    greedy+opts   greedy with the same options
    greedy+penalties, greedy+bias, greedy+logprobs   one group of options at a time

Device work: on a GPU these ops run on the device (a CUDA device is used when present,
--device); on the CPU the figure is the ops themselves, on a machine that other jobs may
share (say so when recording it).

    python benchmarks/sampler_options.py                       # 256 requests, vocab 32000
    python benchmarks/sampler_options.py --vocab 151936 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from braze.runtime.input_batch import PersistentBatch, static_buffers  # noqa: E402
from braze.runtime.sampler import SamplingParams, bias_entries  # noqa: E402
from arg_checks import at_least, cuda_needed  # noqa: E402
from results_file import ResultsFile  # noqa: E402


CASES = ("greedy", "greedy+penalties", "greedy+bias", "greedy+logprobs", "greedy+opts",
         "sampled", "sampled+opts", "sampled+penalties", "sampled+bias", "sampled+logprobs")
MIN_VOCAB = 16          # the stop, bad-word and multi-token bad-word ids below are < 16


def params_for(case: str, vocab: int) -> SamplingParams:
    kw = {}
    if case.startswith("sampled"):
        kw.update(temperature=0.8, top_k=50, top_p=0.9, seed=1)
    opts = case.split("+")[1] if "+" in case else ""
    if opts in ("opts", "penalties"):
        kw.update(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
    if opts in ("opts", "bias"):
        # 16 entries spread over the vocabulary (97 apart while it has room)
        step = min(97, vocab // 16)
        kw.update(logit_bias={i * step: 1.5 for i in range(16)}, min_tokens=4,
                  stop_token_ids=[2, 3], bad_words_token_ids=[11, 12, 13, 14], max_tokens=1000)
    if opts in ("opts", "logprobs"):
        kw.update(logprobs=5)
    p = SamplingParams(**kw)
    p.validate()
    return p


def measure(case: str, a, device) -> dict:
    S, V, L = a.requests, a.vocab, a.history
    batch = PersistentBatch(S, L + 8, 1, 16, device, static_buffers(S, S, 1, device))
    p = params_for(case, V)
    rows = list(range(S))
    entries = [bias_entries(p, stop_ids=p.stop_token_ids, bad_ids=p.bad_words_token_ids)] * S
    # "+bias"/"+opts": also 4 multi-token bad words (2 and 3 tokens) per row
    seqs = [[[5, 6], [7, 8], [9, 10, 11], [12, 13, 14]] if p.bad_words_token_ids else []] * S
    batch.sampling.set_rows(rows, [p] * S, [7 + r for r in rows], entries, seqs)
    g = torch.Generator().manual_seed(0)
    batch.token_ids[:, :L] = torch.randint(0, V, (S, L), generator=g).to(device)
    prompt = L // 2
    batch.prompt_len[:] = prompt
    # every row decodes its next token after L tokens (prompt L/2, output L/2)
    chunks = [SimpleNamespace(request=SimpleNamespace(row=r), start=L - 1, num_new=1, samples=True)
              for r in rows]
    dev_rows = torch.arange(S, device=device)
    seq_lens = torch.full((S,), L, dtype=torch.int64, device=device)
    logits = [torch.randn(S, V, generator=g).to(device) for _ in range(3)]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t = time.perf_counter()
        tokens, lps = batch.sample(logits[i % 3], chunks, dev_rows, seq_lens)
        tokens.tolist()
        if lps is not None:
            lps.sampled.tolist()
        sync()
        if i >= a.warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return {"case": case, "requests": S, "vocab": V, "history": L,
            "mean_ms": round(statistics.fmean(times), 2),
            "p50_ms": round(statistics.median(times), 2),
            "min_ms": round(min(times), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--history", type=int, default=512, help="tokens per row (half prompt)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", default="greedy,greedy+penalties,greedy+bias,greedy+logprobs,"
                    "greedy+opts,sampled,sampled+opts",
                    help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    unknown = [c for c in a.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {', '.join(map(repr, unknown))}; choose from "
                 f"{', '.join(CASES)}")
    at_least(ap, a, requests=1, vocab=MIN_VOCAB, history=2, steps=1, warmup=0)
    if torch.device(a.device).type == "cuda":
        cuda_needed(ap, f"--device {a.device}")
    out = ResultsFile(a.json, {"device": a.device, "torch": torch.__version__,
                               "threads": torch.get_num_threads()})
    rows = []
    print(f"device {a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{a.requests} rows x vocab {a.vocab}, history {a.history} tokens, {a.steps} steps")
    print(f"{'case':<14} {'mean ms':>9} {'p50 ms':>9} {'min ms':>9}")
    for case in a.cases.split(","):
        r = measure(case, a, a.device)
        rows.append(r)
        out.add(r)
        print(f"{case:<14} {r['mean_ms']:>9} {r['p50_ms']:>9} {r['min_ms']:>9}")
    by = {r["case"]: r["p50_ms"] for r in rows}
    for base in ("greedy", "sampled"):
        if base in by and base + "+opts" in by:
            print(f"options cost (p50), {base}: +{by[base + '+opts'] - by[base]:.2f} ms")
    out.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
