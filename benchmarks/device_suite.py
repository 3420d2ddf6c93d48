#!/usr/bin/env python3
"""The device suite: what braze needs to learn from a GPU, in one call of at most 9 minutes.

    python3 benchmarks/device_suite.py OUTDIR              # part 1: the most important facts
    python3 benchmarks/device_suite.py OUTDIR --part 2     # what part 1 has no time for
    python3 benchmarks/device_suite.py OUTDIR --dry-run    # the same stages on a CPU, tiny

A GPU is lent for about 15 minutes at a time and one command may run 10, so the suite
puts the facts that matter most first, gives every stage a time limit against one
overall deadline (--deadline, default 530 s from the start), and writes its files into
OUTDIR as it goes: whatever stops it, what it had measured is there. It imports no
braze and nothing outside the standard library itself (and gemm_settings.py beside it,
which imports only that); every stage is a subprocess.

Part 1:
  env          GPU, driver, versions, device-to-device copy bandwidth      env.txt
  install      pip install --no-deps --no-index (the GPU image has no network), and the
               wheels benchmarks/device_wheels.sh put in .whl/ (carry it: cryptography,
               which signing needs; only signed artifacts' cubins are launched)
  correctness  pytest -m gpu: bf16 logits at every position vs transformers   gpu-tests.log
               (DeepSeek-V3's MLA kernel too),
               graph modes none/piecewise/full agree, every bucket's replay
               equals eager, bf16 cubins launched with zero JIT
  decode-1b    Llama-3.2-1B shape, batch 1 and 64 vs HF eager, profiled     decode-1b.json,
                                                                           profile-1b-b1.md,
                                                                           profile-1b-b64.md
  decode-8b    Llama-3-8B shape, batch 1 vs HF eager (weights in /dev/shm)  decode-8b.json
Part 2:
  decode-1b    batches 1, 16, 64 vs HF eager and torch.compile, cold start  decode-1b-full.json
  decode-8b    batches 16, 64 vs HF eager, cold start                       decode-8b-full.json
  kernels      every kernel template at the Llama-3-8B and Qwen3-30B-A3B    kernels.json,
               shapes: us, GB/s, % of HBM, against torch; first the skinny  kernels.log
               GEMM against cuBLAS per projection at T = 1 and 16 (1B shape, then
               8B's among its kernels): what --small-m-gemm's default waits for
Part 3:
  decode-families  Phi-4-mini, Gemma-3-1B and DeepSeek-V3-mini shapes (partial rotary +
               longrope; (1 + w) sandwich norms, sliding/global layers, head_dim 256; MLA
               latent cache + absorbed decode kernel, grouped sigmoid MoE), batches 1
               and 16 vs HF eager, with the teacher-forced correctness check  decode-families.json
  kernels-dsv3 DeepSeek-V3's kernels at the 671B shape (latent attention,     kernels-dsv3.json,
               grouped router, routed experts, norms), T = 1, 16, 64, 2048 kernels-dsv3.log
Part 4:
  decode-gemma4  Gemma-4-E2B-like shape (per-layer inputs over a 262k vocabulary, 20 of
               35 layers sharing KV, sliding/global layers with head_dim 256/512), batches
               1 and 16 vs HF eager, with the correctness check        decode-gemma4.json
Part 5:
  small-m      --small-m-gemm extern vs triton (the skinny GEMM, gate_up with its silu in
               the epilogue) in one run: Llama-3.2-1B shape, batches 1 and 16, braze
               only                                   decode-1b-extern.json, decode-1b-triton.json
  unfused      the same with extern GEMMs and --fused-prepare off: the step's inputs by
               ~20 torch ops instead of one kernel    decode-1b-unfused.json
               (the skinny GEMMs against cuBLAS per projection: part 8)
Part 6:
  kv-tiers     time to first token of a repeated 32k-token prefix with Llama-3-8B's KV
               per token (4 GiB): computed, loaded from pinned host memory, staged from
               disk; and a decoding neighbour's inter-token latency while the load's copy
               runs on its own stream (benchmarks/kv_offload.py)       kv-tiers.json,
                                                                       kv-tiers.log
Part 7:
  sampled      what sampling adds to a decode step (the engine's torch sampler: ~116 ops on
               the device a step at temperature > 0, ~139 with top-p) and the fused
               kernel (--sampler triton): Llama-3.2-1B shape, batches 1 and 16, braze
               only: greedy, t=1 (batch 1 profiled), t=1 triton, t=1 top_p 0.9, and
               t=1 top_p 0.9 triton (the kernel's top-p without a sort)
                               decode-1b-greedy.json, decode-1b-t1.json (its "profile":
                               the batch-1 table), decode-1b-t1-triton.json,
                               decode-1b-t1-p09.json, decode-1b-t1-p09-triton.json
Part 8:
  gemm-tune-t1 the skinny GEMM's settings (TARGET_PROGRAMS/TILE_KiB/NUM_WARPS, kernel_bench
               --gemm-configs sweep) per projection of the 1B and 8B shapes at T = 1 (the
               GEMV branch of batch-1 decode), against cuBLAS      gemm-tune-t1.json,
                                                                   gemm-tune-t1.log
  gemm-tune-t16 the same at T = 16 (the mma branch)                gemm-tune-t16.json,
                                                                   gemm-tune-t16.log

Every part also writes summary.md (the stage table and the headline figures, rewritten
after each stage) and logs each stage's output (decode.log, kernels.log). At most 8
files, as the device tool brings back. Record the figures in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESERVE_S = 10          # kept back from the deadline to write the summary

ENV_SNIPPET = r"""
import json, platform, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "triton", "transformers", "numpy", "safetensors", "tokenizers"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:
        info[name] = f"missing ({type(e).__name__})"
