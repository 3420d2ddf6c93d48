#!/usr/bin/env python
"""Decode benchmark: braze's engine against HF transformers eager and torch.compile.

For each model shape (written by hand below; random weights, bf16):

    1b   Llama-3.2-1B   hidden 2048, 16 layers, 32 heads / 8 KV heads (head_dim 64),
                        intermediate 8192, vocab 128256, tied embeddings, llama3 RoPE
                        (factor 32)
    8b   Llama-3-8B     hidden 4096, 32 layers, 32 / 8 heads (head_dim 128),
                        intermediate 14336, vocab 128256, untied, llama3 RoPE (factor 8,
                        as Llama-3.1-8B)

the script
  1. builds `LlamaForCausalLM` from the config directly on the GPU (random init there,
     then every matrix re-drawn as normal(0, 0.02), norms 1 + normal(0, 0.05): never
     zeros) and `save_pretrained`s it to a temporary directory;
  2. compiles it with `braze.compile` (-O2, targets sm_90, max_num_seqs = the largest
     batch, cudagraph mode --cudagraph-mode, default full);
  3. cold start, in a fresh process: imports, CUDA init, `open_artifact` (sha256 of every
     file, timed apart), `Engine(backend="cuda")` (weights load timed apart; kernel load,
     plan binding, CUDA-graph capture) and the first token of one --prompt-len prompt;
  4. braze decode: B requests (B in --batches) of --prompt-len random token ids, greedy
     (or sampled at --temperature / --top-p with --sampler, a seed per request: what the
     sampler adds to a step), ignore_eos, are prefilled together, then --warmup decode steps, then --steps timed
     `Engine.step()` calls (every one checked to return one new token for each of the B
     requests); the device is synchronised before and after the timed region (and by
     the engine's own token read-back each step). Also the forward alone: the captured
     graph replay of that decode step (`runner.graphs.run`), --steps times;
  5. HF transformers on the same weights (the model object of step 1), greedy, with a
     `StaticCache`: eager, then `torch.compile(model.forward, mode="reduce-overhead")`
     (CUDA graphs; prefill runs eagerly, only the decode step is compiled). Same prompts,
     same warm-up and step counts, same synchronisation;
  6. a correctness check (greedy runs only): braze's batch-1 greedy tokens fed back through the HF model
     (teacher forcing): how many are HF's argmax, and the largest shortfall of braze's
     chosen logit below the maximum, in units of the logits' standard deviation
     (MISMATCH above 0.25: a wrong kernel gives several units; bf16 rounding ~0.01).

Figures per model and batch: tokens/s = B * steps / time, TPOT = time / steps (mean, and
p50/p99 of the per-step times from CUDA events), braze's speedup over HF eager and over
torch.compile (ratios from this one run). At batch 1: the HBM roofline = bytes read per
decode step (every weight once -- the input embedding table only for the B rows it
gathers when it is not tied to the LM head -- plus the KV cache of the context) / the
GPU's peak bandwidth (--peak-tbps; default by GPU name: H100 3.35, H200 4.8 TB/s), and
the fraction of it the engine step and the forward alone reach. Also: braze compile
time, CUDA graphs captured, capture seconds and graph-pool bytes.

DESIGN §10 targets: batch-1 decode at >= 80 % of the HBM roofline; faster than
torch.compile and HF eager at batch 1, 16 and 64; cold start (weights excluded) < 10 s
for the 8B shape.

Each GPU command must end within 10 minutes: run one model per command, and drop
sections with --no-cold-start / --baselines eager when short of time; --budget stops
starting optional sections once that many seconds have gone.

--dry-run: no GPU. The same code path on the CPU at tiny shapes (hidden 64, 2-3 layers,
vocab 512, float32; braze on the `interpret` backend, the same launch plans under the
Triton interpreter; torch.compile with backend "eager" unless --compile-backend is
given, since inductor's CPU build of a model takes minutes on a small machine), batches
1 and 4, a few steps. Its timings are CPU timings and mean nothing.

    python benchmarks/decode.py --dry-run
    python benchmarks/decode.py --models 1b
    python benchmarks/decode.py --models 8b --steps 64 --json decode-8b.json
    python benchmarks/decode.py --models 8b --baselines eager --no-cold-start
    python benchmarks/decode.py --help
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()          # the cold-start worker counts from here

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from results_file import ResultsFile
from step_profile import markdown as profile_markdown
from step_profile import profile_steps

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
MODELS = {
    "1b": dict(name="Llama-3.2-1B", hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192,
               vocab=128256, tie=True, rope={**LLAMA3_ROPE, "factor": 32.0}, max_pos=131072),
    "8b": dict(name="Llama-3-8B", hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336,
               vocab=128256, tie=False, rope={**LLAMA3_ROPE, "factor": 8.0}, max_pos=131072),
    # the Phi-3 and Gemma 3 families (their own configs: see hf_config)
    "phi4-mini": dict(name="Phi-4-mini", arch="phi3", hidden=3072, layers=32, heads=24,
                      kv_heads=8, inter=8192, vocab=200064, tie=True, partial_rotary=0.75,
                      original_max_pos=4096, rope={"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "short_factor": [1.0] * 48,
                                                   "long_factor": [1.0 + i / 8 for i in range(48)]},
                      max_pos=131072),
    "gemma3-1b": dict(name="Gemma-3-1B", arch="gemma3", hidden=1152, layers=26, heads=4,
                      kv_heads=1, head_dim=256, inter=6912, vocab=262144, tie=True,
                      window=512, pattern=6, qpas=256, rope={"rope_type": "default",
                                                             "rope_theta": 1000000.0},
                      local_theta=10000.0, max_pos=32768),
    # DeepSeek-V3's structure (MLA with the latent cache, grouped sigmoid MoE, shared
    # experts, a dense first layer) at DeepSeek-V2-Lite's attention sizes, 0.9B parameters
    "dsv3-mini": dict(name="DeepSeek-V3-mini", arch="deepseek_v3", hidden=1024, layers=8,
                      heads=16, kv_heads=16, inter=5632, vocab=102400, tie=False,
                      kv_lora=512, q_lora=None, nope=128, rope_dim=64, v_dim=128, experts=32,
                      top_k=6, groups=4, topk_groups=2, moe_inter=704, shared=2, dense=1,
                      rope={"rope_type": "default", "rope_theta": 10000.0}, max_pos=4096),

    # Gemma 4 E2B-like (published figures): per-layer inputs, the last 20 layers share KV
    "gemma4-e2b": dict(name="Gemma-4-E2B-like", arch="gemma4", hidden=1536, layers=35, heads=8,
                       kv_heads=1, head_dim=256, global_head_dim=512, inter=6144, vocab=262144,
                       tie=True, window=512, pattern=5, ple=256, kv_shared=20, max_pos=131072),
    # --cpu: what a laptop without a GPU serves (SmolLM-135M's shape)
    "135m": dict(name="SmolLM-135M", hidden=576, layers=30, heads=9, kv_heads=3, inter=1536,
                 vocab=49152, tie=True, rope={"rope_type": "default", "rope_theta": 10000.0},
                 max_pos=2048),
}
_TINY_ROPE = {**LLAMA3_ROPE, "rope_theta": 10000.0, "factor": 8.0,
              "original_max_position_embeddings": 64}
TINY_MODELS = {     # --dry-run: the same structure (GQA, tied / untied) at interpreter sizes
    "1b": dict(name="tiny Llama-3.2-1B", hidden=64, layers=2, heads=4, kv_heads=2, inter=128,
               vocab=512, tie=True, rope=_TINY_ROPE, max_pos=4096),
    "8b": dict(name="tiny Llama-3-8B", hidden=64, layers=3, heads=4, kv_heads=1, inter=96,
               vocab=512, tie=False, rope=_TINY_ROPE, max_pos=4096),
    "phi4-mini": dict(name="tiny Phi-4-mini", arch="phi3", hidden=64, layers=2, heads=4,
                      kv_heads=2, inter=96, vocab=512, tie=True, partial_rotary=0.75,
                      original_max_pos=64, rope={"rope_type": "longrope", "rope_theta": 10000.0,
                                                 "short_factor": [1.0] * 6,
                                                 "long_factor": [2.0] * 6}, max_pos=4096),
    "gemma3-1b": dict(name="tiny Gemma-3-1B", arch="gemma3", hidden=64, layers=3, heads=4,
                      kv_heads=1, head_dim=32, inter=96, vocab=512, tie=True, window=8,
                      pattern=3, qpas=32, rope={"rope_type": "default", "rope_theta": 1000000.0},
                      local_theta=10000.0, max_pos=4096),
    "dsv3-mini": dict(name="tiny DeepSeek-V3-mini", arch="deepseek_v3", hidden=64, layers=2,
                      heads=4, kv_heads=4, inter=96, vocab=512, tie=False, kv_lora=32,
                      q_lora=24, nope=16, rope_dim=16, v_dim=16, experts=8, top_k=2, groups=4,
                      topk_groups=2, moe_inter=32, shared=1, dense=1,
                      rope={"rope_type": "default", "rope_theta": 10000.0}, max_pos=4096),

    "gemma4-e2b": dict(name="tiny Gemma-4-E2B-like", arch="gemma4", hidden=64, layers=6, heads=4,
                       kv_heads=1, head_dim=16, global_head_dim=32, inter=96, vocab=512,
                       tie=True, window=8, pattern=3, ple=8, kv_shared=2, max_pos=4096),
}
BATCHES = (1, 16, 64)
TINY_BATCHES = (1, 4)
PEAK_TBPS = (   # (substring of torch.cuda.get_device_name, HBM peak TB/s); first match wins
    ("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35),
    ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555),
)
ROOFLINE_TARGET = 0.80
COLD_START_TARGET_S = 10.0
MISMATCH_SIGMA = 0.25
CHECK_TOKENS = 32
BLOCK_SIZE = 16


# -- model and checkpoint ---------------------------------------------------------------------

def hf_config(spec: dict, dtype: str):
    if spec.get("arch") in ("phi3", "gemma3", "gemma4", "deepseek_v3"):
        return _family_config(spec, dtype)
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
        intermediate_size=spec["inter"], vocab_size=spec["vocab"],
        max_position_embeddings=spec["max_pos"], rms_norm_eps=1e-5,
        rope_parameters=dict(spec["rope"]), tie_word_embeddings=spec["tie"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype,
        architectures=["LlamaForCausalLM"])


def _family_config(spec: dict, dtype: str):
    """Phi3Config, Gemma3TextConfig, Gemma4TextConfig or DeepseekV3Config for a shape of
    MODELS with an `arch`."""
    import transformers as tf

    common = dict(hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                  num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                  intermediate_size=spec["inter"], vocab_size=spec["vocab"],
                  max_position_embeddings=spec["max_pos"], tie_word_embeddings=spec["tie"],
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype)
    if spec["arch"] == "deepseek_v3":
        return tf.DeepseekV3Config(
            **common, q_lora_rank=spec["q_lora"], kv_lora_rank=spec["kv_lora"],
            qk_nope_head_dim=spec["nope"], qk_rope_head_dim=spec["rope_dim"],
            v_head_dim=spec["v_dim"], n_routed_experts=spec["experts"],
            num_experts_per_tok=spec["top_k"], n_group=spec["groups"],
            topk_group=spec["topk_groups"], moe_intermediate_size=spec["moe_inter"],
            n_shared_experts=spec["shared"], first_k_dense_replace=spec["dense"],
            routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0,
            rope_parameters=dict(spec["rope"]), architectures=["DeepseekV3ForCausalLM"])
    if spec["arch"] == "phi3":
        return tf.Phi3Config(**common, partial_rotary_factor=spec["partial_rotary"],
                             original_max_position_embeddings=spec["original_max_pos"],
                             rope_parameters=dict(spec["rope"]), architectures=["Phi3ForCausalLM"])
    if spec["arch"] == "gemma4":
        n = spec["layers"]
        return tf.Gemma4TextConfig(
            **common, head_dim=spec["head_dim"], global_head_dim=spec["global_head_dim"],
            sliding_window=spec["window"],
            layer_types=["full_attention" if (i + 1) % spec["pattern"] == 0 else
                         "sliding_attention" for i in range(n)],
            hidden_size_per_layer_input=spec["ple"], vocab_size_per_layer_input=spec["vocab"],
            num_kv_shared_layers=spec["kv_shared"], use_double_wide_mlp=True,
            final_logit_softcapping=30.0, architectures=["Gemma4ForCausalLM"])
    return tf.Gemma3TextConfig(
        **common, head_dim=spec["head_dim"], query_pre_attn_scalar=spec["qpas"],
        sliding_window=spec["window"], sliding_window_pattern=spec["pattern"],
        rope_parameters={"full_attention": dict(spec["rope"]),
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": spec["local_theta"]}},
        architectures=["Gemma3ForCausalLM"])


def build_hf_model(spec: dict, device, dtype):
    """The shape's *ForCausalLM built on `device` in `dtype`, every weight re-drawn there
    (Gemma's (1 + w) norm weights then sit near 1 + 1 = 2, still never zero)."""
    import torch
    from transformers import AutoModelForCausalLM

    name = str(dtype).removeprefix("torch.")
    config = hf_config(spec, name)
    with torch.device(device), contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise.mul_(0.02))
            else:                                   # RMSNorm weights
                p.copy_(noise.mul_(0.05).add_(1.0))
            del noise
    return model


