"""Prompt logprobs on -O1 and -O2 artifacts: prefill steps and wall time per request.

A tiny random-weight Llama (braze.tiny), float32, reference backend on the CPU. One
request with a P-token prompt and `prompt_logprobs`, beside (or without) a few plain
decoding requests, on:

  -O1              logits at every token (the LM head over all T tokens of every step)
  -O2, R = S       the default artifact: --max-logits-rows = --max-num-seqs; a step
                   computes at most S rows, so the prompt spreads over ~P / S chunks
  -O2, R = T       --max-logits-rows = --max-num-tokens: the prompt in one wide step

and, as the base line, the same request without prompt_logprobs on -O2 (its LM head
computes one row per sequence). Prints one markdown row per case:
steps, seconds and the prompt logprobs' largest difference from -O1.

    python benchmarks/prompt_logprobs.py [--prompt-len 480] [--max-num-seqs 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from arg_checks import at_least

ROOT = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-len", type=int, default=480)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-tokens", type=int, default=512)
    ap.add_argument("--plain", type=int, default=3, help="plain requests beside it")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    at_least(ap, a, prompt_len=2, max_num_seqs=1, max_num_tokens=1, plain=0, repeat=1)
    if a.prompt_len >= MAX_MODEL_LEN:
        ap.error(f"--prompt-len {a.prompt_len}: the artifacts are compiled for "
                 f"{MAX_MODEL_LEN} tokens, prompt and the one output token; give less")

    import torch

    import braze
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    from braze.tiny import make_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="braze-plp-"))
    ck = make_checkpoint("llama", tmp / "model", seed=1, max_position_embeddings=2048)
    lim = dict(max_num_seqs=a.max_num_seqs, max_num_tokens=a.max_num_tokens,
               targets="", max_model_len=MAX_MODEL_LEN)
    arts = {"-O1": (1, None), "-O2, R = S": (2, None), "-O2, R = T": (2, a.max_num_tokens)}
    paths = {}
    for name, (opt, rows) in arts.items():
        out = tmp / f"a{len(paths)}.braze"
        braze.compile(ck, out, opt_level=opt, max_logits_rows=rows, **lim)
        paths[name] = out
    g = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, 200, (a.prompt_len - 1,), generator=g).tolist()
    plains = [[1] + torch.randint(3, 200, (20,), generator=g).tolist() for _ in range(a.plain)]

    def run(path, plp):
        eng = Engine(path, backend="reference", num_kv_blocks=256, enable_prefix_caching=False)
        best, steps, out = None, 0, None
        for r in range(a.repeat):
            for i, p in enumerate(plains):
                eng.add_request(f"p{r}.{i}", p, SamplingParams(max_tokens=8, ignore_eos=True))
            eng.add_request(f"x{r}", prompt, SamplingParams(max_tokens=1, ignore_eos=True,
                                                           prompt_logprobs=plp))
            s0, t0 = eng.stats()["steps"], time.perf_counter()
            res = eng.run_to_completion()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
            steps, out = eng.stats()["steps"] - s0, res[f"x{r}"]
        return steps, best, out

    print(f"prompt {a.prompt_len} tokens + {a.plain} plain requests; max_num_seqs "
          f"{a.max_num_seqs}, max_num_tokens {a.max_num_tokens}; best of {a.repeat}")
    print("| artifact | prompt_logprobs | steps | seconds | max abs diff vs -O1 |")
    print("|---|---|---:|---:|---:|")
    ref = None
    for name, path in paths.items():
        steps, sec, out = run(path, 1)
        if ref is None:
            ref = out.prompt_logprobs
        diff = max(abs(x.logprob - y.logprob) for x, y in zip(out.prompt_logprobs[1:], ref[1:]))
        print(f"| {name} | 1 | {steps} | {sec:.3f} | {diff:.1e} |")
    steps, sec, _ = run(paths["-O2, R = S"], None)
    print(f"| -O2, R = S | none | {steps} | {sec:.3f} | |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
