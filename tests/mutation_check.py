"""Known-important bugs, put in one at a time: each must make its named tests fail.

    python tests/mutation_check.py            # all of them
    python tests/mutation_check.py --list
    python tests/mutation_check.py yarn-scale stop-at-last-token

Each mutation below changes what a user gets (wrong KV reused, a wrong finish reason,
logits off, a wrong expert, text leaking past a stop string). The script first runs every
named test on the unchanged code (they must pass, or a failure would prove nothing),
then for each mutation replaces one exact piece of source, runs that mutation's tests,
and puts the file back, whatever happens. A mutation whose tests still pass is a hole
in the suite: write the test that sees it before declaring the feature done. Add a
mutation here whenever a bug slips past the tests.

Not a pytest file (pytest collects test_*.py only). pytest runs from a temporary
directory, so failing examples found under a mutation do not land in the repository's
hypothesis database.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    effect: str          # what a user would see
    path: str            # relative to the repository root
    old: str             # must occur exactly once
    new: str
    tests: list[str]     # test files or node ids, relative to the repository root
    k: str = ""          # a pytest -k expression narrowing them, if any


MUTATIONS = [
    Mutation("prefix-hash-drops-parent",
             "a block that appeared after another prefix is served from the prefix cache",
             "runtime/block_manager.py",
             "hashes.append(hash((prev, tuple(token_ids[i * bs:(i + 1) * bs]))))",
             "hashes.append(hash((None, tuple(token_ids[i * bs:(i + 1) * bs]))))",
             ["tests/test_block_manager.py",
              "tests/test_engine.py::test_prefix_cache_hits_only_on_the_same_whole_prefix"]),
    Mutation("stop-at-last-token",
             "finish_reason 'length' when a stop lands on the max_tokens-th token",
             "runtime/engine.py",
             "if reason is None and len(all_ids) >= req.max_len:",
             "if len(all_ids) >= req.max_len:",
             ["tests/test_stops.py", "tests/test_serve.py::test_stop_on_the_last_allowed_token"]),
    Mutation("yarn-scale",
             "YaRN models' cos/sin lose their attention scaling: logits off",
             "models/layers.py",
             "if self.attention_scaling != 1.0:",
             "if False:",
             ["tests/test_models_vs_hf.py", "tests/test_o2_vs_hf.py",
              "tests/test_interpret_vs_hf.py"], k="yarn"),
    Mutation("rmsnorm-no-upcast",
             "RMSNorm in half precision without float32: twice the error",
             "models/layers.py",
             "h = x.to(torch.float32)\n        variance",
             "h = x\n        variance",
             ["tests/test_dtypes.py"]),
    Mutation("attention-kernel-window",
             "the attention kernel's sliding window sees one key too many",
             "codegen/kernels/attention.py",
             "allowed = allowed & (k_pos[None, :] > q_pos[:, None] - WINDOW)",
             "allowed = allowed & (k_pos[None, :] >= q_pos[:, None] - WINDOW)",
             ["tests/test_kernel_attention.py"]),
    Mutation("attention-padding-rows-left-stale",
             "a decode step padded to T == S leaves its padding tokens' attention rows as stale "
             "memory (NaN) once the prefill-path launch is skipped",
             "codegen/kernels/attention.py",
             "pad = (rows < G) & (tok >= total) & (tok < T)",
             "pad = (rows < 0) & (tok >= total) & (tok < T)",
             ["tests/test_kernel_attention.py"], k="t_equals_s"),
    Mutation("attention-split-count-not-reset",
             "the split-arrival count is not reset: in the next step no split of that "
             "sequence is the last, and its attention output is never written",
             "codegen/kernels/attention.py",
             "            tl.atomic_xchg(count, 0, sem=\"relaxed\", scope=\"gpu\")\n",
             "",
             ["tests/test_graph_runner.py"], k="stale"),
    Mutation("decode-idle-skipped-in-mixed-steps",
             "a mixed step runs without attention's prefill path: its prompts get no attention",
             "runtime/graph_runner.py",
             "        elif decode_only and b.decode is not None:",
             "        elif b.decode is not None:",
             ["tests/test_graph_runner.py"], k="no_prefill_path"),
    Mutation("sampling-kernel-later-tie-wins",
             "the fused sampler takes a later vocab block's equal maximum: greedy rows give "
             "another token than argmax (and than the torch sampler)",
             "runtime/sampling_kernel.py",
             "        take = mx > best ",
             "        take = mx >= best ",
             ["tests/test_sampling_kernel.py"]),
    Mutation("sampling-kernel-counter-high-word-dropped",
             "the fused sampler drops the output counter's high 32 bits from the row key: its "
             "noise is not the torch sampler's, so seeded requests draw other tokens",
             "runtime/sampling_kernel.py",
             "    key = _mix32(key ^ ((counter >> 32) & m32).to(tl.uint32))",
             "    key = _mix32(key)",
             ["tests/test_sampling_kernel.py"]),
    Mutation("sampling-kernel-top-p-unchecked",
             "the fused sampler keeps its first draw without checking it against top-p: "
             "top_p requests draw from the whole (top-k, min-p) set",
             "runtime/sampling_kernel.py",
             "            rejected = (n_gt > 0) & (mass / z >= p)",
             "            rejected = n_gt < 0",
             ["tests/test_sampling_kernel.py"]),
    Mutation("sampling-kernel-bisection-stuck-at-the-max",
             "the fused sampler's fallback bisection never lowers its upper bound: after "
             "the redraws a small top_p keeps only the likeliest token",
             "runtime/sampling_kernel.py",
             "                    hi = tl.where(step & ((n_gt == 0) | (mass / z < p)), mid, hi)",
             "                    hi = tl.where(step & ((n_gt == 0) | (mass / z < p)), hi, hi)",
             ["tests/test_sampling_kernel.py"]),
    Mutation("sampling-kernel-radix-rank-not-carried",
             "the fused sampler's k-th-largest select forgets the entries in higher bins: "
             "top_k keeps more entries than k",
             "runtime/sampling_kernel.py",
             "        rem -= tl.reduce(tl.where(bins > b, hist, 0), 0, _sum_combine)",
             "        rem -= 0",
             ["tests/test_sampling_kernel.py"]),
    Mutation("sampling-kernel-top-k-ties-left-out-of-z",
             "the fused sampler's top-p mass leaves the k-th value's entries out of the "
             "softmax over the top-k: top_p with top_k drops tokens it should keep",
             "runtime/sampling_kernel.py",
             "        z += tl.where(k > 0, (k - n_gt)",
             "        z += tl.where(k < 0, (k - n_gt)",
             ["tests/test_sampling_kernel.py"]),
    Mutation("cubin-report-registers-not-rounded",
             "inspect --kernels counts registers per warp exactly instead of in CUDA's units "
             "of 256: occupancy over-reported for kernels whose count is not a multiple of 8",
             "codegen/cubin_report.py",
             "    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256",
             "    regs_per_warp = max(regs, 1) * 32",
             ["tests/test_cubin_report.py"]),
    Mutation("gemv-stages-ignored",
             "the skinny GEMM's bucket-1 loop ignores GEMV_STAGES: part 8's sweep would time "
             "the same cubin under every stage setting",
             "codegen/kernels/skinny_gemm.py",
             "        for step in tl.range(0, K_PER_SPLIT, BLOCK_K, num_stages=GEMV_STAGES):",
             "        for step in range(0, K_PER_SPLIT, BLOCK_K):",
             ["tests/test_kernel_skinny_gemm.py"], k="gemv_stages"),
    Mutation("fused-prepare-slot-ignores-offset",
             "the fused prepare kernel maps a token to its block's first KV slot: every "
             "token of a block overwrites the others' keys and values",
             "runtime/prepare_kernel.py",
             "            tl.store(slot_mapping_ptr + t, blk * BS + pos % BS, mask=ok)",
             "            tl.store(slot_mapping_ptr + t, blk * BS, mask=ok)",
             ["tests/test_prepare_kernel.py"]),
    Mutation("fused-prepare-padding-left-stale",
             "the fused prepare kernel leaves the padded sequences' lengths as the last step "
             "wrote them: attention reads KV blocks for sequences that are not there",
             "runtime/prepare_kernel.py",
             "        tl.store(seq_lens_ptr + s, 0)",
             "        pass",
             ["tests/test_prepare_kernel.py"]),
    Mutation("full-decode-graph-for-mixed-steps",
             "mode full replays a bucket's decode-only graph for a mixed step: its prompts "
             "get no attention",
             "runtime/graph_runner.py",
             "            steps = b.full_decode if decode_only and b.full_decode is not None else b.full",
             "            steps = b.full_decode if b.full_decode is not None else b.full",
             ["tests/test_graph_runner.py"], k="no_prefill_path"),
    Mutation("gathered-norm-reads-row-r",
             "the final norm over the sampled rows normalises row r instead of row idx[r]: "
             "every sequence but the first samples another token's logits",
             "codegen/kernels/norm.py",
             "        a_row = (src * a_s0)[:, None]",
             "        a_row = (rows.to(tl.int64) * a_s0)[:, None]",
             ["tests/test_kernel_norm.py"], k="gathered"),
    Mutation("reference-attention-window",
             "the reference attention's sliding window sees one key too many",
             "ir/op_attention.py",
             "(kpos[None, None, :] > qpos[:, :, None] - sliding_window)",
             "(kpos[None, None, :] >= qpos[:, :, None] - sliding_window)",
             ["tests/test_models_vs_hf.py"], k="mistral"),
    Mutation("moe-router-repeats-experts",
             "the fused MoE router can pick the same expert twice for a token",
             "codegen/kernels/moe.py",
             "avail = tl.where(hit, -2.0, avail)",
             "avail = avail",
             ["tests/test_kernel_moe.py"]),
    Mutation("fuse-moe-always-renormalises",
             "MoE models with norm_topk_prob=False get renormalised routing weights",
             "passes/fuse_moe.py",
             '"renormalize": m.get("renorm") is not None',
             '"renormalize": True',
             ["tests/test_pass_fuse_moe.py", "tests/test_o2_vs_hf.py"], k="moe or nonorm"),
    Mutation("router-kernel-group-second-best",
             "DeepSeek-V3's router kernel scores a group by its best expert twice, not its "
             "two best: the wrong groups are kept, tokens go to the wrong experts",
             "codegen/kernels/router.py",
             "tl.where(m2 & (j[None, :] != at[:, None]), c2",
             "tl.where(m2, c2",
             ["tests/test_grouped_topk.py"], k="kernel"),
    Mutation("fuse-grouped-topk-drops-scale",
             "DeepSeek-V3's fused router forgets routed_scaling_factor: the routed experts' "
             "sum is off by that factor",
             "passes/fuse_grouped_topk.py",
             '"scale": float(m["scale"]) if scaled else 1.0',
             '"scale": 1.0',
             ["tests/test_grouped_topk.py", "tests/test_deepseek_v3.py"],
             k="pass or (greedy and 2)"),
    Mutation("stop-string-tail-short",
             "a stop string split across tokens is missed (the search keeps one character "
             "too few of the text before the new piece)",
             "runtime/detokenizer.py",
             'searched[-(self._max_stop - 1):] if self._max_stop > 1 else ""',
             'searched[-(self._max_stop - 2):] if self._max_stop > 2 else ""',
             ["tests/test_detokenizer.py"]),
    Mutation("gguf-qk-permutation-kept",
             "a llama GGUF compiles, but Q and K keep llama.cpp's row order: wrong RoPE pairs, "
             "wrong logits",
             "frontend/gguf.py",
             "if self._permute and (\".attn_q.\" in gname or \".attn_k.\" in gname):",
             "if False:",
             ["tests/test_gguf.py"], k="llama and (logits or written)"),
    Mutation("gguf-rope-freqs-ignored",
             "a Llama 3.1+ GGUF runs with unscaled RoPE (its rope_freqs tensor skipped)",
             "frontend/gguf.py",
             "factors = self.checkpoint.rope_freq_factors()",
             "factors = None",
             ["tests/test_gguf.py"], k="rope_freqs"),
    Mutation("fp8-edge-blocks-unscaled",
             "an fp8 checkpoint whose dims are not multiples of the block compiles, but the "
             "last partial column block keeps its raw fp8 values: wrong logits",
             "frontend/fp8.py",
             "for j in range(math.ceil(cols / bc)):",
             "for j in range(cols // bc):",
             ["tests/test_fp8.py"], k="partial or dequantize_blocks"),
    Mutation("fp8-block-dims-swapped",
             "fp8 scales with non-square blocks spread over the wrong rows",
             "frontend/fp8.py",
             "repeat_interleave(br, dim=-2)",
             "repeat_interleave(bc, dim=-2)",
             ["tests/test_fp8.py"], k="dequantize_blocks"),
    Mutation("draft-loop-finished-row-writes-kv",
             "a draft sequence whose guesses are done keeps writing KV in the device loop "
             "(slot not -1): the KV of its last guess is overwritten, later guesses go wrong",
             "runtime/decode_loop.py",
             'torch.where(live, slot, -1)',
             'slot',
             ["tests/test_draft_loop.py"], k="reference"),
    Mutation("grammar-row-released-before-sampling",
             "a grammar request that finishes while the next step waits to sample gives up "
             "its batch row first: that sampling reads a released row's settings",
             "runtime/engine.py",
             "        if self._held_rows is not None:  # a launched step still samples from its row",
             "        if False:  # a launched step still samples from its row",
             ["tests/test_structured.py"], k="overlap"),
    Mutation("shared-pool-hits-held-late",
             "a KV block evicted for one cache group while another group reuses it as a "
             "prefix hit: two groups write one block, wrong KV read",
             "runtime/hybrid_cache.py",
             "            for b in hits:          # every group's hits first: taking may evict "
             "cached blocks\n                self._hold(g, b)\n            seq.tables[g] = "
             "[NULL_BLOCK] * lo + hits\n",
             "            for b in hits:\n                self._hold(g, b)\n            "
             "seq.tables[g] = [NULL_BLOCK] * lo + hits + self._take(g, plans[g][3])\n"
             "            plans[g] = plans[g][:3] + (0,)\n",
             ["tests/test_hybrid_cache.py"], k="shared_pool_holds_every"),
    Mutation("shared-pool-one-key-for-all-groups",
             "a shared pool serves one group's cached block as another group's prefix hit",
             "runtime/hybrid_cache.py",
             "return (g, h) if self.shared and g else h",
             "return h",
             ["tests/test_hybrid_cache.py"], k="Shared"),
    Mutation("tp-offload-rank-1-skips-its-load",
             "at tensor parallelism a block loaded from a lower KV tier is filled on rank 0 "
             "only: rank 1 attends over another request's KV",
             "runtime/kv_offload.py",
             "            if blocks:\n                load = self._start(blocks, ids, set())",
             "            if False:\n                load = self._start(blocks, ids, set())",
             ["tests/test_kv_offload.py"], k="two_ranks_store"),
    Mutation("load-runs-before-it-lands",
             "a request whose KV blocks are loaded from the host tier runs before their copy "
             "(on the load stream) has landed: it attends over whatever the blocks held",
             "runtime/scheduler.py",
             "req.kv_loading = loaded > 0",
             "req.kv_loading = False",
             ["tests/test_kv_load_landing.py"], k="waits_in_the_scheduler"),
    Mutation("loaded-blocks-cached-before-they-land",
             "blocks still being copied in from the host tier are prefix hits at once: a "
             "second prompt with the same prefix reads them before they are written",
             "runtime/kv_offload.py",
             "ids = bm.adopt(req.request_id, len(blocks), register=False)",
             "ids = bm.adopt(req.request_id, len(blocks), register=True)",
             ["tests/test_kv_load_landing.py"], k="waits_in_the_scheduler"),
    Mutation("load-lands-when-its-last-chunk-is-queued",
             "a load counts as landed once its last chunk is queued, not copied: the "
             "request attends over blocks still being written",
             "runtime/kv_offload.py",
             "        return not load.todo and not load.copies",
             "        return not load.todo",
             ["tests/test_kv_load_landing.py"], k="waits_in_the_scheduler or chunks"),
    Mutation("abandoned-load-not-awaited",
             "a request preempted or aborted while its KV load is copying in frees the "
             "blocks at once: the late copy overwrites the next owner's KV",
             "runtime/kv_offload.py",
             "            return\n        self._settle(load)",
             "            return\n        self._loading.pop(req.request_id, None)",
             ["tests/test_kv_load_landing.py"], k="abandoned"),
    Mutation("tp-row-parallel-bias-on-every-rank",
             "at tensor parallelism a row-parallel projection's bias (o_proj, down_proj) is "
             "added by every rank before the all-reduce: N times over",
             "passes/shard.py",
             "    node.operands = (x, w)\n",
             "    node.operands = (x, w, b)\n",
             ["tests/test_tensor_parallel.py"], k="logits_equal and biases"),
    Mutation("tp-offload-objects-not-named-by-rank",
             "two tensor-parallel ranks write their KV slices to the same object: a load "
             "reads another rank's heads",
             "runtime/kv_offload.py",
             'suffix = f".rank{rank}" if ranks > 1 else ""',
             'suffix = ""',
             ["tests/test_kv_offload.py"], k="rank"),
    Mutation("skinny-gemm-drops-bias",
             "--small-m-gemm triton: a linear with a bias (Qwen2's q/k/v) loses it at the "
             "decode buckets: logits off",
             "codegen/kernels/skinny_gemm.py",
             "    if HAS_BIAS:\n        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0)",
             "    if False:\n        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0)",
             ["tests/test_kernel_skinny_gemm.py"]),
    Mutation("skinny-gemm-k-tail",
             "--small-m-gemm triton: the last K tile reads past the end of each weight row "
             "(the next row's values) when K is not a multiple of BLOCK_K",
             "codegen/kernels/skinny_gemm.py",
             "            k_ok = k < K\n",
             "            k_ok = k < K_PER_SPLIT * SPLIT_K\n",
             ["tests/test_kernel_skinny_gemm.py"]),
    Mutation("skinny-gemv-k-tail",
             "--small-m-gemm triton: at bucket 1 (the GEMV path) the last K tile reads past "
             "each weight row's end",
             "codegen/kernels/skinny_gemm.py",
             "            kv_ok = kv < K\n",
             "            kv_ok = kv < K_PER_SPLIT * SPLIT_K\n",
             ["tests/test_kernel_skinny_gemm.py"]),
    Mutation("glu-up-rows",
             "--small-m-gemm triton: a gated MLP's fused GEMM reads the gate's weight rows "
             "for the up projection too: act(gate) * gate at the decode buckets",
             "codegen/kernels/skinny_gemm.py",
             "    w_up = w_rows + N_OUT * K ",
             "    w_up = w_rows ",
             ["tests/test_linear_glu.py"], k="epilogue_matches or any_small"),
    Mutation("glu-split-k-up-partial",
             "--small-m-gemm triton: with split K the up half's partial sums are the gate's",
             "codegen/kernels/skinny_gemm.py",
             "                tl.store(part + N_OUT, acc2, mask=mn_ok)",
             "                tl.store(part + N_OUT, acc, mask=mn_ok)",
             ["tests/test_linear_glu.py"], k="split_k"),
    Mutation("skinny-gemm-split-count-not-reset",
             "--small-m-gemm triton: a split-K tile's arrival count is not reset, so in the "
             "next step no split is the last and its output is never written",
             "codegen/kernels/skinny_gemm.py",
             "                _finish(acc, acc2, b_ptr, out, mn_ok, rn, n_ok, N_OUT, HAS_BIAS, ACT)\n"
             "                tl.atomic_xchg(count, 0, sem=\"relaxed\", scope=\"gpu\")",
             "                _finish(acc, acc2, b_ptr, out, mn_ok, rn, n_ok, N_OUT, HAS_BIAS, ACT)",
             ["tests/test_kernel_skinny_gemm.py"], k="split_k"),
    Mutation("glu-fuses-a-shared-half",
             "fuse-linear-glu fuses an MLP whose product is also read elsewhere: that reader "
             "gets a value nothing computes any more",
             "passes/fuse_linear_glu.py",
             "            if others or v in outputs:",
             "            if False:",
             ["tests/test_linear_glu.py"], k="refuses"),
    Mutation("small-m-guard-ignored-at-bind",
             "--small-m-gemm triton: a bucket's bound plan runs both the Triton GEMM and the "
             "cuBLAS call of every linear (twice the weight traffic), at every bucket",
             "runtime/plan_executor.py",
             "            if not holds(sizes):          # another bucket's launch: not in this plan",
             "            if False:",
             ["tests/test_small_m_gemm.py"], k="split_k"),
    Mutation("reasoning-gate-off",
             "with --reasoning-parser, response_format forces the format from the first "
             "token: a reasoning model cannot think",
             "runtime/engine.py",
             "if self.reasoning is not None:       # the grammar holds the answer",
             "if False:       # the grammar holds the answer",
             ["tests/test_reasoning.py"], k="grammar_holds"),
    Mutation("priority-victim-last-admitted",
             "under --scheduling-policy priority a high-priority request is preempted for a "
             "low-priority one",
             "runtime/scheduler.py",
             "victim = max(self.running, key=_rank) if self.by_priority else self.running[-1]",
             "victim = self.running[-1]",
             ["tests/test_priority_scheduling.py"], k="preemption"),
    Mutation("cache-salt-not-chained",
             "one tenant's prompt hits another tenant's prefix-cache blocks (cache_salt)",
             "runtime/engine.py",
             "req.kv_salt = (\"cache_salt\", cache_salt, req.kv_salt)",
             "req.kv_salt = req.kv_salt",
             ["tests/test_cache_salt.py"], k="within_a_salt"),
    Mutation("responses-history-dropped",
             "previous_response_id answers the new input alone, not the stored conversation",
             "serving/responses_route.py",
             "messages += _messages(history or [], text_only_origin, called)",
             "messages += []",
             ["tests/test_serve_responses_store.py"], k="previous_response_id_goes_on"),
    Mutation("responses-call-arguments-lost",
             "a function_call item sent back in /v1/responses input loses its arguments",
             "serving/responses_tools.py",
             '"function": {"name": item["name"], "arguments": item["arguments"]}}',
             '"function": {"name": item["name"], "arguments": "{}"}}',
             ["tests/test_serve_responses_tools.py"], k="tool_turns"),
]


def pytest(m: Mutation, cwd: str, timeout: float) -> tuple[int, list[str], str]:
    """Run the mutation's tests; (exit code, failed test ids, the output's last line)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
           "-c", str(ROOT / "pyproject.toml"), *(str(ROOT / t) for t in m.tests)]
    if m.k:
        cmd += ["-k", m.k]
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], f"timed out after {timeout:.0f} s"
    out = r.stdout + r.stderr
    failed = [re.sub(r"^.*?(?=tests/)", "", f)        # ids relative to the repository root
              for f in re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, flags=re.M)]
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return r.returncode, failed, lines[-1] if lines else ""


