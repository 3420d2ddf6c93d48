"""`braze demo`: the whole path on a tiny random model, on the CPU, in seconds.

Builds a random-weight Llama and a small tokenizer in a temp dir, compiles it at
-O2 (fusions, launch plans, cubins for sm_80/sm_90), generates greedily with the
reference interpreter and with the Triton kernels (interpreted on the CPU), and
checks the tokens against transformers' own model.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path

PROMPT = "The quick brown fox"


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(max_tokens: int = 16, keep: str | None = None) -> int:
    import torch

    import braze
    from braze.tiny import make_checkpoint

    t_all = time.perf_counter()
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="braze-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir, artifact = work / "tiny-llama", work / "tiny-llama.braze"
        _say(f"1. building a tiny random-weight Llama and a BPE tokenizer in {model_dir}")
        with contextlib.redirect_stderr(io.StringIO()):
            make_checkpoint("llama", model_dir, seed=0)
        _say(f"2. compiling at -O2: braze compile {model_dir} -o {artifact}")
        t = time.perf_counter()
        braze.compile(model_dir, artifact, force=True, log=lambda m: _say("   " + m))
        _say(f"   compiled in {time.perf_counter() - t:.2f}s")
        _say(f"3. generating {max_tokens} tokens greedily from {PROMPT!r} (reference backend)")
        t = time.perf_counter()
        llm = braze.LLM(artifact, backend="reference")
        params = braze.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        out = llm.generate(PROMPT, params)[0]
        dt = time.perf_counter() - t
        _say(f"   prompt ids {out.prompt_token_ids}")
        _say(f"   generated  {out.token_ids}")
        _say(f"   text       {out.text!r}  (random weights: gibberish is expected)")
        _say(f"   {len(out.token_ids)} tokens in {dt:.2f}s")
        _say("4. the same prompt through the compiled Triton kernels (Triton's CPU interpreter)")
        t = time.perf_counter()
        # one sequence: the interpreter runs every program instance, so do not pad to 256 rows
        kern = braze.LLM(artifact, backend="interpret", max_num_seqs=1).generate(PROMPT, params)[0]
        _say(f"   generated  {kern.token_ids}  in {time.perf_counter() - t:.2f}s: "
             f"{'identical' if kern.token_ids == out.token_ids else 'DIFFERENT'}")
        _say("5. checking against transformers' own implementation with the same weights")
        from transformers import AutoModelForCausalLM
        with contextlib.redirect_stderr(io.StringIO()):
            hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            ref = hf.generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False)[0, len(out.prompt_token_ids):]
        same = ref.tolist() == out.token_ids == kern.token_ids
        _say(f"   transformers generated {ref.tolist()}")
        _say(f"   {'identical' if same else 'DIFFERENT'} greedy tokens")
        _say(f"done in {time.perf_counter() - t_all:.1f}s. " + (
            f"Inspect the artifact with: braze inspect {artifact}" if keep else
            "The model and artifact were temporary: `braze demo --keep DIR` keeps them, then "
            "`braze inspect DIR/tiny-llama.braze` shows what the compiler did"))
        return 0 if same else 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