def write_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer covering every id of the model (ids 0, 1, 2 = <pad>, <s>,
    </s>, then "t3", "t4", ...), so the engine detokenises every output as it would in
    serving. Decoding joins the pieces with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<s>": 1, "</s>": 2}
    words.update({f"t{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>"}, indent=2) + "\n")


def bytes_per_decode_step(model, batch: int, context: int, spec: dict) -> dict:
    """Minimum HBM bytes of one decode step: every weight read once, except that an untied
    input embedding table is only read for the `batch` rows it gathers; plus the K and V
    cache of `context` tokens per sequence."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    seen, weights = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        weights += p.numel() * p.element_size()
    if not tied:
        weights -= emb.numel() * emb.element_size()
        weights += batch * emb.shape[1] * emb.element_size()
    if spec.get("experts"):     # an MoE step reads only the experts its tokens picked
        untouched = spec["experts"] - min(spec["experts"], batch * spec["top_k"])
        moe_layers = spec["layers"] - spec.get("dense", 0)
        weights -= moe_layers * untouched * 3 * spec["hidden"] * spec["moe_inter"] * emb.element_size()
    if spec.get("kv_lora"):     # MLA: one latent + rope row per token and layer
        kv = spec["layers"] * (spec["kv_lora"] + spec["rope_dim"]) * emb.element_size() \
            * context * batch
        return {"weights": weights, "kv": kv, "total": weights + kv}
    head_dim = spec.get("head_dim") or spec["hidden"] // spec["heads"]
    kv = 2 * spec["layers"] * spec["kv_heads"] * head_dim * emb.element_size() * context * batch
    return {"weights": weights, "kv": kv, "total": weights + kv}


def peak_tbps(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, tbps in PEAK_TBPS:
        if key in device_name:
            return tbps
    return None


# -- braze ------------------------------------------------------------------------------------

def compile_artifact(ckpt: Path, out: Path, args, max_batch: int):
    """-> the opened Artifact (its files hashed once, while being written)."""
    import braze

    return braze.compile(ckpt, out, opt_level=args.opt_level, targets=args.targets,
                  max_num_seqs=max_batch, max_num_tokens=args.max_num_tokens,
                  max_model_len=args.max_model_len, dtype=args.dtype,
                  cudagraph_mode=args.cudagraph_mode, small_m_gemm=args.small_m_gemm)


def engine_options(args, max_batch: int) -> dict:
    import inspect

    from braze.runtime.engine import Engine

    per_seq = -(-args.max_model_len // BLOCK_SIZE)
    opts = dict(backend=args.backend, num_kv_blocks=max_batch * per_seq + 8,
                max_num_seqs=max_batch, max_num_tokens=args.max_num_tokens,
                buckets=args.bucket_list, cudagraph_mode=args.cudagraph_mode)
    if args.sampler != "torch":
        opts["sampler"] = args.sampler
    if args.fused_prepare != "auto":
        opts["fused_prepare"] = args.fused_prepare == "on"
    elif args.dry_run:
        opts["fused_prepare"] = True        # what the engine does by default on "cuda"
    if args.dry_run and "async_scheduling" in inspect.signature(Engine).parameters:
        opts["async_scheduling"] = True     # what the engine does by default on "cuda"
    return opts


class Sync:
    """Device synchronisation and per-step clocks: CUDA events on a GPU, perf_counter on
    the CPU."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.torch = torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def marks(self, n: int):
        if self.cuda:
            return [self.torch.cuda.Event(enable_timing=True) for _ in range(n)]
        return [None] * n

    def mark(self, marks, i: int, host: list[float]) -> None:
        if self.cuda:
            marks[i].record()
        host[i] = time.perf_counter()

    def step_ms(self, marks, host: list[float]) -> list[float]:
        if self.cuda:
            return [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)]
        return [(host[i + 1] - host[i]) * 1000 for i in range(len(host) - 1)]


