#!/usr/bin/env python
"""Kernel benchmark: every Triton kernel template of codegen/kernels/ against its torch reference.

For each model shape (Llama-3-8B, Qwen3-30B-A3B, DeepSeek-V3, and Llama-3.2-1B for the GEMMs
only; bf16) and each kernel the model runs, a
one-node IR graph of the op is built at the benchmark size, lowered exactly as the compiler
lowers it (`braze.codegen.kernels.lower_node` -> launches, workspaces, generated sources)
and run through the runtime's launch-plan runner (`KernelModules` + `PlanRunner`) on CUDA
tensors. The reference is the op's own implementation from the IR registry
(`braze.ir.get_op(op).impl`, plain torch, run eagerly on the same tensors).

    kernel            op                  shapes (per model)
    embedding         embedding           ids i64[T] -> [T, hidden] from [vocab, hidden]
    rms_norm          rms_norm            [T, hidden]
    add_rms_norm      add_rms_norm        [T, hidden] + [T, hidden] -> (normed, sum)
    rope_cache_write  rope_cache_write    q/k/v: column views of one [T, (H + 2 KV) * D] QKV
                                          output; writes k', v into a paged cache (block 16);
                                          with QK-norm for Qwen3 (per-head RMSNorm first)
    attention         attention           decode: S = T sequences of 1 new token each over
                                          --context cached tokens; prefill: fresh prompts,
                                          T = 2048 as 4 x 512, T = 8192 as 4 x 2048; shuffled
                                          block tables
    fused_moe         fused_moe           Qwen3: 128 experts, top-8, moe intermediate 768
    grouped_topk      grouped_topk        DeepSeek-V3's router: f32 logits [T, 256] + bias, 8
                                          groups, the 4 best kept, top-8, scale 2.5
    fused_moe_routed  fused_moe_routed    DeepSeek-V3: 256 experts, top-8 from grouped_topk,
                                          moe intermediate 2048
    latent_attention  latent_attention    DeepSeek-V3's absorbed MLA: 128 heads over one
                                          [kv_lora_rank 512 + rope 64] latent row per token;
                                          decode and prefill as for attention
    swiglu            fused_pointwise     silu(g) * u over the halves of [T, 2 I] (the generated
                                          kernel of `fuse-pointwise`; Llama: I = 14336)
    index_select      index_select        prune-logits gather [T, hidden] -> [S, hidden]
    cat               cat                 the RoPE preamble cat(f, f): f32 [T, D/2] -> [T, D]
    gemm_qkv          linear              skinny_gemm (--small-m-gemm triton) against the extern
    gemm_o                                call it replaces, torch's F.linear (cuBLAS): x [T, K]
    gemm_gate_up                          @ W[N, K]^T per projection (qkv and gate_up merged as
    gemm_down                             -O2 ships them; lm_head over the vocabulary), only at
    gemm_gate_up_glu  linear_glu          T <= 16 (the buckets the option applies to); the
    gemm_lm_head                          _glu row fuses silu(gate) * up into gate_up's epilogue
                                          (fuse-linear-glu) against cuBLAS + torch's silu, mul. Both are
                                          timed replayed from a CUDA graph, as the runtime runs
                                          them; GB/s is weight + x + y bytes over each one's
                                          time; "speedup" = cuBLAS us / Triton us, > 1 means
                                          the kernel wins (a table per model sums it up)

Sizes: decode-like T = 1, 16, 64 and prefill-like T = 2048, 8192 (--sizes to change).

Timing (CUDA): warmup, then the median of --iters iterations, each bracketed by CUDA events.
Before each iteration a 256 MB buffer is zeroed (as triton.testing.do_bench does) so every
iteration starts with a cold L2 and the host's launch work overlaps that flush. The kernels'
launches are captured once in a CUDA graph and the graph is replayed (the runtime captures its
steps in CUDA graphs), falling back to eager launches if capture fails (--no-graphs: always
eager). The torch reference runs eagerly (it syncs with the host in attention and MoE).

Metrics: bytes are the roofline minimum of the op, not what the kernel actually moves:
reads of every operand + writes of every result (attention: K/V of every context token
of every sequence, once, + q + out; MoE: the weights of the experts that were selected at
least once + the router + x + out; rope: q, k, v, cos, sin read, q' and the k/v cache rows
written). GB/s = bytes / time, % HBM = GB/s / the GPU's peak (H100 SXM 3350, H200 4800 GB/s,
from torch.cuda.get_device_name, or --peak-gbps). TFLOP/s for the GEMM-like work (attention,
MoE). speedup = torch us / kernel us.

Targets (from the issue), flagged in the table and summarised at the end (--strict: exit 1
if one is missed): norm, RoPE and activation kernels (rms_norm, add_rms_norm,
rope_cache_write, swiglu) >= 80 % of HBM peak at prefill sizes (T >= 2048); fused MoE
faster than the torch reference at every size.

Every case is also checked: the kernel's outputs (and the caches it writes) against the
reference's, max abs error and max error relative to max |reference| printed; a case over
the tolerance is marked MISMATCH (and the exit code is 1).

--dry-run: no GPU needed. Every case runs at tiny shapes and sizes on the CPU under the
Triton interpreter (TRITON_INTERPRET=1 set before triton is imported), checked against the
reference; the timing columns print "n/a". Use it to check the script before a GPU session.

    python benchmarks/kernel_bench.py --dry-run
    python benchmarks/kernel_bench.py
    python benchmarks/kernel_bench.py --models llama3-8b qwen3-30b-a3b --json out.json
    python benchmarks/kernel_bench.py --kernels attention fused_moe --sizes 1 64 8192
    python benchmarks/kernel_bench.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from results_file import ResultsFile

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "codegen" / "kernels"

# -- shapes -----------------------------------------------------------------------------------

MODELS = {
    "llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336,
                      vocab=128256, eps=1e-5, qk_norm=False, moe=None),
    "qwen3-30b-a3b": dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, inter=None,
                          vocab=151936, eps=1e-6, qk_norm=True,
                          moe=dict(experts=128, top_k=8, inter=768)),
    # MLA: heads/kv_heads/head_dim describe the latent attention (one shared latent row of
    # kv_lora_rank + rope per token); inter is the dense first layers' MLP
    "deepseek-v3": dict(hidden=7168, heads=128, kv_heads=1, head_dim=576, inter=18432,
                        vocab=129280, eps=1e-6, qk_norm=False, moe=None,
                        mla=dict(rank=512, rope=64),
                        routed=dict(experts=256, n_group=8, topk_group=4, top_k=8, inter=2048,
                                    scale=2.5)),
    # the GEMMs only (gemm_only): its 2048-wide projections are where a decode GEMM has the
    # fewest output tiles for the SMs; its other kernels are the 8B's at half width
    "llama3.2-1b": dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, inter=8192,
                        vocab=128256, eps=1e-5, qk_norm=False, moe=None, gemm_only=True),
}
# --dry-run: the same structure at interpreter-friendly sizes (GQA 2 and 4, split-KV decode,
# prefill tiles, both MoE regimes: T * top_k / E above and below moe.SMALL_ROWS_PER_EXPERT)
TINY_MODELS = {
    "llama3-8b": dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=48, vocab=300,
                      eps=1e-5, qk_norm=False, moe=None),
    "qwen3-30b-a3b": dict(hidden=48, heads=4, kv_heads=1, head_dim=16, inter=None, vocab=300,
                          eps=1e-6, qk_norm=True, moe=dict(experts=8, top_k=2, inter=24)),
    "deepseek-v3": dict(hidden=48, heads=4, kv_heads=1, head_dim=48, inter=40, vocab=300,
                        eps=1e-6, qk_norm=False, moe=None, mla=dict(rank=32, rope=16),
                        routed=dict(experts=16, n_group=4, topk_group=2, top_k=4, inter=24,
                                    scale=2.5)),
    "llama3.2-1b": dict(hidden=32, heads=4, kv_heads=2, head_dim=8, inter=160, vocab=300,
                        eps=1e-5, qk_norm=False, moe=None, gemm_only=True),
}
DECODE_SIZES = (1, 16, 64)
PREFILL_SIZES = (2048, 8192)
PREFILL_FROM = 512             # a size >= this is prefill-like (fresh prompts), else decode
CONTEXT = 4096                 # decode: tokens per sequence (cached + the new one)
TINY_SIZES = (1, 5, 160)       # --dry-run: decode, decode, prefill (MoE large regime)
TINY_PREFILL_FROM = 32
TINY_CONTEXT = 40
BLOCK_SIZE = 16
GPU_DEVICE = "cuda"
RANDN_CHUNK = 1 << 28          # elements drawn in float32 at once

GEMMS = ("gemm_qkv", "gemm_o", "gemm_gate_up", "gemm_gate_up_glu", "gemm_down", "gemm_lm_head")
KERNELS = ("embedding", "rms_norm", "add_rms_norm", "rope_cache_write", "attention",
           "latent_attention", "fused_moe", "grouped_topk", "fused_moe_routed", "swiglu",
           "index_select", "cat") + GEMMS
GEMM_MAX_TOKENS = 16           # codegen/kernels/skinny_gemm.py MAX_TOKENS: its buckets
# --gemm-configs sweep: the skinny GEMM's module constants, as TARGET_PROGRAMS/TILE_KiB/
# NUM_WARPS[/GEMV_STAGES]; the default (264/16/4/1) first, then what puts more W in flight
# per SM, which the GEMV branch needs to hide HBM latency: more CTAs, a cp.async pipeline
# in the GEMV loop (stages 2-4, bucket 1 only), bigger tiles; then smaller tiles, 8 warps
GEMM_SWEEP = ("264/16/4/1", "264/16/4/2", "264/16/4/3", "528/16/4/1", "528/16/4/3",
              "1056/16/4/1", "264/32/4/1", "264/32/4/3", "528/32/4/1", "264/8/4/1",
              "264/8/4/4", "264/16/8/1", "528/32/8/3")
# the template modules of codegen/kernels/ and the kernels benchmarked for each (--kernels
# takes either name)
TEMPLATES = {"embedding": ("embedding",), "norm": ("rms_norm", "add_rms_norm"),
             "rope": ("rope_cache_write",), "attention": ("attention",),
             "mla": ("latent_attention",), "router": ("grouped_topk",),
             "moe": ("fused_moe", "fused_moe_routed"),
             "pointwise": ("swiglu",), "gather": ("index_select", "cat"),
             "skinny_gemm": GEMMS}
# kernels held to >= 80 % of HBM peak at prefill sizes
BANDWIDTH_TARGET = {"rms_norm", "add_rms_norm", "rope_cache_write", "swiglu"}
BANDWIDTH_TARGET_PCT = 80.0
BANDWIDTH_TARGET_FROM = 2048

PEAK_GBPS = (   # (substring of torch.cuda.get_device_name, HBM peak GB/s); first match wins
    ("GH200", 4000.0), ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0),
    ("H100", 3350.0), ("B200", 8000.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0), ("L40S", 864.0), ("A10G", 600.0),
)
# tolerance on max |kernel - reference| / max |reference| (bf16/f16: a few ulps of rounding
# order; attention rounds p to the model dtype for the p @ v product)
TOL = {"bf16": 2e-2, "f16": 1e-2, "f32": 1e-4}
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


# -- cases ------------------------------------------------------------------------------------

@dataclass
class Case:
    model: str
    kernel: str
    size: str                   # label for the table
    tokens: int
    regime: str                 # "decode" | "prefill"
    graph: object               # braze.ir.Graph
    index: int                  # the benchmarked node
    sizes: dict                 # T, S, MB, NB bindings
    feeds: dict                 # graph input/param ref -> tensor
    bytes: int
    flops: int = 0
    note: str = ""
    results: dict = field(default_factory=dict)


def _step_seqs(tokens: int, regime: str, context: int) -> list[tuple[int, int]]:
    """(cached, new) per sequence: decode = `tokens` sequences of one new token after
    context - 1 cached; prefill = fresh prompts, 4 sequences (2048: 4 x 512, 8192: 4 x 2048)."""
    if regime == "decode":
        return [(context - 1, 1)] * tokens
    n_seqs = 4 if tokens >= 4 * 16 else 1
    base, extra = divmod(tokens, n_seqs)
    return [(0, base + (1 if i < extra else 0)) for i in range(n_seqs)]


class Builder:
    """Builds the benchmark cases of one model: graphs, inputs, byte and flop counts."""

    def __init__(self, model: str, shape: dict, dtype: str, device, context: int,
                 prefill_from: int, seed: int):
        import torch
        self.torch = torch
        self.model, self.m, self.dtype, self.device = model, shape, dtype, device
        self.tdt = getattr(torch, DTYPES[dtype])
        self.esize = torch.empty((), dtype=self.tdt).element_size()
        self.context, self.prefill_from = context, prefill_from
        self.gen = torch.Generator(device=device).manual_seed(seed)

    # -- tensors ---------------------------------------------------------------------------
    def randn(self, shape, scale=1.0, dtype=None):
        shape = tuple(shape)
        if math.prod(shape) > RANDN_CHUNK and len(shape) > 1 and shape[0] > 1:
            # DeepSeek-V3's experts are 22.5 GB in bf16: drawn a slice at a time, so the
            # float32 draw never doubles them
            out = self.torch.empty(shape, dtype=dtype or self.tdt, device=self.device)
            rows = max(1, RANDN_CHUNK // math.prod(shape[1:]))
            for i in range(0, shape[0], rows):
                out[i:i + rows] = self._draw(out[i:i + rows].shape, scale, dtype)
            return out
        return self._draw(shape, scale, dtype)

    def _draw(self, shape, scale, dtype):
        t = self.torch.randn(shape, generator=self.gen, device=self.device,
                             dtype=self.torch.float32)
        if scale != 1.0:
            t.mul_(scale)
        return t.to(dtype or self.tdt)

    def randint(self, high, shape, dtype):
        return self.torch.randint(0, high, tuple(shape), generator=self.gen, device=self.device,
                                  dtype=dtype)

    def step(self, seqs):
        """Batch metadata (braze.ir.contract.build_step) over shuffled cache blocks."""
        from braze.ir.contract import SeqChunk, build_step
        torch = self.torch
        need = [-(-(c + n) // BLOCK_SIZE) for c, n in seqs]
        num_blocks = sum(need) + 1
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(len(seqs)))
        chunks, used = [], 0
        for (c, n), k in zip(seqs, need):
            chunks.append(SeqChunk([0] * n, c, perm[used:used + k].tolist()))
            used += k
        return build_step(chunks, BLOCK_SIZE, device=self.device), num_blocks

    def regime(self, tokens):
        return "prefill" if tokens >= self.prefill_from else "decode"

    def case(self, kernel, tokens, g, index, sizes, feeds, nbytes, flops=0, size=None, note=""):
        return Case(self.model, kernel, size or f"T={tokens}", tokens, self.regime(tokens), g,
                    index, sizes, feeds, int(nbytes), int(flops), note)

    # -- one builder per kernel ------------------------------------------------------------
    def embedding(self, tokens):
        from braze.ir import Graph, T, TensorType
        m = self.m
        g = Graph("embedding")
        ids = g.add_input("ids", TensorType((T,), "i64"))
        w = g.add_param("w", TensorType((m["vocab"], m["hidden"]), self.dtype))
        g.set_output("y", g.op("embedding", ids, w))
        feeds = {ids.ref: self.randint(m["vocab"], (tokens,), self.torch.int64),
                 w.ref: self.randn((m["vocab"], m["hidden"]))}
        nbytes = tokens * 8 + 2 * tokens * m["hidden"] * self.esize
        return self.case("embedding", tokens, g, 0, {"T": tokens}, feeds, nbytes)

    def rms_norm(self, tokens):
        from braze.ir import Graph, T, TensorType
        h = self.m["hidden"]
        g = Graph("rms_norm")
        x = g.add_input("x", TensorType((T, h), self.dtype))
        w = g.add_param("w", TensorType((h,), self.dtype))
        g.set_output("y", g.op("rms_norm", x, w, eps=self.m["eps"]))
        feeds = {x.ref: self.randn((tokens, h), 3.0), w.ref: 1 + self.randn((h,), 0.3)}
        nbytes = (2 * tokens * h + h) * self.esize
        return self.case("rms_norm", tokens, g, 0, {"T": tokens}, feeds, nbytes)

    def add_rms_norm(self, tokens):
        from braze.ir import Graph, T, TensorType
        h = self.m["hidden"]
        g = Graph("add_rms_norm")
        a = g.add_input("a", TensorType((T, h), self.dtype))
        b = g.add_input("b", TensorType((T, h), self.dtype))
        w = g.add_param("w", TensorType((h,), self.dtype))
        normed, s = g.add_node("add_rms_norm", [a, b, w], {"eps": self.m["eps"]}).results
        g.set_output("y", normed)
        g.set_output("s", s)
        feeds = {a.ref: self.randn((tokens, h), 3.0), b.ref: self.randn((tokens, h)),
                 w.ref: 1 + self.randn((h,), 0.3)}
        nbytes = (4 * tokens * h + h) * self.esize
        return self.case("add_rms_norm", tokens, g, 0, {"T": tokens}, feeds, nbytes)

    def rope_cache_write(self, tokens):
        """As -O2 graphs run it: q/k/v are column views of the merged QKV GEMM output."""
        from braze.ir import NB, Graph, T, TensorType
        torch, m = self.torch, self.m
        hq, hk, d = m["heads"], m["kv_heads"], m["head_dim"]
        g = Graph("rope_cache_write")
        qkv = g.add_input("qkv", TensorType((T, (hq + 2 * hk) * d), self.dtype))
        parts = g.add_node("split", [qkv], {"sizes": [hq * d, hk * d, hk * d], "dim": -1}).results
        q, k, v = (g.op("reshape", p, shape=[-1, h, d]) for p, h in zip(parts, (hq, hk, hk)))
        cos = g.add_input("cos", TensorType((T, 1, d), self.dtype))
        sin = g.add_input("sin", TensorType((T, 1, d), self.dtype))
        kc = g.add_input("k_cache", TensorType((NB, BLOCK_SIZE, hk, d), self.dtype))
        vc = g.add_input("v_cache", TensorType((NB, BLOCK_SIZE, hk, d), self.dtype))
        slots = g.add_input("slot_mapping", TensorType((T,), "i64"))
        ws = []
        if m["qk_norm"]:
            ws = [g.add_param("q_norm", TensorType((d,), self.dtype)),
                  g.add_param("k_norm", TensorType((d,), self.dtype))]
        attrs = {"style": "neox", "eps": m["eps"] if ws else None}
        g.set_output("q", g.op("rope_cache_write", q, k, v, cos, sin, kc, vc, slots, *ws, **attrs))
        index = len(g.nodes) - 1
        # decode: each token a sequence of its own, writing mid-block; prefill: fresh prompts
        regime = self.regime(tokens)
        seqs = [(BLOCK_SIZE // 2, 1)] * tokens if regime == "decode" else _step_seqs(tokens, regime, 0)
        step, num_blocks = self.step(seqs)
        pos = step["positions"].to(torch.float64)[:, None, None]
        freqs = 500000.0 ** (-torch.arange(d // 2, dtype=torch.float64, device=self.device) / (d // 2))
        ang = torch.cat([pos * freqs, pos * freqs], -1)
        cache_shape = (num_blocks, BLOCK_SIZE, hk, d)
        feeds = {qkv.ref: self.randn((tokens, (hq + 2 * hk) * d), 2.0),
                 cos.ref: ang.cos().to(self.tdt), sin.ref: ang.sin().to(self.tdt),
                 kc.ref: self.randn(cache_shape), vc.ref: self.randn(cache_shape),
                 slots.ref: step["slot_mapping"]}
        for wv in ws:
            feeds[wv.ref] = 1 + self.randn((d,), 0.3)
        e = self.esize
        nbytes = (tokens * (hq + 2 * hk) * d * e          # q, k, v read
                  + 2 * tokens * d * e                     # cos, sin
                  + tokens * hq * d * e                    # q' written
                  + 2 * tokens * hk * d * e                # k', v cache rows written
                  + tokens * 8)                            # slots
        note = "QK-norm" if ws else ""
        return self.case("rope_cache_write", tokens, g, index,
                         {"T": tokens, "NB": num_blocks}, feeds, nbytes, note=note)

    def attention(self, tokens):
        from braze.ir import MB, NB, Graph, S, T, TensorType
        m = self.m
        hq, hk, d = m["heads"], m["kv_heads"], m["head_dim"]
        regime = self.regime(tokens)
        seqs = _step_seqs(tokens, regime, self.context)
        step, num_blocks = self.step(seqs)
        g = Graph("attention")
        q = g.add_input("q", TensorType((T, hq, d), self.dtype))
        kc = g.add_input("k_cache", TensorType((NB, BLOCK_SIZE, hk, d), self.dtype))
        vc = g.add_input("v_cache", TensorType((NB, BLOCK_SIZE, hk, d), self.dtype))
        qsl = g.add_input("query_start_loc", TensorType((S + 1,), "i32"))
        lens = g.add_input("seq_lens", TensorType((S,), "i32"))
        tables = g.add_input("block_tables", TensorType((S, MB), "i32"))
        g.set_output("o", g.op("attention", q, kc, vc, qsl, lens, tables, scale=d ** -0.5,
                               sliding_window=0, causal=True, num_heads=hq, num_kv_heads=hk,
                               head_dim=d))
        cache_shape = (num_blocks, BLOCK_SIZE, hk, d)
        feeds = {q.ref: self.randn((tokens, hq, d)), kc.ref: self.randn(cache_shape),
                 vc.ref: self.randn(cache_shape), qsl.ref: step["query_start_loc"],
                 lens.ref: step["seq_lens"], tables.ref: step["block_tables"]}
        sizes = {"T": tokens, "S": len(seqs), "MB": step["block_tables"].shape[1],
                 "NB": num_blocks}
        e = self.esize
        kv_tokens = sum(c + n for c, n in seqs)
        visible = sum(sum(c + i + 1 for i in range(n)) for c, n in seqs)   # causal key counts
        nbytes = (2 * kv_tokens * hk * d * e + 2 * tokens * hq * d * e
                  + sizes["S"] * (sizes["MB"] + 2) * 4)
        flops = 4 * hq * d * visible
        if regime == "decode":
            size = f"S={len(seqs)} ctx={seqs[0][0] + 1}"
        else:
            size = f"T={tokens} ({len(seqs)}x{seqs[0][1]})"
        return self.case("attention", tokens, g, 0, sizes, feeds, nbytes, flops, size=size)

    def latent_attention(self, tokens):
        """The absorbed MLA kernel: every head attends over one shared latent row per token
        (key = the whole kv_lora_rank + rope row, value = its latent part)."""
        from braze.ir import MB, NB, Graph, S, T, TensorType
        m = self.m
        hq, rank, rope = m["heads"], m["mla"]["rank"], m["mla"]["rope"]
        d = rank + rope
        regime = self.regime(tokens)
        seqs = _step_seqs(tokens, regime, self.context)
        step, num_blocks = self.step(seqs)
        g = Graph("latent_attention")
        q = g.add_input("q", TensorType((T, hq, d), self.dtype))
        cache = g.add_input("cache", TensorType((NB, BLOCK_SIZE, 1, d), self.dtype))
        qsl = g.add_input("query_start_loc", TensorType((S + 1,), "i32"))
        lens = g.add_input("seq_lens", TensorType((S,), "i32"))
        tables = g.add_input("block_tables", TensorType((S, MB), "i32"))
        g.set_output("o", g.op("latent_attention", q, cache, qsl, lens, tables,
                               scale=(128 + rope) ** -0.5, kv_lora_rank=rank))
        feeds = {q.ref: self.randn((tokens, hq, d)),
                 cache.ref: self.randn((num_blocks, BLOCK_SIZE, 1, d)),
                 qsl.ref: step["query_start_loc"], lens.ref: step["seq_lens"],
                 tables.ref: step["block_tables"]}
        sizes = {"T": tokens, "S": len(seqs), "MB": step["block_tables"].shape[1],
                 "NB": num_blocks}
        e = self.esize
        kv_tokens = sum(c + n for c, n in seqs)
        visible = sum(sum(c + i + 1 for i in range(n)) for c, n in seqs)
        nbytes = (kv_tokens * d * e + tokens * hq * (d + rank) * e
                  + sizes["S"] * (sizes["MB"] + 2) * 4)
        flops = 2 * hq * (d + rank) * visible
        if regime == "decode":
            size = f"S={len(seqs)} ctx={seqs[0][0] + 1}"
        else:
            size = f"T={tokens} ({len(seqs)}x{seqs[0][1]})"
        return self.case("latent_attention", tokens, g, 0, sizes, feeds, nbytes, flops,
                         size=size, note=f"{hq} heads, latent {rank}+{rope}")

    def _router_logits(self, tokens):
        r = self.m["routed"]
        return self.randn((tokens, r["experts"]), 2.0, dtype=self.torch.float32)

    def grouped_topk(self, tokens):
        """DeepSeek-V3's grouped sigmoid router (codegen/kernels/router.py)."""
        from braze.ir import Graph, T, TensorType
        r = self.m["routed"]
        e, k = r["experts"], r["top_k"]
        g = Graph("grouped_topk")
        logits = g.add_input("logits", TensorType((T, e), "f32"))
        bias = g.add_param("bias", TensorType((e,), "f32"))
        w, ids = g.add_node("grouped_topk", [logits, bias],
                            {"n_group": r["n_group"], "topk_group": r["topk_group"],
                             "top_k": k, "renormalize": True, "scale": r["scale"]}).results
        g.set_output("w", w)
        g.set_output("ids", ids)
        feeds = {logits.ref: self._router_logits(tokens),
                 bias.ref: self.randn((e,), 0.1, dtype=self.torch.float32)}
        nbytes = tokens * e * 4 + e * 4 + tokens * k * (4 + 8)
        return self.case("grouped_topk", tokens, g, 0, {"T": tokens}, feeds, nbytes,
                         note=f"{r['n_group']} groups, {r['topk_group']} kept, top-{k}")

    def _experts(self, g, ids, tokens, e, k, i, h):
        """The experts' x, gate_up and down weights (feeds), and what the kernel moves
        (the selected experts' weights, x and out) and computes for the routing `ids`."""
        from braze.ir import T, TensorType
        x = g.add_input("x", TensorType((T, h), self.dtype))
        gu = g.add_param("w_gate_up", TensorType((e, 2 * i, h), self.dtype))
        dn = g.add_param("w_down", TensorType((e, h, i), self.dtype))
        feeds = {x.ref: self.randn((tokens, h)), gu.ref: self.randn((e, 2 * i, h), h ** -0.5),
                 dn.ref: self.randn((e, h, i), i ** -0.5)}
        used = None if ids is None else int(self.torch.unique(ids).numel())
        return x, gu, dn, feeds, used, tokens * k * (2 * h * 2 * i + 2 * i * h)

    def fused_moe_routed(self, tokens):
        """The experts of DeepSeek-V3's MoE, routed by grouped_topk's reference."""
        from braze.ir import Graph, T, TensorType
        from braze.ir.ops import get_op
        r = self.m["routed"]
        e, k, i, h = r["experts"], r["top_k"], r["inter"], self.m["hidden"]
        w, chosen = get_op("grouped_topk").impl(
            self._router_logits(tokens), self.randn((e,), 0.1, dtype=self.torch.float32),
            n_group=r["n_group"], topk_group=r["topk_group"], top_k=k, renormalize=True,
            scale=r["scale"])
        g = Graph("fused_moe_routed")
        x, gu, dn, feeds, used, flops = self._experts(g, chosen, tokens, e, k, i, h)
        wts = g.add_input("weights", TensorType((T, k), "f32"))
        ids = g.add_input("ids", TensorType((T, k), "i64"))
        g.set_output("y", g.op("fused_moe_routed", x, wts, ids, gu, dn, act="silu"))
        feeds.update({wts.ref: w, ids.ref: chosen})
        nbytes = (used * 3 * i * h + 2 * tokens * h) * self.esize + tokens * k * (4 + 8)
        return self.case("fused_moe_routed", tokens, g, 0, {"T": tokens}, feeds, nbytes, flops,
                         note=f"{used}/{e} experts")

    def fused_moe(self, tokens):
        from braze.ir import Graph, TensorType
        from braze.ir.op_moe import route
        moe = self.m["moe"]
        e, k, i, h = moe["experts"], moe["top_k"], moe["inter"], self.m["hidden"]
        g = Graph("fused_moe")
        x, gu, dn, feeds, _, flops = self._experts(g, None, tokens, e, k, i, h)
        r = g.add_param("router", TensorType((e, h), self.dtype))
        g.set_output("y", g.op("fused_moe", x, r, gu, dn, top_k=k, renormalize=True, act="silu"))
        feeds[r.ref] = self.randn((e, h))
        _, ids = route(feeds[x.ref], feeds[r.ref], k, True)
        used = int(self.torch.unique(ids).numel())
        nbytes = (used * 3 * i * h + e * h + 2 * tokens * h) * self.esize
        flops += 2 * tokens * e * h
        return self.case("fused_moe", tokens, g, 0, {"T": tokens}, feeds, nbytes, flops,
                         note=f"{used}/{e} experts")

    def swiglu(self, tokens):
        """The generated `fuse-pointwise` kernel of silu(gate) * up on the gate_up halves."""
        from braze.ir import Graph, T, TensorType
        from braze.passes import PassContext, PassManager
        i = self.m["inter"]
        g = Graph("swiglu")
        gu = g.add_input("gate_up", TensorType((T, 2 * i), self.dtype))
        a, b = g.add_node("split", [gu], {"sizes": [i, i], "dim": -1}).results
        g.set_output("y", g.op("mul", g.op("silu", a), b))
        PassManager(["fuse-pointwise"], PassContext(options={}), verify_each=True).run(g)
        (index,) = [n for n, node in enumerate(g.nodes) if node.op == "fused_pointwise"]
        feeds = {gu.ref: self.randn((tokens, 2 * i), 2.0)}
        nbytes = 3 * tokens * i * self.esize
        return self.case("swiglu", tokens, g, index, {"T": tokens}, feeds, nbytes)

    def index_select(self, tokens):
        """prune-logits: the last token of each sequence, [T, hidden] -> [S, hidden]."""
        from braze.ir import Graph, S, T, TensorType
        h = self.m["hidden"]
        regime = self.regime(tokens)
        step, _ = self.step(_step_seqs(tokens, regime, 1 if regime == "decode" else 0))
        n_seqs = step["logits_indices"].shape[0]
        g = Graph("index_select")
        x = g.add_input("x", TensorType((T, h), self.dtype))
        idx = g.add_input("idx", TensorType((S,), "i64"))
        g.set_output("y", g.op("index_select", x, idx, dim=0))
        feeds = {x.ref: self.randn((tokens, h)), idx.ref: step["logits_indices"]}
        nbytes = 2 * n_seqs * h * self.esize + n_seqs * 8
        return self.case("index_select", tokens, g, 0, {"T": tokens, "S": n_seqs}, feeds, nbytes,
                         size=f"T={tokens} S={n_seqs}")

    def cat(self, tokens):
        """The RoPE preamble: cat(freqs, freqs) {dim=-1} of the fp32 angles."""
        from braze.ir import Graph, T, TensorType
        half = self.m["head_dim"] // 2
        g = Graph("cat")
        f = g.add_input("f", TensorType((T, half), "f32"))
        g.set_output("y", g.op("cat", f, f, dim=-1))
        feeds = {f.ref: self.randn((tokens, half), dtype=self.torch.float32)}
        nbytes = 3 * tokens * half * 4
        return self.case("cat", tokens, g, 0, {"T": tokens}, feeds, nbytes, note="f32")

    def gemm(self, tokens, proj: str, glu: bool = False):
        """One projection's linear as -O2 runs it: x [T, K] @ W[N, K]^T, W ~ N(0, 1/K). With
        `glu` (gate_up only): linear_glu, silu(gate) * up in the kernel's epilogue
        (fuse-linear-glu), against what it replaces: cuBLAS, then torch's silu and mul; its
        bytes count y [T, N/2], not the product."""
        from braze.ir import Graph, T, TensorType
        m = self.m
        h, q = m["hidden"], m["heads"] * m["head_dim"]
        n, k = {"qkv": ((m["heads"] + 2 * m["kv_heads"]) * m["head_dim"], h), "o": (h, q),
                "gate_up": (2 * (m["inter"] or 0), h), "down": (h, m["inter"] or 0),
                "lm_head": (m["vocab"], h)}[proj]
        name = f"gemm_{proj}" + ("_glu" if glu else "")
        g = Graph(name)
        x = g.add_input("x", TensorType((T, k), self.dtype))
        w = g.add_param("w", TensorType((n, k), self.dtype))
        if glu:
            g.set_output("y", g.add_node("linear_glu", [x, w], {"act": "silu"}).results[0])
        else:
            g.set_output("y", g.op("linear", x, w))
        feeds = {x.ref: self.randn((tokens, k)), w.ref: self.randn((n, k), 1.0 / math.sqrt(k))}
        nbytes = (n * k + tokens * k + tokens * (n // 2 if glu else n)) * self.esize
        return self.case(name, tokens, g, 0, {"T": tokens}, feeds, nbytes,
                         flops=2 * tokens * n * k, note=f"N {n} K {k}" + (" +silu*up" if glu else ""))

    def gemm_qkv(self, tokens):
        return self.gemm(tokens, "qkv")

    def gemm_o(self, tokens):
        return self.gemm(tokens, "o")

    def gemm_gate_up(self, tokens):
        return self.gemm(tokens, "gate_up")

    def gemm_gate_up_glu(self, tokens):
        return self.gemm(tokens, "gate_up", glu=True)

    def gemm_down(self, tokens):
        return self.gemm(tokens, "down")

    def gemm_lm_head(self, tokens):
        return self.gemm(tokens, "lm_head")

    def applies(self, kernel) -> bool:
        if self.m.get("gemm_only") and kernel not in GEMMS:
            return False
        if kernel in GEMMS and self.m.get("mla") is not None:
            # DeepSeek-V3 projects through its latent and decodes bound by its routed
            # experts; its 2 GB lm_head would not fit the suite's kernels-dsv3 stage
            return False
        if kernel in ("gemm_gate_up", "gemm_gate_up_glu", "gemm_down"):
            return self.m["inter"] is not None
        if kernel == "fused_moe":
            return self.m["moe"] is not None
        if kernel in ("grouped_topk", "fused_moe_routed"):
            return self.m.get("routed") is not None
        if kernel == "latent_attention":
            return self.m.get("mla") is not None
        if kernel in ("attention", "rope_cache_write"):     # MLA has its own attention
            return self.m.get("mla") is None
        if kernel == "swiglu":
            return self.m["inter"] is not None
        return True


# -- running a case ---------------------------------------------------------------------------

class Prepared:
    """A case made runnable: the kernel's launches with their env, and the reference's env."""

    def __init__(self, case: Case, interpret: bool, device, aot: "AotCubins | None" = None):
        import torch
        from braze.codegen.kernels import lower_node
        from braze.ir.types import torch_dtype
        from braze.kernel_modules import KernelModules
        from braze.runtime.launcher import PlanRunner
        g = case.graph
        self.case, self.node = case, g.nodes[case.index]
        if case.kernel in GEMMS:          # linear is extern: the kernel --small-m-gemm adds
            from braze.codegen.small_m_gemm import lower_guarded
            self.launches, workspaces, why = lower_guarded(self.node, case.index)
            if why is not None:
                raise RuntimeError(f"skinny_gemm cannot run this linear: {why}")
            sources = {}
        else:
            self.launches, workspaces, sources = lower_node(self.node, case.index)
        modules = KernelModules(KERNEL_DIR, interpret=interpret, sources=dict(sources))
        self.runner = PlanRunner(modules, workspaces, device=device)
        if aot is not None:          # PlanRunner launches a cubin where the launch names one
            aot.sources.update(sources)
            self.runner.cubins = aot
            for n, launch in enumerate(self.launches):
                if "extern" not in launch:
                    # the cubin cache's key: a --gemm-configs setting lowers the same case
                    # to other constexprs and warps, which need a cubin of their own
                    what = json.dumps([launch.get("constexprs"), launch.get("num_warps"),
                                       launch.get("num_stages")], sort_keys=True, default=str)
                    launch["kernel"] = (f"{case.model}.{case.kernel}.{case.tokens}.{n}."
                                        + hashlib.sha256(what.encode()).hexdigest()[:12])
        env = dict(case.feeds)
        for node in g.nodes[:case.index]:          # the views in front of the node (split, ...)
            out = node.opdef.impl(*[env[v.ref] for v in node.operands], **node.attrs)
            for r, t in zip(node.results, (out,) if isinstance(out, torch.Tensor) else out):
                env[r.ref] = t
        self.writes = [self.node.operands[i].ref for i in self.node.opdef.writes]
        # the reference gets its own copies of what the op writes in place (the caches)
        self.ref_env = dict(env)
        for ref in self.writes:
            self.ref_env[ref] = env[ref].clone()
        for r in self.node.results:
            env[r.ref] = torch.empty(r.type.concrete_shape(case.sizes),
                                     dtype=torch_dtype(r.type.dtype), device=device)
        self.env = env
        self.ref_args = [self.ref_env[v.ref] for v in self.node.operands]

    def run_kernel(self):
        for launch in self.launches:
            self.runner.run(launch, self.env, self.case.sizes)

    def run_reference(self):
        return self.node.opdef.impl(*self.ref_args, **self.node.attrs)

    def check(self, dtype: str) -> dict:
        """Run both once; compare every result and every operand written in place."""
        import torch
        self.run_kernel()
        want = self.run_reference()
        want = (want,) if isinstance(want, torch.Tensor) else tuple(want)
        results = self.node.results
        if self.node.op == "linear_glu":      # the fused kernel writes y; h only cuBLAS does
            results = results[:1]
        pairs = [(r.ref, self.env[r.ref], w) for r, w in zip(results, want)]
        pairs += [(ref, self.env[ref], self.ref_env[ref]) for ref in self.writes]
        max_abs = max_rel = 0.0
        for name, got, ref in pairs:
            if got.shape != ref.shape:
                raise RuntimeError(f"{name}: kernel shape {tuple(got.shape)} != reference "
                                   f"{tuple(ref.shape)}")
            got, ref = got.float(), ref.float()
            if got.numel() == 0:
                continue
            diff = (got - ref).abs()
            diff = torch.where(torch.isnan(got) & torch.isnan(ref), torch.zeros_like(diff), diff)
            err = float(diff.max())
            scale = float(ref.abs().max())
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / scale if scale > 0 else err)
        ok = max_rel <= TOL[dtype] and math.isfinite(max_rel)
        return {"max_abs_err": max_abs, "max_rel_err": max_rel, "ok": ok}


class AotCubins:
    """Stands in for runtime.cubins.CubinCache: each launch's variant compiled ahead of time
    by codegen/aot.py for this GPU's architecture (what `braze compile` stores)."""

    def __init__(self):
        from braze.runtime.cubins import device_target
        self.target = device_target()
        self.sources: dict[str, str] = {}
        self._compiled: dict[str, object] = {}

    def get(self, variant_id: str, launch: dict):
        if variant_id not in self._compiled:
            from braze.codegen.aot import compile_launch
            self._compiled[variant_id] = compile_launch(KERNEL_DIR, launch, self.target,
                                                        self.sources)
        return self._compiled[variant_id]


class Timer:
    """CUDA-event timing: warmup, then the median of `iters` iterations, each after an L2
    flush (a 256 MB buffer zeroed, as triton.testing.do_bench does)."""

    def __init__(self, iters: int, warmup: int, flush: bool, budget_s: float):
        import torch
        self.torch = torch
        self.iters, self.warmup, self.budget_s = iters, warmup, budget_s
        self.flush_buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if flush else None

    def _capture(self, fn):
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph

    def time(self, fn, graph: bool) -> tuple[float, str, int]:
        """-> (median us, "cuda-graph" | "eager", iterations)."""
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        mode, run = "eager", fn
        if graph:
            try:
                run = self._capture(fn).replay
                mode = "cuda-graph"
            except Exception as e:         # noqa: BLE001 - fall back, say so
                torch.cuda.synchronize()
                print(f"    (CUDA graph capture failed, timing eagerly: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120]})", file=sys.stderr)
                run = fn
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        one = time.perf_counter() - t0
        iters = max(3, min(self.iters, int(self.budget_s / max(one, 1e-6))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
        return ms * 1000.0, mode, iters


# -- report -----------------------------------------------------------------------------------

def _peak_gbps(args) -> tuple[float | None, str]:
    if args.peak_gbps:
        return args.peak_gbps, "--peak-gbps"
    if args.dry_run:
        return None, "n/a (dry run)"
    import torch
    name = torch.cuda.get_device_name()
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps, f"{name} ({key})"
    return None, f"{name} (unknown: pass --peak-gbps)"


def _targets(r: dict) -> tuple[str, bool | None]:
    """-> (text, met?) for the issue's targets; (\"\", None) where none applies."""
    if r["kernel"] in BANDWIDTH_TARGET and r["tokens"] >= BANDWIDTH_TARGET_FROM:
        if r.get("pct_hbm") is None:
            return f">={BANDWIDTH_TARGET_PCT:.0f}% n/a", None
        met = r["pct_hbm"] >= BANDWIDTH_TARGET_PCT
        return (f">={BANDWIDTH_TARGET_PCT:.0f}% " + ("ok" if met else "MISS")), met
    if r["kernel"] in ("fused_moe", "fused_moe_routed"):
        if r.get("speedup") is None:
            return ">torch n/a", None
        met = r["speedup"] > 1.0
        return ">torch " + ("ok" if met else "MISS"), met
    return "", None


def _fmt(v, spec, na="n/a"):
    return na if v is None else format(v, spec)


def print_table(model: str, rows: list[dict], shape: dict, peak) -> None:
    print(f"\n## {model}  (hidden {shape['hidden']}, heads {shape['heads']}/{shape['kv_heads']}, "
          f"head_dim {shape['head_dim']}"
          + (f", intermediate {shape['inter']}" if shape["inter"] else "")
          + (f", {shape['moe']['experts']} experts top-{shape['moe']['top_k']}, moe intermediate "
             f"{shape['moe']['inter']}" if shape["moe"] else "")
          + (f", MLA latent {shape['mla']['rank']}+{shape['mla']['rope']}" if shape.get("mla")
             else "")
          + (f", {shape['routed']['experts']} experts in {shape['routed']['n_group']} groups "
             f"top-{shape['routed']['top_k']}, moe intermediate {shape['routed']['inter']}"
             if shape.get("routed") else "")
          + (", QK-norm" if shape["qk_norm"] else "") + f", vocab {shape['vocab']})")
    head = ["kernel", "size", "us", "GB/s", "%HBM", "TFLOP/s", "torch us", "speedup",
            "rel err", "check", "target", "note"]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["kernel"], r["size"], "ERROR", "", "", "", "", "", "", "FAIL", "",
                          r["error"][:60]])
            continue
        table.append([
            r["kernel"], r["size"], _fmt(r.get("us"), ".1f"), _fmt(r.get("gbps"), ".0f"),
            _fmt(r.get("pct_hbm"), ".1f"),
            _fmt(r.get("tflops"), ".1f") if r["flops"] else "",
            _fmt(r.get("torch_us"), ".1f"), _fmt(r.get("speedup"), ".2f"),
            f"{r['max_rel_err']:.1e}", "ok" if r["ok"] else "MISMATCH", r["target"], r["note"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    right = {2, 3, 4, 5, 6, 7, 8}
    line = lambda cells: "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in table:
        print(line(row))


def print_gemm_table(rows: list[dict]) -> None:
    """The skinny GEMM against cuBLAS, one line per projection and size: what decides
    --small-m-gemm's default (cuBLAS/Triton > 1: the kernel wins)."""
    rows = [r for r in rows if r["kernel"] in GEMMS and "error" not in r]
    if not rows:
        return
    print("\n### skinny_gemm (--small-m-gemm triton) vs cuBLAS (extern linear)")
    head = ["proj", "T", "N x K", "triton ms", "GB/s", "cuBLAS ms", "GB/s", "cuBLAS/triton",
            "check", "config"]
    ms = lambda us: None if us is None else us / 1000.0
    table = [[r["kernel"][len("gemm_"):], str(r["tokens"]), r["note"].replace("N ", "").replace(" K ", " x "),
              _fmt(ms(r.get("us")), ".4f"), _fmt(r.get("gbps"), ".0f"),
              _fmt(ms(r.get("torch_us")), ".4f"), _fmt(r.get("torch_gbps"), ".0f"),
              _fmt(r.get("speedup"), ".2f"), "ok" if r["ok"] else "MISMATCH",
              r.get("config", "")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    line = lambda cells: "  ".join(str(c).rjust(w) if 1 <= i <= 7 else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in table:
        print(line(row))


def print_gemm_sweep(results: list[dict]) -> None:
    """--gemm-configs: per case (model, projection, T) the fastest setting and the default's
    time against it; then each setting's geometric-mean time relative to each case's best
    (1.00: fastest everywhere), which is what a single module-wide choice should minimise."""
    from gemm_settings import relative_geomean, timed_cases
    cases, configs = timed_cases(results)
    if not cases:
        return
    print("\n### skinny GEMM settings (--gemm-configs): fastest per case")
    for (model, kernel, t), by in cases.items():
        best = min(by, key=by.get)
        first = configs[0]
        vs = f"; {first} takes {by[first] / by[best]:.2f}x as long" if first in by else ""
        print(f"  {model:14s} {kernel[len('gemm_'):]:12s} T={t:<3d} best {best:10s} "
              f"{by[best]:8.1f} us{vs}")
    print("  setting      geomean of time / case's best   (cases timed)")
    for c in configs:
        having = [by for by in cases.values() if c in by]
        print(f"  {c:12s} {relative_geomean(having, c):6.3f}   ({len(having)})")


def machine_info(args) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "nproc": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:      # noqa: BLE001
        pass
    if not args.dry_run:
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# -- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark braze's Triton kernel templates (codegen/kernels/) against the "
                    "IR registry's torch reference implementations on Llama-3-8B, "
                    "Qwen3-30B-A3B and DeepSeek-V3 shapes (bf16): kernel time (CUDA events, median), achieved "
                    "HBM bandwidth and % of peak, TFLOP/s for attention/MoE, speedup over torch.",
        epilog="Targets flagged: norm/RoPE/activation kernels >= 80% of HBM peak at T >= 2048; "
               "fused MoE (softmax-routed and DeepSeek-V3's routed) faster than torch at every size. --dry-run checks every case at tiny "
               "sizes on the CPU under the Triton interpreter (no GPU).")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                   help="model shapes (default: all)")
    p.add_argument("--kernels", nargs="+", choices=sorted(set(KERNELS) | set(TEMPLATES)),
                   default=list(KERNELS), metavar="NAME",
                   help="kernels to run, or template modules (norm = rms_norm add_rms_norm, "
                        "rope, attention, mla = latent_attention, router = grouped_topk, "
                        "moe = fused_moe fused_moe_routed, pointwise = swiglu, "
                        "gather = index_select cat); default: "
                        f"all that the model uses. Kernels: {' '.join(KERNELS)}")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help=f"token counts T (default: {' '.join(map(str, DECODE_SIZES + PREFILL_SIZES))}; "
                        f"dry run: {' '.join(map(str, TINY_SIZES))}); T >= {PREFILL_FROM} "
                        f"(dry run: {TINY_PREFILL_FROM}) is prefill-like")
    p.add_argument("--context", type=int, default=None,
                   help=f"decode attention: tokens per sequence incl. the new one (default "
                        f"{CONTEXT}; dry run {TINY_CONTEXT})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="model dtype (default bf16; dry run f16: the Triton interpreter "
                        "emulates bf16 loosely; attention and MoE give garbage in bf16 under it)")
    p.add_argument("--iters", type=int, default=100, help="timed iterations (median; 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed iterations first (10)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds of timed iterations per measurement at most; fewer iterations "
                        "(at least 3) for slow ones (2.0)")
    p.add_argument("--no-flush", action="store_true",
                   help="do not flush the L2 before each iteration (warm-cache numbers)")
    p.add_argument("--no-graphs", action="store_true",
                   help="time the kernels' launches eagerly instead of replaying a CUDA graph")
    p.add_argument("--aot", action="store_true",
                   help="launch the ahead-of-time cubins (codegen/aot.py, compiled for this GPU's "
                        "sm_XX with 16-byte aligned pointers, as the runtime loads them from an "
                        "artifact) instead of Triton's JIT specialisation of the source")
    p.add_argument("--no-torch", action="store_true", help="skip timing the torch reference")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="HBM peak in GB/s (default: from the GPU's name; H100 SXM 3350, H200 4800)")
    p.add_argument("--gemm-configs", nargs="+", default=None, metavar="P/TILE/W[/S]",
                   help="run each skinny GEMM case under each of these settings of "
                        "codegen/kernels/skinny_gemm.py: TARGET_PROGRAMS/TILE_BYTES in KiB/"
                        "NUM_WARPS[/GEMV_STAGES], e.g. 264/16/4 (the default) 528/32/8/3; "
                        "'sweep': "
                        + " ".join(GEMM_SWEEP) + ". cuBLAS is timed once per case. Prints "
                        "which setting is fastest per projection and overall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a target is missed (mismatches always exit 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: tiny shapes on the CPU under the Triton interpreter, outputs "
                        "checked against the reference, timings n/a")
    return p.parse_args(argv)


def parse_gemm_config(text: str) -> dict:
    """'264/16/4[/3]' -> the skinny GEMM's TARGET_PROGRAMS, TILE_BYTES, NUM_WARPS and
    GEMV_STAGES (default 1)."""
    try:
        values = [int(x) for x in text.split("/")]
        if len(values) not in (3, 4):
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: --gemm-configs {text!r}: give TARGET_PROGRAMS/TILE_KiB/"
                         "NUM_WARPS[/GEMV_STAGES], e.g. 264/16/4 or 528/16/4/3") from None
    programs, tile_kib, warps, stages = values + [1] * (4 - len(values))
    if programs < 1 or tile_kib < 1 or warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 8:
        raise SystemExit(f"error: --gemm-configs {text!r}: programs and tile must be >= 1, "
                         "warps a power of two up to 16, GEMV stages 1 to 8")
    return {"TARGET_PROGRAMS": programs, "TILE_BYTES": tile_kib * 1024, "NUM_WARPS": warps,
            "GEMV_STAGES": stages}


@contextlib.contextmanager
def gemm_config(text: str | None):
    """The skinny GEMM's module constants set to `text` (None: left alone) while lowering."""
    if text is None:
        yield
        return
    from braze.codegen.kernels import skinny_gemm
    new = parse_gemm_config(text)
    if skinny_gemm.TILE_BYTES < 1024:        # the dry run's tiny tiles stay tiny
        new["TILE_BYTES"] = skinny_gemm.TILE_BYTES * new["TILE_BYTES"] // (16 * 1024)
    old = {k: getattr(skinny_gemm, k) for k in new}
    try:
        for k, v in new.items():
            setattr(skinny_gemm, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(skinny_gemm, k, v)


def run_case(args, b, model, kernel, tokens, cfg, device, timer, peak, aot_cubins,
             base: dict | None, plans: dict | None = None) -> dict:
    """One case (under skinny GEMM setting `cfg`, or None): checked against the reference,
    timed on a GPU; the torch reference is timed unless `base` (this case's row under an
    earlier setting) already has it. `plans` (launch plan -> row) lets a setting that lowers
    to the same launches as an earlier one reuse its row instead of running it again."""
    t0 = time.perf_counter()
    r = {"model": model, "kernel": kernel, "tokens": tokens, "size": f"T={tokens}",
         "flops": 0, "note": ""}
    if cfg is not None:
        r["config"] = cfg
    try:
        with gemm_config(cfg):
            case = getattr(b, kernel)(tokens)
            r.update(size=case.size, regime=case.regime, op=case.graph.nodes[case.index].op,
                     bytes=case.bytes, flops=case.flops, note=case.note, sizes=case.sizes)
            prep = Prepared(case, interpret=device.type == "cpu", device=device, aot=aot_cubins)
        r["launches"] = len(prep.launches)
        r["modules"] = sorted({ln["module"] for ln in prep.launches})
        r["grid"] = [ln.get("grid") for ln in prep.launches if "extern" not in ln]
        # GEMV_STAGES shapes only the bucket-1 (M == 1) code: above it, the same launches
        key = json.dumps([[ln.get("fn"), ln.get("grid"), ln.get("num_warps"),
                           ln.get("num_stages"),
                           {k: v for k, v in (ln.get("constexprs") or {}).items()
                            if tokens == 1 or k != "GEMV_STAGES"}] for ln in prep.launches],
                         sort_keys=True, default=str)
        if cfg is not None and plans is not None and key in plans:
            same = plans[key]
            r.update({k: v for k, v in same.items() if k not in ("config", "wall_s")},
                     same_plan_as=same["config"])
            del prep, case
            print(f"  {model:14s} {kernel:17s} {r['size']:20s} [{cfg}] the same launches as "
                  f"[{same['config']}]", flush=True)
            r["wall_s"] = time.perf_counter() - t0
            return r
        r.update(prep.check(args.dtype))
        if timer is not None:
            us, mode, n = timer.time(prep.run_kernel, graph=not args.no_graphs)
            r.update(us=us, timer=mode, iters=n)
            r["gbps"] = case.bytes / (us * 1e-6) / 1e9
            r["pct_hbm"] = 100.0 * r["gbps"] / peak if peak else None
            r["tflops"] = case.flops / (us * 1e-6) / 1e12 if case.flops else None
            if base is not None and "torch_us" in base:
                tus, tmode, tn = base["torch_us"], base["torch_timer"], base["torch_iters"]
            elif not args.no_torch:
                # cuBLAS as the runtime runs it: inside the captured graph
                tus, tmode, tn = timer.time(prep.run_reference,
                                            graph=kernel in GEMMS and not args.no_graphs)
            else:
                tus = None
            if tus is not None:
                r.update(torch_us=tus, torch_iters=tn, speedup=tus / us, torch_timer=tmode,
                         torch_gbps=case.bytes / (tus * 1e-6) / 1e9)
        del prep, case
    except Exception as e:      # noqa: BLE001 - report and go on with the others
        r["error"] = f"{type(e).__name__}: {e}"
        r["ok"] = False
        print(f"  {model} {kernel} T={tokens}{' ' + cfg if cfg else ''}: {r['error']}",
              file=sys.stderr)
        if os.environ.get("BRAZE_BENCH_RAISE"):
            raise
    if "error" not in r:
        r["target"], r["target_met"] = _targets(r)
        if cfg is not None and plans is not None:
            plans[key] = r
    r["wall_s"] = time.perf_counter() - t0
    if "error" not in r:       # progress, one line per case
        timing = ""
        if r.get("us") is not None:
            timing = (f"{r['us']:9.1f} us {r['gbps']:7.0f} GB/s"
                      + (f"  torch {r['torch_us']:9.1f} us" if "torch_us" in r else "")
                      + f"  [{r['timer']}]  ")
        print(f"  {model:14s} {kernel:17s} {r['size']:20s}{' [' + cfg + ']' if cfg else ''} "
              f"launches {r['launches']:2d}  {timing}max abs err {r['max_abs_err']:.2e}  "
              f"rel {r['max_rel_err']:.2e}  {'ok' if r['ok'] else 'MISMATCH'}  "
              f"({r['wall_s']:.1f} s)", flush=True)
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    kernels = []
    for name in args.kernels:
        for k in TEMPLATES.get(name, (name,)) if name not in KERNELS else (name,):
            if k not in kernels:
                kernels.append(k)
    args.kernels = kernels
    if args.gemm_configs:
        if args.gemm_configs == ["sweep"]:
            args.gemm_configs = list(GEMM_SWEEP)
        for c in args.gemm_configs:
            parse_gemm_config(c)
        if not any(k in GEMMS for k in args.kernels):
            print("error: --gemm-configs applies to the skinny GEMM: add --kernels skinny_gemm",
                  file=sys.stderr)
            return 2
    if args.sizes and min(args.sizes) < 1:
        print("error: --sizes must be token counts >= 1", file=sys.stderr)
        return 2
    if args.dry_run and args.aot:
        print("error: --aot needs a GPU (the cubins run on it)", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported anywhere
    args.dtype = args.dtype or ("f16" if args.dry_run else "bf16")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    if args.dry_run:
        device, shapes = torch.device("cpu"), TINY_MODELS
        # 512-byte W tiles: the tiny 1B down projection (K = 160) splits K in two, so the
        # dry run takes the split-K path (two launches, a workspace) the 1B shape takes
        from braze.codegen.kernels import skinny_gemm
        skinny_gemm.TILE_BYTES = 512
        sizes = args.sizes or list(TINY_SIZES)
        context = args.context or TINY_CONTEXT
        prefill_from = TINY_PREFILL_FROM
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA GPU (run with --dry-run to check the cases on the CPU)",
                  file=sys.stderr)
            return 2
        device, shapes = torch.device(GPU_DEVICE), MODELS
        sizes = args.sizes or list(DECODE_SIZES + PREFILL_SIZES)
        context = args.context or CONTEXT
        prefill_from = PREFILL_FROM
    peak, peak_src = _peak_gbps(args)
    info = machine_info(args)
    print(f"# braze kernel benchmark  ({'DRY RUN: Triton interpreter on CPU, tiny shapes' if args.dry_run else info['gpu']})")
    print(f"# python {info['python']}, torch {info['torch']}, triton {info.get('triton', '?')}"
          + ("" if args.dry_run else f", CUDA {info['cuda']}")
          + f"; dtype {args.dtype}; HBM peak "
          + (f"{peak:.0f} GB/s [{peak_src}]" if peak else peak_src))
    if not args.dry_run:
        print(f"# timing: median of up to {args.iters} iterations after {args.warmup} warmup, "
              f"{'warm L2' if args.no_flush else 'L2 flushed before each'}; kernels "
              f"{'eager' if args.no_graphs else 'replayed from a CUDA graph'}, torch eager")
    timer = None if args.dry_run else Timer(args.iters, args.warmup, not args.no_flush,
                                            args.budget)

    aot_cubins = AotCubins() if args.aot else None
    out = ResultsFile(args.json, {"machine": info, "peak_gbps": peak, "peak_source": peak_src,
                                  "args": vars(args), "dry_run": args.dry_run,
                                  "shapes": {m: shapes[m] for m in args.models}})
    results, failures = out.results, 0
    for model in args.models:
        b = Builder(model, shapes[model], args.dtype, device, context, prefill_from, args.seed)
        rows = []
        for kernel in args.kernels:
            if not b.applies(kernel):
                continue
            for tokens in sizes:
                if kernel in GEMMS and tokens > GEMM_MAX_TOKENS:
                    continue            # the option never runs the kernel at such buckets
                base = None             # the case's first row: cuBLAS is timed there only
                plans: dict[str, dict] = {}  # a setting that lowers to a plan already run
                for cfg in (args.gemm_configs if kernel in GEMMS and args.gemm_configs
                            else [None]):
                    r = run_case(args, b, model, kernel, tokens, cfg, device, timer, peak,
                                 aot_cubins, base, plans)
                    base = base or r
                    failures += not r["ok"]
                    rows.append(r)
                    out.add(r)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        print_table(model, rows, shapes[model], peak)
        print_gemm_table(rows)
    if args.gemm_configs:
        print_gemm_sweep(results)
    if not results:
        print(f"error: no case to run: --kernels {' '.join(args.kernels)} at --sizes "
              f"{' '.join(map(str, sizes))} apply to none of --models {' '.join(args.models)} "
              f"(a kernel runs on the shapes that have its op: llama3.2-1b has the skinny "
              f"GEMM's only, MoE and MLA kernels need those models, and the skinny GEMM runs "
              f"at T <= {GEMM_MAX_TOKENS}); pick another model, kernel or size",
              file=sys.stderr)
        out.finish(failures=0, targets_missed=0)
        return 2

    missed = [r for r in results if r.get("target_met") is False]
    print()
    n_checked = sum(1 for r in results if "error" not in r)
    print(f"checked {n_checked}/{len(results)} cases against the torch reference: "
          f"{failures} failed")
    if not args.dry_run:
        if missed:
            print(f"targets missed ({len(missed)}):")
            for r in missed:
                what = (f"{r['pct_hbm']:.1f}% of HBM peak" if r["kernel"] in BANDWIDTH_TARGET
                        else f"speedup {r['speedup']:.2f}")
                print(f"  {r['model']} {r['kernel']} {r['size']}: {what} ({r['target']})")
        elif any(r.get("target_met") for r in results):
            print("targets: all met")
    out.finish(failures=failures, targets_missed=len(missed))
    if args.json:
        print(f"wrote {args.json}")
    if failures:
        return 1
    if args.strict and missed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
