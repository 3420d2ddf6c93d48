#!/usr/bin/env python
"""Speculative decoding: generated tokens per second and acceptance, per method, on
repetitive and non-repetitive prompts, through the engine (runtime/speculative.py).

Models: random-weight checkpoints from braze.tiny (a target of --hidden/--layers, and a
1-layer hidden-64 draft with the same tokenizer), compiled at -O2 with enough logits
rows for k + 1 per sequence. Random weights make acceptance a property of these models
(a random model falls into loops that prompt lookup finds; a random draft rarely agrees
with a random target), not a forecast for trained ones; what the figures show is what a
verified token costs against a plain decode step, and that outputs stay identical (each
run is checked against plain decoding, token for token).

With --family deepseek_v3 the target is braze.tiny's DeepSeek-V3 (MLA, grouped MoE,
hidden 64, 2 layers, vocab 256) with one multi-token-prediction layer in its checkpoint
(braze/tiny_mtp.py), and the methods are none, ngram and mtp: "mtp" with a random MTP
layer (it guesses as well as chance), "mtp-aligned" on a second target whose MTP layer
is built to guess it well (its layers scaled down by --aligned-mix so its next token
depends mostly on the current one; the MTP layer predicts from that token alone). The
aligned pair shows what accepted MTP guesses do to steps; neither is a trained model.

With --family gemma4 the target is braze.tiny's Gemma 4 (hidden 64, 5 layers, vocab 256)
compiled with an assistant model (braze/tiny_gemma4_assistant.py, `--mtp-assistant`):
"g4" with a random assistant, "g4-aligned" with one built to guess from the last token.

Prompts: "repetitive" repeats a 6-token unit to --prompt-len tokens; "random" is
uniform random ids. --batch requests per run, greedy, --max-tokens each, ignore_eos.

    python benchmarks/speculative.py                           # reference backend, CPU
    python benchmarks/speculative.py --backend cuda --batch 1 16 --hidden 2048 --layers 16
    python benchmarks/speculative.py --family deepseek_v3 --k 1 3   # the mtp method
    python benchmarks/speculative.py --family gemma4 --k 1 3        # Gemma 4's assistant
    python benchmarks/speculative.py --ngram-host 1024 8192 32768   # prompt lookup's host cost

--ngram-host: what the ngram proposer costs the host per request per step, the model
left out: a request of each context length (random ids over --vocab, and the repetitive
prompt) grows by one token a step for --ngram-steps steps, and NgramProposer.propose is
timed over them (prompt_lookup_max 4, min 1, k 3; the mean microseconds per call).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import braze  # noqa: E402
from braze.runtime.engine import Engine  # noqa: E402
from braze.runtime.sampler import SamplingParams  # noqa: E402
from braze.tiny import make_checkpoint  # noqa: E402
from arg_checks import at_least, cuda_needed  # noqa: E402
from results_file import ResultsFile  # noqa: E402


def prompts(kind: str, n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        if kind == "repetitive":
            unit = torch.randint(3, vocab, (6,), generator=g).tolist()
            out.append([1] + (unit * length)[:length - 1])
        else:
            out.append([1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist())
    return out


def since(before: dict, after: dict) -> dict:
    """The counters of the timed run alone (the warm-up request's taken off)."""
    out = dict(after)
    for k in ("steps", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
              "spec_decode_num_accepted_tokens", "spec_decode_accepted_per_position",
              "spec_decode_proposed_per_position"):
        if k in after:
            b, v = before[k], after[k]
            out[k] = [x - y for x, y in zip(v, b)] if isinstance(v, list) else v - b
    if "spec_decode_num_drafts" in out:
        drafts, proposed = out["spec_decode_num_drafts"], out["spec_decode_num_draft_tokens"]
        acc = out["spec_decode_num_accepted_tokens"]
        out["spec_decode_acceptance_rate"] = acc / proposed if proposed else 0.0
        out["spec_decode_mean_acceptance_length"] = 1 + acc / drafts if drafts else 0.0
    return out


def run(art, spec, ps, a) -> tuple[list, float, dict]:
    """Best of --repeat timed runs, each on a fresh engine (no prefix-cache hits across
    runs); the stats are the last run's, counted from after a warm-up request."""
    best = None
    for _ in range(a.repeat):
        eng = Engine(art, backend=a.backend, num_kv_blocks=a.kv_blocks, speculative=spec,
                     enable_prefix_caching=False)
        params = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
        eng.add_request("warm", [1, 5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
        eng.run_to_completion()
        before = eng.stats()
        ids = [f"r{i}" for i in range(len(ps))]
        t0 = time.perf_counter()
        for rid, p in zip(ids, ps):
            eng.add_request(rid, p, params)
        final = eng.run_to_completion(ids)
        dt = time.perf_counter() - t0
        s = since(before, eng.stats())
        if best is None or dt < best[1]:
            best = ([final[r].token_ids for r in ids], dt, s)
    return best


def deepseek_targets(tmp: Path, a) -> dict:
    """{name: (artifact, {method: speculative config})} for --family deepseek_v3."""
    from braze.tiny_mtp import guessing_mtp_checkpoint, with_mtp_layer
    with contextlib.redirect_stderr(io.StringIO()):
        base = make_checkpoint("deepseek_v3", tmp / "ds", seed=1)
    with_mtp_layer(base, tmp / "ds-mtp")
    guessing_mtp_checkpoint(tmp / "ds-mtp", tmp / "ds-aligned", mix=a.aligned_mix)
    return mtp_targets(tmp, a, {"dsv3": (tmp / "ds-mtp", None),
                                "dsv3-aligned": (tmp / "ds-aligned", None)})


def gemma4_targets(tmp: Path, a) -> dict:
    """{name: (artifact, {method: speculative config})} for --family gemma4."""
    from braze.tiny_gemma4_assistant import make_guessing_pair, make_pair
    with contextlib.redirect_stderr(io.StringIO()):
        pairs = {"g4": make_pair(tmp / "g4"), "g4-aligned": make_guessing_pair(tmp / "g4a")}
    return mtp_targets(tmp, a, pairs)


def mtp_targets(tmp: Path, a, checkpoints: dict) -> dict:
    """{name: (artifact, methods)}: each (checkpoint, assistant or None) compiled at -O2;
    methods none, ngram and mtp for each --k."""
    seqs, k = max(a.batch), max(a.k)
    out = {}
    for name, (ck, assistant) in checkpoints.items():
        art = braze.compile(ck, tmp / f"{name}.braze", opt_level=2, targets="",
                            max_num_seqs=seqs, max_logits_rows=seqs * (k + 1),
                            max_num_tokens=512, mtp_assistant=assistant).root
        methods = {"none": None}
        for kk in a.k:
            methods[f"ngram k={kk}"] = {"method": "ngram", "num_speculative_tokens": kk}
            methods[f"mtp k={kk}"] = {"method": "mtp", "num_speculative_tokens": kk}
        out[name] = (art, methods)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", default="llama", choices=["llama", "deepseek_v3", "gemma4"],
                    help="llama: none/ngram/draft/self on a random llama; deepseek_v3: "
                         "none/ngram/mtp on tiny DeepSeek-V3 targets with an MTP layer; "
                         "gemma4: none/ngram/mtp on tiny Gemma 4 targets with an assistant")
    ap.add_argument("--aligned-mix", type=float, default=0.03,
                    help="deepseek_v3: the aligned target's layer scale (0: the MTP layer "
                         "guesses every token)")
    ap.add_argument("--backend", default="reference", choices=("auto", "reference", "interpret", "cuda"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512,
                    help="llama only: the deepseek_v3 and gemma4 targets have 256")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, nargs="+", default=[3],
                    help="num_speculative_tokens (deepseek_v3: several values, one row each)")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per case; the best counts")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--ngram-host", type=int, nargs="+", metavar="LEN",
                    help="only time the ngram proposer's host work at these context lengths")
    ap.add_argument("--ngram-steps", type=int, default=200)
    a = ap.parse_args(argv)
    at_least(ap, a, hidden=1, layers=1, vocab=16, prompt_len=2, max_tokens=1, kv_blocks=1,
             repeat=1, ngram_steps=1)
    for flag, values in (("--batch", a.batch), ("--k", a.k)):
        if min(values) < 1:
            ap.error(f"{flag} {min(values)}: give 1 or more")
    if a.family == "llama" and a.hidden % 8:
        ap.error(f"--hidden {a.hidden}: the llama target has 4 heads of an even size "
                 "(RoPE rotates pairs): give a multiple of 8")
    if a.backend == "cuda":
        cuda_needed(ap, "--backend cuda")
    if a.ngram_host:
        return ngram_host(a)
    tmp = Path(tempfile.mkdtemp(prefix="braze-spec-bench-"))
    out = ResultsFile(a.json, {"benchmark": "speculative", "config": vars(a),
                               "torch": torch.__version__})
    if a.family in ("deepseek_v3", "gemma4"):
        a.vocab = 256
        targets = (deepseek_targets if a.family == "deepseek_v3" else gemma4_targets)(tmp, a)
    else:
        targets = {"llama": llama_target(tmp, a)}
    print(f"{'target':<13}{'prompts':<11}{'batch':>6}{'method':>13}{'tok/s':>9}{'speedup':>9}"
          f"{'accept':>8}{'mean len':>9}{'steps':>7}  per position")
    for tname, (target, methods) in targets.items():
        for kind in ("repetitive", "random"):
            for batch in a.batch:
                measure(out, a, tname, target, methods, kind, batch)
    out.finish()
    return 0


def ngram_host(a) -> int:
    import time

    import numpy as np

    from braze.runtime.speculative import NgramProposer, SpeculativeConfig

    class Req:
        def __init__(self, rid, toks):
            self.request_id, self.all_token_ids = rid, toks

    out = ResultsFile(a.json, {"benchmark": "speculative-ngram-host", "config": vars(a)})
    rng = np.random.default_rng(0)
    cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_max=4,
                            prompt_lookup_min=1)
    print(f"{'context':>8} {'prompts':<11}{'us/call':>9}")
    for length in a.ngram_host:
        for kind in ("random", "repetitive"):
            toks = (rng.integers(0, a.vocab, length) if kind == "random"
                    else np.tile(np.arange(6), length // 6 + 1)[:length]).tolist()
            prop, req = NgramProposer(cfg), Req("r", toks)
            grow = rng.integers(0, a.vocab, a.ngram_steps).tolist()
            prop.propose([req], [3])
            t0 = time.perf_counter()
            for t in grow:
                req.all_token_ids.append(t)
                prop.propose([req], [3])
            us = (time.perf_counter() - t0) / a.ngram_steps * 1e6
            print(f"{length:>8} {kind:<11}{us:>9.1f}")
            out.add({"context": length, "prompts": kind, "us_per_call": round(us, 1)})
    out.finish()
    return 0


def llama_target(tmp: Path, a):
    a.k = a.k[0]
    with contextlib.redirect_stderr(io.StringIO()):
        tck = make_checkpoint("llama", tmp / "target", seed=1, vocab_size=a.vocab,
                              hidden_size=a.hidden, num_hidden_layers=a.layers,
                              intermediate_size=2 * a.hidden, num_attention_heads=4,
                              num_key_value_heads=2)
        dck = make_checkpoint("llama", tmp / "draft", seed=2, vocab_size=a.vocab,
                              hidden_size=64, num_hidden_layers=1, intermediate_size=128)
    seqs = max(a.batch)
    target = braze.compile(tck, tmp / "t.braze", opt_level=2, targets="", max_num_seqs=seqs,
                           max_logits_rows=seqs * (a.k + 1), max_num_tokens=512).root
    draft = braze.compile(dck, tmp / "d.braze", opt_level=2, targets="", max_num_seqs=seqs,
                          max_num_tokens=512).root
    methods = {"none": None,
               "ngram": {"method": "ngram", "num_speculative_tokens": a.k},
               "draft": {"method": "draft", "model": str(draft), "num_speculative_tokens": a.k},
               # the target as its own draft: every guess accepted, at the cost of k
               # extra target steps: the verification machinery's upper bound
               "self": {"method": "draft", "model": str(target), "num_speculative_tokens": a.k}}
    return target, methods


def measure(out, a, tname, target, methods, kind, batch) -> None:
    ps = prompts(kind, batch, a.prompt_len, a.vocab)
    base = None
    for name, spec in methods.items():
        tokens, dt, s = run(target, spec, ps, a)
        n = sum(len(t) for t in tokens)
        if base is None:
            base = (tokens, n / dt)
        elif tokens != base[0]:
            raise SystemExit(f"{name} changed the output on {kind} prompts")
        row = {"target": tname, "prompts": kind, "batch": batch, "method": name, "tokens": n,
               "seconds": dt, "tokens_per_s": n / dt, "speedup": n / dt / base[1],
               "steps": s["steps"],
               "acceptance_rate": s.get("spec_decode_acceptance_rate"),
               "mean_acceptance_length": s.get("spec_decode_mean_acceptance_length"),
               "accepted_per_position": s.get("spec_decode_accepted_per_position"),
               "proposed_per_position": s.get("spec_decode_proposed_per_position")}
        out.add(row)
        per = ""
        if spec is not None:
            per = " ".join(f"{x / max(y, 1):.2f}" for x, y in
                           zip(row["accepted_per_position"], row["proposed_per_position"]))
        acc = "-" if spec is None else f"{row['acceptance_rate']:.2f}"
        ml = "-" if spec is None else f"{row['mean_acceptance_length']:.2f}"
        print(f"{tname:<13}{kind:<11}{batch:>6}{name:>13}{row['tokens_per_s']:>9.1f}"
              f"{row['speedup']:>9.2f}{acc:>8}{ml:>9}{row['steps']:>7}  {per}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