def timed_steps(one_step, steps: int, sync) -> tuple[float, list[float]]:
    """Run `steps` calls of `one_step` between device syncs: (total seconds, per-step ms)."""
    marks, host = sync.marks(steps + 1), [0.0] * (steps + 1)
    sync.sync()
    t = time.perf_counter()
    sync.mark(marks, 0, host)
    for i in range(steps):
        one_step()
        sync.mark(marks, i + 1, host)
    sync.sync()
    return time.perf_counter() - t, sync.step_ms(marks, host)


def decode_figures(batch: int, steps: int, total_s: float, step_ms: list[float]) -> dict:
    ms = sorted(step_ms)
    return {"batch": batch, "steps": steps, "time_s": total_s,
            "tokens_per_s": batch * steps / total_s, "tpot_ms": 1000 * total_s / steps,
            "p50_ms": _pct(ms, 50), "p99_ms": _pct(ms, 99)}


def sampling_label(args) -> str:
    """', temperature T[, top_p P]' when braze's requests sample, else ''."""
    if args.temperature <= 0:
        return ""
    return f", temperature {args.temperature:g}" + ("" if args.top_p >= 1 else
                                                     f", top_p {args.top_p:g}") + \
        ("" if args.sampler == "torch" else f", {args.sampler} sampler")


def braze_decode(eng, batch: int, prompts: list[list[int]], args, sync: Sync) -> dict:
    """Prefill `batch` prompts together, warm up, then time --steps engine steps."""
    from braze.runtime.sampler import SamplingParams

    extra = args.profile_steps if batch in args.profile_batches else 0
    sp = SamplingParams(max_tokens=args.warmup + args.steps + extra + 4, ignore_eos=True,
                        temperature=args.temperature, top_p=args.top_p)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, (rid, p) in enumerate(zip(ids, prompts)):
        eng.add_request(rid, p, sp if sp.greedy else dataclasses.replace(sp, seed=i))
    tokens = {rid: [] for rid in ids}
    for _ in range(64):                       # prefill (one step when the budget allows)
        for o in eng.step():
            tokens[o.request_id].extend(o.new_token_ids)
        if all(tokens.values()):
            break
    if not all(tokens.values()):
        raise RuntimeError(f"batch {batch}: prefill did not finish in 64 steps")

    def one_step():
        outs = eng.step()
        if len(outs) != batch or any(len(o.new_token_ids) != 1 or o.finished for o in outs):
            raise RuntimeError(f"batch {batch}: a decode step returned {len(outs)} outputs, "
                               f"not one new token for each of {batch} requests")
        for o in outs:
            tokens[o.request_id].extend(o.new_token_ids)

    for _ in range(args.warmup):
        one_step()
    variant = eng.runner.graphs.last_variant
    total, step_ms = timed_steps(one_step, args.steps, sync)
    res = decode_figures(batch, args.steps, total, step_ms)
    res["graph_variant"] = variant
    if batch in args.profile_batches:
        prof = res["profile"] = profile_steps(one_step, args.profile_steps, sync)
        path = Path(args.profile_dir) / f"profile-{args.model_key}-b{batch}{args.profile_tag}.md"
        path.write_text(profile_markdown(prof, f"braze decode step, {args.model_key} shape, "
                                               f"batch {batch}{sampling_label(args)}"))
    res["tokens_request0"] = tokens[ids[0]]
    res["context_tokens"] = len(prompts[0]) + len(tokens[ids[0]])
    # the forward alone: replay the last decode step already in the static buffers (it
    # writes the same K/V into the same slots again)
    graphs = eng.runner.graphs
    for _ in range(args.forward_warmup):
        graphs.run(batch, batch, True)
    marks, host = sync.marks(args.steps + 1), [0.0] * (args.steps + 1)
    sync.sync()
    t = time.perf_counter()
    sync.mark(marks, 0, host)
    for i in range(args.steps):
        graphs.run(batch, batch, True)
        sync.mark(marks, i + 1, host)
    sync.sync()
    fwd = time.perf_counter() - t
    res["forward"] = decode_figures(batch, args.steps, fwd, sync.step_ms(marks, host))
    for rid in ids:
        eng.abort_request(rid)
    eng.step()
    # the figures above stand; a leak found here is reported and fails the next batch
    s = eng.stats()
    if s["kv_blocks_free"] != s["kv_blocks_total"] or s["num_running"]:
        res["cleanup_error"] = (f"after aborting, {s['kv_blocks_used']} KV blocks are still "
                                f"used and {s['num_running']} requests running")
    free_rows = eng.runner.batch.num_free_rows
    if free_rows != eng.runner.max_num_seqs:
        res["cleanup_error"] = (f"after aborting every request the persistent batch has "
                                f"{free_rows} free rows of {eng.runner.max_num_seqs}: the engine "
                                f"leaks the rows of finished requests")
    return res