import torch
info["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    sys.path.insert(0, sys.argv[1])                 # benchmarks/
    from decode import measured_copy_tbps
    info["copy_tbps_read_plus_write"] = round(measured_copy_tbps(), 3)
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw,"
             "temperature.gpu,memory.used", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:
        info["nvidia_smi"] = f"unavailable ({e})"
print(json.dumps(info))
"""


class Suite:
    def __init__(self, out: Path, deadline_s: float, dry_run: bool, part: int):
        self.out, self.dry_run, self.part = out, dry_run, part
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.rows: list[dict] = []
        self.facts: list[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.python = sys.executable

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def stage(self, name: str, limit_s: float, cmds: list[list[str]], log: str,
              min_s: float = 20, after=None) -> bool:
        """Run `cmds` in order into OUTDIR/`log`, within min(limit_s, time left). Returns
        whether every command succeeded; `after()` adds headline facts either way."""
        budget = min(limit_s, self.left())
        row = {"stage": name, "limit_s": round(budget), "status": "skipped", "seconds": 0.0}
        self.rows.append(row)
        if budget < min_s:
            row["status"] = f"skipped: {max(0, round(self.left()))} s left"
            self.write_summary()
            return False
        t = time.monotonic()
        ok = True
        with open(self.out / log, "a") as f:
            for cmd in cmds:
                f.write(f"\n$ {' '.join(cmd)}\n")
                f.flush()
                left = budget - (time.monotonic() - t)
                if left < 1:
                    row["status"], ok = "timed out", False
                    break
                print(f"[{self.elapsed():5.0f}s] {name}: {' '.join(cmd)[:160]}", flush=True)
                try:
                    rc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f,
                                        stderr=subprocess.STDOUT, timeout=left).returncode
                except subprocess.TimeoutExpired:
                    row["status"], ok = f"timed out after {budget:.0f} s", False
                    break
                if rc != 0:
                    row["status"], ok = f"failed (exit {rc})", False
                    break
            else:
                row["status"] = "ok"
        row["seconds"] = round(time.monotonic() - t, 1)
        print(f"[{self.elapsed():5.0f}s] {name}: {row['status']} in {row['seconds']} s", flush=True)
        if after is not None:
            try:
                after()
            except Exception as e:     # a summary must not stop the suite
                self.facts.append(f"{name}: could not read results ({type(e).__name__}: {e})")
        self.write_summary()
        return ok

    def have(self, module: str) -> bool:
        """Whether the suite's python, with the stages' PYTHONPATH, can import `module`."""
        return subprocess.run([self.python, "-c", f"import {module}"], env=self.env,
                              capture_output=True, timeout=60).returncode == 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write_summary(self) -> None:
        lines = [f"# braze device suite, part {self.part}{' (DRY RUN on the CPU)' if self.dry_run else ''}",
                 "", f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {self.elapsed():.0f} s elapsed", "",
                 "| stage | status | seconds | limit s |", "|---|---|---:|---:|"]
        lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} | {r['limit_s']} |"
                  for r in self.rows]
        if self.facts:
            lines += ["", "## Figures", ""] + [f"- {f}" for f in self.facts]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")

    # -- stages ------------------------------------------------------------------------
    def env_stage(self) -> None:
        def after():
            text = (self.out / "env.txt").read_text().strip().splitlines()
            info = json.loads(next(line for line in reversed(text) if line.startswith("{")))
            self.facts.append(
                f"env: {info.get('gpu', 'no GPU')} {info.get('capability', '')}, "
                f"copy {info.get('copy_tbps_read_plus_write', 'n/a')} TB/s; python "
                f"{info['python']}, torch {info['torch']}, triton {info['triton']}, "
                f"transformers {info['transformers']}, numpy {info['numpy']}; "
                f"nvidia-smi: {info.get('nvidia_smi', 'n/a')}")
        self.stage("env", 60, [[self.python, "-c", ENV_SNIPPET, str(BENCH)]], "env.txt",
                   min_s=5, after=after)

    def install_stage(self) -> None:
        if self.dry_run:
            self.rows.append({"stage": "install", "limit_s": 0, "seconds": 0.0,
                              "status": "skipped (dry run: the checkout is installed)"})
            return
        pip = [self.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
               "--no-build-isolation"]
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        if wheels:          # benchmarks/device_wheels.sh: what the image lacks (cryptography)
            site = Path("/tmp/braze-deps")
            self.stage("install wheels", 60, [pip + ["--target", str(site)] + list(map(str, wheels))],
                       "env.txt", min_s=5)
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(site)] + [p for p in [self.env.get("PYTHONPATH")] if p])
        if not self.have("cryptography"):
            self.facts.append("WARNING: no cryptography package: braze compile cannot sign "
                              "artifacts, so no cubins are launched; run "
                              "benchmarks/device_wheels.sh here and carry .whl")
        if self.stage("install", 120, [pip + ["-e", str(ROOT)]], "env.txt", min_s=10):
            return
        # an image whose setuptools cannot do editable installs: a plain one on PYTHONPATH
        target = Path("/tmp/braze-site")
        self.stage("install (fallback)", 120, [pip + ["--target", str(target), str(ROOT)]],
                   "env.txt", min_s=10)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(target)] + [p for p in [self.env.get("PYTHONPATH")] if p])

    def correctness_stage(self, limit_s: float) -> None:
        # -v: a line per test as it ends, so a stage cut short still says which ran and how
        cmd = [self.python, "-m", "pytest", "-m", "gpu", "-v", "-rA", "-s", "-p", "no:cacheprovider",
               "tests/test_gpu.py", "tests/test_gpu_graphs.py", "tests/test_deepseek_v3.py",
               "tests/test_gpu_lora.py", "tests/test_kernel_moe.py",
               "tests/test_prompt_logprobs_pruned.py", "tests/test_mtp.py",
               "tests/test_gemma4_assistant.py", "tests/test_draft_loop.py",
               "tests/test_mtp_graphs.py", "tests/test_kernel_skinny_gemm.py",
               "tests/test_linear_glu.py", "tests/test_prepare_kernel.py"]
        if importlib.util.find_spec("pytest_timeout"):
            cmd += ["--timeout", "150"]

        def after():
            log = (self.out / "gpu-tests.log").read_text().splitlines()
            tail = [line for line in log if line.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))]
            if not tail:        # cut short before pytest's summary: the -v lines so far
                tail = [f"{w} {line.split()[0]}" for line in log if line.startswith("tests/")
                        for w in ("PASSED", "FAILED", "ERROR", "SKIPPED") if f" {w}" in line]
            final = next((line for line in reversed(log) if " in " in line and
                          any(w in line for w in ("passed", "failed", "skipped", "error"))), "?")
            bad = [line for line in tail if not line.startswith(("PASSED", "SKIPPED"))]
            self.facts.append(f"correctness: {final.strip('= ')}"
                              + ("" if not bad else "; " + "; ".join(b[:160] for b in bad[:6])))
        self.stage("correctness", limit_s, [cmd], "gpu-tests.log", after=after)

    def decode_stage(self, name: str, limit_s: float, model: str, batches: str,
                     baselines: str, json_name: str, extra: list[str], label: str = "") -> None:
        json_path = self.out / json_name
        # decode.py starts no HF baseline past --budget: give it the time this stage really
        # has (earlier stages may have eaten into limit_s), less what a baseline run takes
        # (HF eager: seconds; torch.compile: its compilation, about a minute)
        budget = min(limit_s, self.left())
        margin = 60 if "compile" in baselines else 20
        cmd = [self.python, str(BENCH / "decode.py"), "--models", model, "--batches", batches,
               "--baselines", baselines, "--json", str(json_path),
               "--budget", str(round(max(30, budget - margin)))] + extra
        if self.dry_run:
            cmd += ["--dry-run", "--steps", "2", "--warmup", "1"]
            if self.part != 1:
                # the benchmark's own code, at a third of the time: part 1's dry run already
                # takes decode.py through the interpret backend (the launch plans the GPU
                # runs), which the other parts' decode stages share
                cmd += ["--backend", "reference"]
        else:
            # checkpoint + artifact, each the bf16 weights: Phi-4-mini's are 7.7 GB
            cmd += ["--work-dir", work_dir(40 << 30 if model == "8b" else
                                           20 << 30 if "phi4" in model or "gemma4" in model
                                           else 8 << 30)]

        def after():
            doc = json.loads(json_path.read_text())
            for r in doc["results"]:
                self.facts += [label + f for f in decode_facts(r, doc)]
            if not doc.get("complete"):
                self.facts.append(f"{name}: results incomplete (the stage was cut short)")
        self.stage(name, limit_s, [cmd], "decode.log", after=after)

    def kv_tiers_stage(self, limit_s: float) -> None:
        json_path = self.out / "kv-tiers.json"
        cmd = [self.python, str(BENCH / "kv_offload.py"), "--json", str(json_path)]
        if self.dry_run:
            cmd += ["--prefix-tokens", "256", "--max-num-tokens", "128"]
        else:
            cmd += ["--backend", "cuda", "--kv-shape", "8b", "--dtype", "bfloat16",
                    "--prefix-tokens", "32768", "--max-num-tokens", "2048"]

        def after():
            doc = json.loads(json_path.read_text())
            rows = {r["case"]: r for r in doc["results"]}
            base = rows.get("computed", {}).get("ttft_s")
            self.facts += [f"kv-tiers TTFT {case}: {r['ttft_s'] * 1000:.0f} ms"
                           + (f" ({base / r['ttft_s']:.1f}x computed)" if base else "")
                           for case, r in rows.items()]
            n = rows.get("host beside a decoder")
            if n:
                self.facts.append(
                    f"kv-tiers neighbour inter-token latency: median "
                    f"{n['neighbour_itl_median_before_s'] * 1000:.1f} ms before, max "
                    f"{n['neighbour_itl_max_during_s'] * 1000:.1f} ms during the load")
        self.stage("kv-tiers", limit_s, [cmd], "kv-tiers.log", after=after)

    def kernels_stage(self, name: str, limit_s: float, models: list[str], json_name: str,
                      sizes: list[int] | None = None, kernels: list[str] | None = None,
                      extra: list[str] | None = None) -> None:
        json_path = self.out / json_name
        cmd = [self.python, str(BENCH / "kernel_bench.py"), "--json", str(json_path),
               "--models", *models] + (extra or [])
        if self.dry_run:
            cmd += ["--dry-run", "--kernels", *(kernels or ["norm", "router", "skinny_gemm"])]
        else:
            cmd += ["--sizes", *map(str, sizes)] if sizes else []
            cmd += ["--kernels", *kernels] if kernels else []

        def after():
            doc = json.loads(json_path.read_text())
            ok = sum(1 for r in doc["results"] if r.get("ok"))
            self.facts.append(f"{name}: {ok}/{len(doc['results'])} cases match the reference"
                              + ("" if doc.get("complete") else " (cut short)"))
            self.facts += gemm_setting_facts(name, doc["results"])
        self.stage(name, limit_s, [cmd], f"{name}.log", after=after)


def gemm_setting_facts(name: str, rows: list[dict]) -> list[str]:
    """kernel_bench --gemm-configs rows -> each setting's geometric-mean time over the cases
    that every setting finished, relative to each case's fastest (1.00: fastest everywhere),
    best first; the first setting tried is the module's current default."""
    from gemm_settings import relative_geomean, timed_cases
    cases, order = timed_cases(rows)
    full = [by for by in cases.values() if len(by) == len(order)]
    if not full:
        return []
    score = {c: relative_geomean(full, c) for c in order}
    ranked = sorted(order, key=score.get)
    return [f"{name}: skinny GEMM settings over {len(full)} cases, time / case's best "
            "(geomean): " + ", ".join(f"{c} {score[c]:.3f}" + (" (default)" if c == order[0]
                                                                else "") for c in ranked)]


def work_dir(need_bytes: int) -> str:
    """/dev/shm when it can hold the checkpoint and the artifact (memory, not disk: the 8B
    shape's 16 GB are written twice), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= need_bytes:
        return str(shm)
    return os.environ.get("TMPDIR", "/tmp")


def decode_facts(r: dict, doc: dict) -> list[str]:
    """Headline lines of one model's decode results (benchmarks/decode.py's JSON)."""
    out = []
    name = r.get("name", r.get("model"))
    runs = (r.get("braze") or {}).get("runs") or {}
    peak, copy = doc.get("peak_tbps"), doc.get("copy_tbps")
    total = (r.get("bytes_b1") or {}).get("total")
    for b, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
        if "tpot_ms" not in run:
            continue
        line = f"decode {name} batch {b}: braze {run['tpot_ms']:.3f} ms/step"
        fwd = run.get("forward") or {}
        if "tpot_ms" in fwd:
            line += f" (forward alone {fwd['tpot_ms']:.3f})"
        for key, label in (("hf_eager", "HF eager"), ("hf_compile", "torch.compile")):
            base = (r.get(key) or {}).get(str(b)) or (r.get(key) or {}).get(b) or {}
            if "tpot_ms" in base:
                line += (f"; {label} {base['tpot_ms']:.3f} ms (braze "
                         f"{base['tpot_ms'] / run['tpot_ms']:.2f}x faster)")
        if str(b) == "1" and total and peak:
            line += f"; {100 * total / (peak * 1e12) / (run['tpot_ms'] / 1e3):.1f} % of the " \
                    f"{peak:g} TB/s roofline"
            if copy:
                line += f", {100 * total / (copy * 1e12) / (run['tpot_ms'] / 1e3):.1f} % of " \
                        f"the measured {copy:.2f} TB/s"
        out.append(line)
    k = (r.get("braze") or {}).get("kernels")
    if k:
        out.append(f"kernels {name}: {k}")
    g = (r.get("braze") or {}).get("graphs")
    if g:
        out.append(f"graphs {name}: {g.get('cuda_graphs_captured')} captured in "
                   f"{g.get('capture_seconds') or 0:.2f} s, pool "
                   f"{(g.get('capture_bytes') or 0) / 2**20:.0f} MiB")
    cs = r.get("cold_start") or {}
    if "cold_start_excl_weights_s" in cs:
        out.append(f"cold start {name}: {cs['cold_start_excl_weights_s']:.2f} s weights excluded "
                   f"({cs['total_s']:.2f} s in all)")
    ck = r.get("check") or {}
    if "tokens" in ck:
        out.append(f"check {name}: {ck['argmax_agree']}/{ck['tokens']} tokens are HF's argmax, "
                   f"max shortfall {ck['max_deficit_sigma']:.3f} sigma "
                   f"({'ok' if ck.get('ok') else 'MISMATCH'})")
    for sec, err in (r.get("errors") or {}).items():
        out.append(f"ERROR {name} {sec}: {err.splitlines()[0][:200]}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("outdir", help="where the files go (created; at most 8 files)")
    ap.add_argument("--part", type=int, choices=(1, 2, 3, 4, 5, 6, 7, 8), default=1)
    ap.add_argument("--deadline", type=float, default=530.0, metavar="SECONDS",
                    help="stop starting work after this many seconds (default 530: a "
                         "9-minute device call with room to bring the files back)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: the same stages at tiny shapes on the CPU (CI runs this)")
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    s = Suite(out, args.deadline, args.dry_run, args.part)
    s.write_summary()
    s.env_stage()
    s.install_stage()
    if args.part == 1:
        s.correctness_stage(200)
        s.decode_stage("decode-1b", 150, "1b", "1,64" if not args.dry_run else "1,4", "eager",
                       "decode-1b.json", ["--no-cold-start", "--profile-batches",
                                          "1,64" if not args.dry_run else "1,4",
                                          "--profile-dir", str(out)])
        s.decode_stage("decode-8b", 220, "8b", "1", "eager", "decode-8b.json", ["--no-cold-start"])
    elif args.part == 3:
        s.decode_stage("decode-families", 420, "phi4-mini,gemma3-1b,dsv3-mini",
                       "1,16" if not args.dry_run else "1,4", "eager", "decode-families.json",
                       ["--no-cold-start"])
        s.kernels_stage("kernels-dsv3", 100, ["deepseek-v3"], "kernels-dsv3.json",
                        sizes=[1, 16, 64, 2048])
    elif args.part == 5:
        # the same shape, batches and machine with either choice of --small-m-gemm: the
        # A/B its default waits for (braze only: part 1 has the HF baselines); then the
        # step's inputs written by torch ops instead of the fused prepare kernel (on by
        # default for cuda): what that default is worth. The skinny GEMMs against cuBLAS
        # per projection are part 8's (its sweep starts with the default setting)
        for name, extra, label in (
                ("extern", ["--small-m-gemm", "extern"], "[extern] "),
                ("triton", ["--small-m-gemm", "triton"], "[triton] "),
                ("unfused", ["--small-m-gemm", "extern", "--fused-prepare", "off"],
                 "[extern, prepare by torch ops] ")):
            s.decode_stage(f"decode-1b-{name}", 150, "1b", "1,16" if not args.dry_run else "1,4",
                           "", f"decode-1b-{name}.json", ["--no-cold-start"] + extra,
                           label=label)
    elif args.part == 6:
        s.kv_tiers_stage(480)
    elif args.part == 7:
        # the same shape and batches greedy, then sampled: the difference is the sampler's
        # (braze only: HF's baselines are greedy); batch 1 profiled where it samples, its
        # table kept in decode-1b-t1.json ("profile"), not a file of its own: five stages'
        # JSON, the log, env.txt and summary.md are the 8 files that come back
        batches = "1,16" if not args.dry_run else "1,4"
        tables = Path(tempfile.mkdtemp(prefix="braze-profile-"))
        for name, extra, label in (
                ("greedy", [], "[greedy] "),
                ("t1", ["--temperature", "1", "--profile-batches", "1"], "[t=1] "),
                ("t1-triton", ["--temperature", "1", "--sampler", "triton"], "[t=1 triton] "),
                ("t1-p09", ["--temperature", "1", "--top-p", "0.9"], "[t=1 p=0.9] "),
                ("t1-p09-triton", ["--temperature", "1", "--top-p", "0.9", "--sampler",
                                   "triton"], "[t=1 p=0.9 triton] ")):
            s.decode_stage(f"decode-1b-{name}", 120, "1b", batches, "", f"decode-1b-{name}.json",
                           ["--no-cold-start", "--profile-dir", str(tables)] + extra, label=label)
    elif args.part == 8:
        # the skinny GEMM's module constants (TARGET_PROGRAMS/TILE_KiB/NUM_WARPS) swept per
        # projection of the 1B and 8B shapes: T = 1 (the GEMV branch, batch-1 decode) for
        # both shapes first, then T = 16 (the mma branch)
        gemms = ["gemm_qkv", "gemm_o", "gemm_gate_up_glu", "gemm_down", "gemm_lm_head"]
        sweep = ["--gemm-configs", "sweep", "--iters", "50", "--budget", "0.5"]
        for t, limit in ((1, 260), (16, 220)):
            s.kernels_stage(f"gemm-tune-t{t}", limit, ["llama3.2-1b", "llama3-8b"],
                            f"gemm-tune-t{t}.json", sizes=[t], kernels=gemms,
                            extra=sweep + (["--sizes", str(t)] if s.dry_run else []))
    elif args.part == 4:
        s.decode_stage("decode-gemma4", 440, "gemma4-e2b", "1,16" if not args.dry_run else "1,4",
                       "eager", "decode-gemma4.json", ["--no-cold-start"])
    else:
        s.decode_stage("decode-1b", 200, "1b", "1,16,64" if not args.dry_run else "1,4",
                       "eager,compile", "decode-1b-full.json", [])
        s.decode_stage("decode-8b", 200, "8b", "16,64" if not args.dry_run else "4", "eager",
                       "decode-8b-full.json", [])
        # the 1B shape runs its GEMMs only (~10 cases, ~20 s with their JIT compiles), first,
        # so a cut-short stage still has them; 150 s: the 8B and Qwen3 shapes add ~16 GEMM
        # cases to the 120 s the other kernels had (the deadline still bounds the stage)
        s.kernels_stage("kernels", 150, ["llama3.2-1b", "llama3-8b", "qwen3-30b-a3b"],
                        "kernels.json")
    s.write_summary()
    print((out / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped (dry run")
                    or r["stage"] == "install (fallback)" for r in s.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