def apply(m: Mutation) -> str:
    """Put the mutation in; return the original text (the caller restores it)."""
    path = ROOT / m.path
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"{m.name}: {m.path} holds the original {n} times, not once; "
                         f"update the mutation to the current source")
    path.write_text(text.replace(m.old, m.new))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the named tests on the unchanged code first")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    ap.add_argument("-v", "--verbose", action="store_true", help="name every test that failed")
    a = ap.parse_args()
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.path}: {m.effect}")
        return 0
    unknown = set(a.names) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
    chosen = [m for m in MUTATIONS if not a.names or m.name in a.names]
    for m in chosen:      # every original must be there before anything is changed
        if (ROOT / m.path).read_text().count(m.old) != 1:
            raise SystemExit(f"{m.name}: the original is not in {m.path} exactly once")
    with tempfile.TemporaryDirectory(prefix="braze-mutation-") as cwd:
        if not a.no_baseline:
            for m in chosen:
                rc, failed, last = pytest(m, cwd, a.timeout)
                if rc != 0:
                    print(f"baseline: the tests of {m.name} fail on the unchanged code "
                          f"({last}): {failed[:5]}")
                    return 2
            print(f"baseline: the named tests of {len(chosen)} mutation(s) pass unchanged")
        missed = []
        for m in chosen:
            t0 = time.monotonic()
            original = apply(m)
            try:
                rc, failed, last = pytest(m, cwd, a.timeout)
            finally:
                (ROOT / m.path).write_text(original)
            took = time.monotonic() - t0
            if rc == 1 and failed:
                shown = ", ".join(f.split("/")[-1] for f in failed[:4])
                more = f" (+{len(failed) - 4} more)" if len(failed) > 4 else ""
                print(f"CAUGHT  {m.name:32s} {len(failed)} failed: {shown}{more}  [{took:.0f} s]")
                if a.verbose:
                    print("".join(f"          {f}\n" for f in failed), end="")
            else:
                missed.append(m.name)
                why = "tests still pass" if rc == 0 else f"pytest exit {rc}: {last}"
                print(f"MISSED  {m.name:32s} {why}  [{took:.0f} s]")
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    # no .pyc of a mutated module may outlive the mutation
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    # a SIGTERM unwinds like an exception, so the mutated file is restored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