def run_braze(art, batches, prompts, args, sync: Sync, out: dict, row) -> dict:
    """Fills `out` as it goes; `row(engine, batch, figures)` after each batch."""
    import torch

    from braze.runtime.engine import Engine

    t = time.perf_counter()
    eng = Engine(art, **engine_options(args, max(batches)))
    out["engine_start_s"] = time.perf_counter() - t
    st = eng.stats()
    g = eng.runner.graphs.stats
    out["graphs"] = {"cuda_graphs_captured": st.get("cuda_graphs_captured"),
                     "capture_seconds": st.get("capture_seconds"),
                     "capture_bytes": g.get("capture_bytes"), "buckets": g.get("buckets"),
                     "mode": g.get("mode"), "full_capture": g.get("full_capture"),
                     "plans_bound": g.get("plans_bound")}
    out["backend"] = eng.backend
    out["kv_blocks"] = st["kv_blocks_total"]
    out["runs"] = {}
    row("braze", 0, {})         # engine start figures, saved before the first batch
    for b in batches:        # a failed batch is reported; the others still run
        try:
            run = out["runs"][b] = braze_decode(eng, b, prompts[:b], args, sync)
            if "cleanup_error" in run:
                out.setdefault("failed", {})[f"{b} cleanup"] = run["cleanup_error"]
            row("braze", b, run)
        except Exception as e:
            out.setdefault("failed", {})[b] = f"{type(e).__name__}: {e}"
            row("braze", b, {})
    out["kernels"] = {k: v for k, v in eng.stats().items()
                      if k.startswith("kernels_") or k == "cubins_unusable"}
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def cold_start_worker(args) -> dict:
    """In a fresh process: imports, CUDA init, open_artifact, Engine, first token."""
    t_imp = time.perf_counter()
    import torch

    from braze.runtime import loader
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    r = {"process_to_main_s": t_imp - _T0, "imports_s": time.perf_counter() - t_imp}
    if args.dry_run:
        torch.set_num_threads(1)       # as the parent does (see main)
    t = time.perf_counter()
    if args.backend == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    r["cuda_init_s"] = time.perf_counter() - t

    hashing = [0.0]
    orig_verify = loader.verify_files

    def timed_verify(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig_verify(*a, **kw)
        finally:
            hashing[0] += time.perf_counter() - t0

    loader.verify_files = timed_verify
    t = time.perf_counter()
    art = loader.open_artifact(args.cold_start_worker)
    r["open_artifact_s"] = time.perf_counter() - t
    r["hash_check_s"] = hashing[0]
    loader.verify_files = orig_verify

    weights = [0.0]
    orig_load = art.load_weights

    def timed_load(*a, **kw):
        t0 = time.perf_counter()
        try:
            out = orig_load(*a, **kw)
            if args.backend == "cuda":
                torch.cuda.synchronize()
            return out
        finally:
            weights[0] += time.perf_counter() - t0

    art.load_weights = timed_load
    t = time.perf_counter()
    eng = Engine(art, **engine_options(args, args.max_batch))
    r["engine_init_s"] = time.perf_counter() - t
    r["weights_load_s"] = weights[0]
    st = eng.stats()
    r["capture_seconds"] = st.get("capture_seconds")
    r["cuda_graphs_captured"] = st.get("cuda_graphs_captured")
    r["capture_bytes"] = eng.runner.graphs.stats.get("capture_bytes")
    prompt = [random.Random(7).randrange(3, 100) for _ in range(args.prompt_len)]
    t = time.perf_counter()
    eng.add_request("cold", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    got = None
    for _ in range(64):
        outs = eng.step()
        if outs:
            got = outs[0]
            break
    r["first_token_s"] = time.perf_counter() - t
    if got is None or len(got.token_ids) != 1:
        raise RuntimeError("the cold-start request produced no token")
    end = time.perf_counter()
    r["total_s"] = end - _T0
    r["artifact_to_first_token_s"] = end - t_imp - r["imports_s"] - r["cuda_init_s"]
    r["cold_start_excl_weights_s"] = r["total_s"] - r["weights_load_s"]
    r["cold_start_excl_weights_and_hashes_s"] = r["cold_start_excl_weights_s"] - r["hash_check_s"]
    return r


def run_cold_start(art: Path, args, max_batch: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--cold-start-worker", str(art),
           "--max-batch", str(max_batch), *args.forward_args]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cold_start_timeout)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip().splitlines()
        raise RuntimeError(f"cold-start worker failed (exit {res.returncode}): "
                           + " | ".join(tail[-3:]))
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["subprocess_wall_s"] = wall
    return r


# -- HF transformers --------------------------------------------------------------------------

def static_cache(model, max_len: int):
    """transformers 5's StaticCache (batch size, device and dtype taken at the prefill)."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


def hf_decode(model, fwd, batch: int, prompts, args, sync: Sync, compiled: bool) -> dict:
    """Greedy decode with a StaticCache: prefill eagerly, then `fwd` (eager or compiled)
    for --warmup + --steps one-token steps."""
    import torch

    dev = next(model.parameters()).device
    P = len(prompts[0])
    cache = static_cache(model, args.max_model_len)
    ids = torch.tensor(prompts[:batch], device=dev)
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    tokens = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(P, device=dev), logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        tokens.append(tok)
        pos = [P]

        def one_step():
            nonlocal tok
            cp = torch.tensor([pos[0]], device=dev)
            if compiled and mark_step is not None:
                mark_step()
            o = fwd(input_ids=tok[:, None], past_key_values=cache, use_cache=True,
                    cache_position=cp)
            tok = o.logits[:, -1].argmax(-1)
            tokens.append(tok)
            pos[0] += 1

        t = time.perf_counter()
        for _ in range(args.warmup):
            one_step()
        sync.sync()
        warm_s = time.perf_counter() - t
        total, step_ms = timed_steps(one_step, args.steps, sync)
    res = decode_figures(batch, args.steps, total, step_ms)
    res["warmup_s"] = warm_s
    res["tokens_request0"] = [int(t[0]) for t in tokens]
    return res


def teacher_forced_check(model, prompt: list[int], generated: list[int]) -> dict:
    """Feed prompt + braze's greedy tokens through the HF model; each braze token should be
    (nearly) HF's argmax at its position."""
    import torch

    dev = next(model.parameters()).device
    gen = generated[:CHECK_TOKENS]
    seq = torch.tensor([prompt + gen], device=dev)
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt) - 1:len(prompt) - 1 + len(gen)].float()
    chosen = logits.gather(1, torch.tensor(gen, device=dev)[:, None])[:, 0]
    best = logits.max(dim=-1).values
    sigma = logits.std(dim=-1)
    deficit = ((best - chosen) / sigma).max().item()
    agree = int((logits.argmax(dim=-1) == torch.tensor(gen, device=dev)).sum())
    return {"tokens": len(gen), "argmax_agree": agree, "max_deficit_sigma": deficit,
            "ok": deficit <= MISMATCH_SIGMA}


def run_hf(model, batches, prompts, args, sync: Sync, which: str, t_start: float, out: dict,
           row) -> dict:
    """Fills `out` as it goes; `row(engine, batch, figures)` after each batch."""
    import torch

    if which == "eager":
        fwd = model.forward
    else:
        kw = {"backend": args.compile_backend}
        if args.compile_backend == "inductor":
            kw["mode"] = "reduce-overhead"
        torch.compiler.reset()
        fwd = torch.compile(model.forward, **kw)
    for b in batches:
        if time.perf_counter() - t_start > args.budget:
            out[b] = {"skipped": f"budget of {args.budget:g} s spent"}
            continue
        out[b] = hf_decode(model, fwd, b, prompts, args, sync, compiled=which == "compile")
        row(f"hf {which}", b, out[b])
        gc.collect()
    if which == "compile":
        torch.compiler.reset()
    return out


# -- one model --------------------------------------------------------------------------------

def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def section(res: dict, name: str, fn, log, out: ResultsFile):
    """Run one section into res[name]; a failure is recorded and the others go on. The
    results file is saved after each, so a run cut short keeps what it measured."""
    t = time.perf_counter()
    part = res[name] = {}       # a section may fill this as it goes (rows saved as they come)
    try:
        got = fn(part)
        if got is not None:
            res[name] = got
        log(f"  {name}: done in {time.perf_counter() - t:.1f}s")
    except Exception as e:      # report and go on with the other sections
        res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}\n" + \
            "".join(traceback.format_exc()[-2500:])
        log(f"  {name}: FAILED after {time.perf_counter() - t:.1f}s: {type(e).__name__}: "
            f"{str(e)[:300]}")
        out.save()
        return None
    out.save()
    return res[name]


def run_model(key: str, args, t_start: float, log, out: ResultsFile) -> dict:
    import torch

    spec = (TINY_MODELS if args.dry_run else MODELS)[key]
    args.model_key = key
    batches = list(args.batch_list)
    dev = args.device
    dtype = getattr(torch, args.dtype)
    sync = Sync(dev)
    res = out.add({"model": key, "name": spec["name"], "shape": spec, "batches": batches})

    def row(engine: str, batch: int, fig: dict) -> None:
        """One measured (engine, batch): shown and saved now, not at the end."""
        if "tpot_ms" in fig:
            log(f"  {engine} batch {batch}: {fig['tpot_ms']:.3f} ms per step, "
                f"{fig['tokens_per_s']:.0f} tokens/s")
        out.save()
    log(f"== {spec['name']} ({key}) ==")
    t = time.perf_counter()
    model = build_hf_model(spec, dev, dtype)
    res["hf_build_s"] = time.perf_counter() - t
    res["params"] = sum(p.numel() for p in model.parameters())
    res["bytes_b1"] = bytes_per_decode_step(model, 1, args.prompt_len + args.warmup
                                            + args.steps // 2, spec)
    prompts = prompts_for(max(batches), args.prompt_len, spec["vocab"])
    with tempfile.TemporaryDirectory(prefix=f"braze-decode-{key}-", dir=args.work_dir) as tmp:
        ckpt, art = Path(tmp) / "hf", Path(tmp) / "model.braze"
        t = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            model.save_pretrained(ckpt)
        if args.tokenizer:
            write_tokenizer(ckpt, spec["vocab"])
        res["save_s"] = time.perf_counter() - t
        log(f"  built and saved {res['params'] / 1e6:.1f}M params in "
            f"{res['hf_build_s'] + res['save_s']:.1f}s")

        opened = {}

        def do_compile(_):
            t0 = time.perf_counter()
            opened["artifact"] = compile_artifact(ckpt, art, args, max(batches))
            return {"seconds": time.perf_counter() - t0}

        if section(res, "braze_compile", do_compile, log, out) is not None:
            if args.cold_start:
                section(res, "cold_start", lambda _: run_cold_start(art, args, max(batches)),
                        log, out)
            if "braze" in args.engines:
                bz = section(res, "braze", lambda part: run_braze(opened["artifact"], batches, prompts, args,
                                                                  sync, part, row), log, out)
                for b, err in ((bz or {}).get("failed") or {}).items():
                    res.setdefault("errors", {})[f"braze batch {b}"] = err
                    log(f"  braze batch {b}: FAILED: {err[:300]}")
    if "eager" in args.engines:
        section(res, "hf_eager", lambda part: run_hf(model, batches, prompts, args, sync,
                                                     "eager", t_start, part, row), log, out)
    if "compile" in args.engines:
        if time.perf_counter() - t_start > args.budget:
            res["hf_compile"] = {"skipped": f"budget of {args.budget:g} s spent"}
        else:
            section(res, "hf_compile", lambda part: run_hf(model, batches, prompts, args, sync,
                                                           "compile", t_start, part, row),
                    log, out)
    braze_runs = (res.get("braze") or {}).get("runs") or {}
    if 1 in braze_runs and args.temperature <= 0:     # sampled tokens are not HF's argmax
        section(res, "check", lambda _: teacher_forced_check(
            model, prompts[0], braze_runs[1]["tokens_request0"]), log, out)
        hf1 = ((res.get("hf_eager") or {}).get(1) or {}).get("tokens_request0")
        if hf1:
            b = braze_runs[1]["tokens_request0"]
            n = next((i for i, (x, y) in enumerate(zip(b, hf1)) if x != y), min(len(b), len(hf1)))
            res.setdefault("check", {})["same_prefix_as_hf_eager"] = n
    return res


# -- report -----------------------------------------------------------------------------------

def _pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    k = (len(sorted_vals) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _markdown(rows: list[list[str]], left: int = 1) -> str:
    head = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(cells) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":"
                                        for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def decode_table(r: dict) -> str:
    rows = [["engine", "batch", "tok/s", "TPOT ms", "p50 ms", "p99 ms", "braze speedup"]]
    for b in r["batches"]:
        bz = _get(r, "braze", "runs", b)
        for label, run in (("braze", bz), ("braze forward only", _get(bz, "forward")),
                           ("HF eager", _get(r, "hf_eager", b)),
                           ("torch.compile", _get(r, "hf_compile", b))):
            if run is None:
                continue
            if "skipped" in run:
                rows.append([label, str(b), "skipped", "", "", "", ""])
                continue
            speed = ""
            if bz and label in ("HF eager", "torch.compile"):
                speed = f"{bz['tokens_per_s'] / run['tokens_per_s']:.2f}x"
            rows.append([label, str(b), f"{run['tokens_per_s']:.1f}", f"{run['tpot_ms']:.3f}",
                         f"{run['p50_ms']:.3f}", f"{run['p99_ms']:.3f}", speed])
    return _markdown(rows)


def roofline_lines(r: dict, peak: float | None, copy_tbps: float | None = None) -> list[str]:
    """Batch-1 decode against the HBM roofline: bytes per step over the nominal peak
    bandwidth, and over the device-to-device copy bandwidth measured in this run."""
    by = r["bytes_b1"]
    if not peak:
        return [f"roofline: n/a (no peak bandwidth for this device; --peak-tbps); bytes per "
                f"batch-1 step {by['total'] / 1e6:.3f} MB"]
    floor_ms = by["total"] / (peak * 1e12) * 1000
    copy_ms = by["total"] / (copy_tbps * 1e12) * 1000 if copy_tbps else None
    out = [f"HBM roofline at batch 1: {by['weights'] / 1e9:.3f} GB of weights + "
           f"{by['kv'] / 1e6:.1f} MB of KV cache per step / {peak:g} TB/s = {floor_ms:.3f} ms "
           f"per token" + (f"; at the measured copy bandwidth {copy_tbps:.2f} TB/s "
                           f"{copy_ms:.3f} ms" if copy_ms else "")]
    for label, run in (("braze engine step", _get(r, "braze", "runs", 1)),
                       ("braze forward only", _get(r, "braze", "runs", 1, "forward")),
                       ("HF eager", _get(r, "hf_eager", 1)),
                       ("torch.compile", _get(r, "hf_compile", 1))):
        if run and "tpot_ms" in run:
            frac = floor_ms / run["tpot_ms"]
            flag = "" if not label.startswith("braze") else (
                "  (target >= 80 %: ok)" if frac >= ROOFLINE_TARGET else "  (target >= 80 %: MISSED)")
            measured = f", {100 * copy_ms / run['tpot_ms']:.1f} % of measured" if copy_ms else ""
            out.append(f"  {label:20s} TPOT {run['tpot_ms']:.3f} ms -> {100 * frac:.1f} % of "
                       f"the nominal roofline{measured}{flag}")
    return out


def measured_copy_tbps(nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second, in TB/s (the
    ceiling a decode step's weight reads can reach on this GPU, as METHOD.md measures it)."""
    import torch
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return nbytes / sorted(times)[len(times) // 2] / 1e12


def report_model(r: dict, peak: float | None, dry_run: bool, copy_tbps: float | None = None) -> str:
    lines = [f"\n## {r['name']} ({r['params'] / 1e6:.1f}M params)"]
    c = _get(r, "braze_compile", "seconds")
    if c is not None:
        lines.append(f"braze compile: {c:.1f}s (checkpoint save {r['save_s']:.1f}s)")
    bz = r.get("braze")
    if bz:
        g = bz["graphs"]
        cb = g.get("capture_bytes")
        lines.append(f"braze engine ({bz['backend']}): start {bz['engine_start_s']:.1f}s; "
                     f"{g['cuda_graphs_captured']} CUDA graphs captured in "
                     f"{g['capture_seconds']:.2f}s, graph pool "
                     f"{'n/a' if cb is None else f'{cb / 2**20:.1f} MiB'}; mode {g['mode']} "
                     f"(full capture: {g['full_capture']}), buckets {g['buckets']}; "
                     f"{bz['kv_blocks']} KV blocks; decode steps replayed: "
                     + ", ".join(f"B={b} {run.get('graph_variant')}" for b, run in bz["runs"].items()))
        k = bz.get("kernels") or {}
        if k:
            lines.append(f"kernels: {k.get('kernels_cubin', 0)} specialisations from their cubins, "
                         f"{k.get('kernels_cubin_less_specialised', 0)} from less specialised "
                         f"ones, {k.get('kernels_jit', 0)} JIT-compiled"
                         + (f" ({k['cubins_unusable']})" if k.get("cubins_unusable") else ""))
    cs = r.get("cold_start")
    if cs:
        ok = cs["cold_start_excl_weights_s"] < COLD_START_TARGET_S
        lines.append(
            f"cold start (fresh process -> first token): {cs['total_s']:.2f}s in all; weights "
            f"load {cs['weights_load_s']:.2f}s excluded -> {cs['cold_start_excl_weights_s']:.2f}s "
            f"(target < {COLD_START_TARGET_S:g} s: {'ok' if ok else 'MISSED'}); of which imports "
            f"{cs['imports_s']:.2f}s, CUDA init {cs['cuda_init_s']:.2f}s, open_artifact "
            f"{cs['open_artifact_s']:.2f}s (sha256 of the files {cs['hash_check_s']:.2f}s), "
            f"engine init less weights {cs['engine_init_s'] - cs['weights_load_s']:.2f}s "
            f"(capture {cs['capture_seconds']:.2f}s, {cs['cuda_graphs_captured']} graphs), "
            f"first token {cs['first_token_s']:.3f}s; without the hash check "
            f"{cs['cold_start_excl_weights_and_hashes_s']:.2f}s")
    if dry_run:
        lines.append("DRY RUN: CPU timings of tiny shapes; they mean nothing about performance")
    lines.append(decode_table(r))
    lines.extend(roofline_lines(r, None if dry_run else peak, copy_tbps))
    ck = r.get("check")
    if ck and "tokens" in ck:
        lines.append(f"check: braze's batch-1 greedy tokens teacher-forced through HF: "
                     f"{ck['argmax_agree']}/{ck['tokens']} are HF's argmax, largest shortfall "
                     f"{ck['max_deficit_sigma']:.4f} sigma of the logits "
                     f"({'ok' if ck['ok'] else 'MISMATCH'}); same first "
                     f"{ck.get('same_prefix_as_hf_eager', 'n/a')} tokens as HF eager's own "
                     f"greedy run")
    for name, err in (r.get("errors") or {}).items():
        lines.append(f"ERROR in {name}: {err.splitlines()[0]}")
    return "\n".join(lines)


def target_misses(results: list[dict], peak: float | None) -> list[str]:
    """DESIGN §10: batch-1 roofline >= 80 %, faster than both baselines at every batch,
    cold start (weights excluded) < 10 s for the 8B shape. Only figures that were measured."""
    out = []
    for r in results:
        runs = _get(r, "braze", "runs") or {}
        b1 = runs.get(1)
        if b1 and peak:
            frac = r["bytes_b1"]["total"] / (peak * 1e12) / (b1["tpot_ms"] / 1000)
            if frac < ROOFLINE_TARGET:
                out.append(f"{r['model']} batch 1 at {100 * frac:.0f} % of the HBM roofline")
        for b, run in runs.items():
            for key, label in (("hf_eager", "HF eager"), ("hf_compile", "torch.compile")):
                base = _get(r, key, b)
                if base and "tokens_per_s" in base and run["tokens_per_s"] <= base["tokens_per_s"]:
                    out.append(f"{r['model']} batch {b} not faster than {label} "
                               f"({run['tokens_per_s'] / base['tokens_per_s']:.2f}x)")
        cs = r.get("cold_start")
        if cs and r["model"] == "8b" and cs["cold_start_excl_weights_s"] >= COLD_START_TARGET_S:
            out.append(f"8b cold start {cs['cold_start_excl_weights_s']:.1f} s")
    return out


# -- main -------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Decode tokens/s and TPOT of braze's engine against HF transformers eager "
                    "and torch.compile(mode='reduce-overhead') on Llama-3.2-1B / Llama-3-8B "
                    "shapes with random bf16 weights; HBM roofline fraction, cold start, "
                    "CUDA-graph capture.",
        epilog="DESIGN targets: batch-1 decode >= 80 % of the HBM roofline; faster than "
               "torch.compile and HF eager at batch 1, 16, 64; cold start < 10 s (8B, weights "
               "excluded).")
    ap.add_argument("--models", default="1b,8b", help="comma list of 1b, 8b, phi4-mini, "
                    "gemma3-1b, gemma4-e2b, dsv3-mini (default 1b,8b; one per GPU command keeps "
                    "within 10 minutes)")
    ap.add_argument("--batches", default=None, help=f"comma list (default "
                    f"{','.join(map(str, BATCHES))}; dry run {','.join(map(str, TINY_BATCHES))})")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed decode steps per batch (default 128; dry run 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="decode steps before timing (default 8; dry run 2)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--engines", default="braze,eager,compile",
                    help="comma list of braze, eager (HF), compile (HF + torch.compile)")
    ap.add_argument("--baselines", default=None,
                    help="shorthand: which HF baselines to run (eager,compile); braze always")
    ap.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                    help="give the artifact no tokenizer (the engine then skips "
                         "detokenisation; default: a word-level tokenizer over the vocab)")
    ap.add_argument("--no-cold-start", dest="cold_start", action="store_false",
                    help="skip the cold-start measurement (a fresh process loading the artifact)")
    ap.add_argument("--peak-tbps", type=float, default=None,
                    help="HBM peak TB/s for the roofline (default by GPU name: H100 3.35, "
                         "H200 4.8)")
    ap.add_argument("--opt-level", type=int, choices=(0, 1, 2), default=2)
    ap.add_argument("--targets", default=None, help="cubin targets (default sm_90; dry run none)")
    ap.add_argument("--cudagraph-mode", choices=("none", "piecewise", "full"), default="full",
                    help="compile and engine CUDA-graph mode (default full: one graph per "
                         "decode step)")
    ap.add_argument("--small-m-gemm", choices=("extern", "triton"), default="extern",
                    help="braze compile --small-m-gemm: the linears at buckets of <= 16 tokens "
                         "through cuBLAS (extern, the default) or braze's skinny GEMM with the "
                         "gated MLP's activation in its epilogue (triton)")
    ap.add_argument("--buckets", default="auto",
                    help="engine batch buckets: 'auto' (the batches and max_num_tokens: fewer "
                         "graphs to capture), 'default' (the engine's own list) or a comma list")
    ap.add_argument("--max-num-tokens", type=int, default=None,
                    help="token budget per step (default: largest batch x prompt length, so "
                         "each batch prefills in one step)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend for the HF baseline (default inductor; dry run "
                         "eager)")
    ap.add_argument("--budget", type=float, default=540.0, metavar="SECONDS",
                    help="start no HF baseline run after this many seconds (default 540)")
    ap.add_argument("--cold-start-timeout", type=float, default=240.0, help=argparse.SUPPRESS)
    ap.add_argument("--work-dir", default=None, help="where checkpoints and artifacts go "
                    "(default the system temp dir; the 8B shape needs ~33 GB)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: tiny shapes on the CPU, the same code path")
    ap.add_argument("--cpu", action="store_true",
                    help="decode on the CPU at a real small shape (default --models 135m, "
                         "float32, braze's reference backend, against HF eager): what "
                         "`braze serve` does on a laptop")
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON, rewritten after "
                    "every measured row so a run cut short keeps its figures ('-': stdout at "
                    "the end)")
    ap.add_argument("--profile-batches", default="", metavar="B,B",
                    help="profile braze's decode step at these batches with torch.profiler "
                         "(kernels per step, GPU busy share, idle gaps), e.g. 1,64")
    ap.add_argument("--profile-steps", type=int, default=5, help="steps per profile (default 5)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="braze's requests sample at this temperature, each with its own seed "
                         "(default 0: greedy, one argmax per step; the HF baselines stay "
                         "greedy): what sampling costs a step, and the teacher-forced check "
                         "is skipped")
    ap.add_argument("--sampler", choices=("torch", "triton"), default="torch",
                    help="braze's sampler for steps no request restricts (EngineOptions."
                         "sampler): torch ops, or one fused Triton kernel")
    ap.add_argument("--fused-prepare", choices=("auto", "on", "off"), default="auto",
                    help="EngineOptions.fused_prepare: a step's inputs by one Triton kernel "
                         "(on), or by ~20 torch ops (off); auto: the engine's default (on "
                         "for cuda)")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="braze's requests' top_p (default 1.0: no filter; below 1 the "
                         "sampler sorts each row)")
    ap.add_argument("--profile-dir", default=".", help="where profile-<model>-b<B>.md tables "
                    "go (default: the current directory)")
    ap.add_argument("--cold-start-worker", metavar="ARTIFACT", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-model-len", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    dry = args.dry_run
    if args.cpu and args.models == "1b,8b":
        args.models = "135m"
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.model_list if m not in MODELS]
    if bad:
        ap.error(f"unknown model {bad[0]!r}; choose from {', '.join(MODELS)}")
    args.batch_list = (TINY_BATCHES if dry else BATCHES) if args.batches is None else \
        tuple(int(b) for b in args.batches.split(",") if b.strip())
    if not args.batch_list or min(args.batch_list) < 1:
        ap.error("--batches needs positive integers")
    try:
        args.profile_batches = {int(b) for b in args.profile_batches.split(",") if b.strip()}
    except ValueError:
        ap.error(f"--profile-batches {args.profile_batches!r}: give batch sizes, e.g. 1,64")
    unmeasured = sorted(args.profile_batches - set(args.batch_list))
    if unmeasured:
        ap.error(f"--profile-batches {','.join(map(str, unmeasured))}: not among the batches "
                 f"measured ({','.join(map(str, args.batch_list))}); a profile is taken at a "
                 "measured batch: add it to --batches")
    args.profile_tag = ("" if args.temperature <= 0 else
                        f"-t{args.temperature:g}" + ("" if args.top_p >= 1 else
                                                     f"-p{args.top_p:g}")) + \
        ("" if args.sampler == "torch" else f"-{args.sampler}") + \
        ("" if args.fused_prepare == "auto" else f"-prepare-{args.fused_prepare}")
    args.steps = args.steps if args.steps is not None else (3 if dry else 128)
    args.warmup = args.warmup if args.warmup is not None else (2 if dry else 8)
    args.forward_warmup = 1 if dry else 3
    if args.steps < 1 or args.warmup < 0 or args.prompt_len < 1:
        ap.error("--steps and --prompt-len must be positive, --warmup >= 0")
    if args.cpu and args.baselines is None and args.engines == "braze,eager,compile":
        args.engines = "braze,eager"      # torch.compile's CPU build takes minutes here
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.baselines is not None:
        args.engines = ["braze"] + [e.strip() for e in args.baselines.split(",") if e.strip()]
    for e in args.engines:
        if e not in ("braze", "eager", "compile"):
            ap.error(f"unknown engine {e!r}")
    cpu = dry or args.cpu
    args.targets = args.targets if args.targets is not None else ("" if cpu else "sm_90")
    args.compile_backend = args.compile_backend or ("eager" if cpu else "inductor")
    args.backend = args.backend or ("interpret" if dry else "reference" if cpu else "cuda")
    args.device = "cpu" if cpu else "cuda"
    args.dtype = "float32" if cpu else "bfloat16"
    args.cold_start = args.cold_start and not args.cpu
    max_b = args.max_batch or max(args.batch_list)
    if args.max_model_len is None:
        need = args.prompt_len + args.warmup + args.steps + args.profile_steps + 8
        args.max_model_len = -(-need // BLOCK_SIZE) * BLOCK_SIZE
    if args.max_num_tokens is None:
        args.max_num_tokens = max(max_b * args.prompt_len, max_b, 16)
    if args.buckets == "auto":
        args.bucket_list = sorted({b for b in args.batch_list if b <= args.max_num_tokens}
                                  | {args.max_num_tokens, 1})
    elif args.buckets == "default":
        args.bucket_list = None
    else:
        args.bucket_list = sorted({int(b) for b in args.buckets.split(",") if b.strip()})
    # what the cold-start worker needs to build the same engine
    args.forward_args = ["--backend", args.backend, "--max-model-len", str(args.max_model_len),
                         "--max-num-tokens", str(args.max_num_tokens), "--prompt-len",
                         str(args.prompt_len), "--cudagraph-mode", args.cudagraph_mode,
                         "--buckets", "default" if args.bucket_list is None else
                         ",".join(map(str, args.bucket_list))]
    if dry:
        args.forward_args.append("--dry-run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cold_start_worker:
        args.max_batch = args.max_batch or max(args.batch_list)
        print(json.dumps(cold_start_worker(args)))
        return 0
    t_start = time.perf_counter()
    import torch
    import transformers

    if args.dry_run:
        # tiny CPU work: one thread keeps small machines shared with other jobs from
        # stalling in OpenMP barriers (seen: 100x slower steps with 2 threads on 2 busy cores)
        torch.set_num_threads(1)

    def log(msg):
        print(msg, flush=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: run with --cpu (CPU decode) or --dry-run (the script's "
              "GPU path, checked on the CPU at tiny shapes)")
        return 2
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    peak = None if args.device == "cpu" else peak_tbps(gpu, args.peak_tbps)
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "n/a"
    log(f"braze decode benchmark{' (DRY RUN, CPU, tiny shapes)' if args.dry_run else ' (CPU)' if args.cpu else ''}: "
        f"models {','.join(args.model_list)}, batches {','.join(map(str, args.batch_list))}, "
        f"{args.steps} steps after {args.warmup} warm-up, prompt {args.prompt_len}, "
        f"{args.dtype}, engines {','.join(args.engines)}; braze -O{args.opt_level} targets "
        f"{args.targets or 'none'} backend {args.backend} cudagraph {args.cudagraph_mode} "
        f"small-M GEMMs {args.small_m_gemm}, fused prepare {args.fused_prepare}, "
        f"max_model_len {args.max_model_len}, max_num_tokens {args.max_num_tokens}, buckets "
        f"{args.bucket_list or 'engine default'}; torch.compile backend "
        f"{args.compile_backend}")
    log(f"GPU {gpu} (peak {peak if peak else 'n/a'} TB/s), torch {torch.__version__}, "
        f"transformers {transformers.__version__}, triton {triton_v}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs")
    out = ResultsFile(args.json, {
        "date": time.strftime("%Y-%m-%d"), "gpu": gpu, "peak_tbps": peak, "dry_run": args.dry_run,
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_v,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "config": {k: v for k, v in vars(args).items()
                   if k not in ("json", "forward_args", "cold_start_worker")}},
        drop=("tokens_request0",))            # token lists are long and not figures
    if args.device == "cuda":
        out.doc["copy_tbps"] = measured_copy_tbps()
        log(f"device-to-device copy: {out.doc['copy_tbps']:.2f} TB/s (read + write)")
        out.save()
    for key in args.model_list:
        r = run_model(key, args, t_start, log, out)
        print(report_model(r, peak, args.dry_run, out.doc.get("copy_tbps")), flush=True)
        gc.collect()                # the model and its caches go with run_model's frame
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results = out.results
    misses = []
    if not args.dry_run:
        misses = target_misses(results, peak)
        print("\nDESIGN targets: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    failed = [f"{r['model']}: {name}" for r in results for name in (r.get("errors") or {})]
    mismatch = [r["model"] for r in results if _get(r, "check", "ok") is False]
    print(f"\nwall {time.perf_counter() - t_start:.1f}s" +
          (f"; failed sections: {', '.join(failed)}" if failed else "") +
          (f"; MISMATCH in {', '.join(mismatch)}" if mismatch else ""))
    out.finish(wall_s=time.perf_counter() - t_start, failed=failed, mismatch=mismatch,
               target_misses=misses)
    return 1 if failed or mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
