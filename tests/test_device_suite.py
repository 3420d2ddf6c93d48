"""The device suite (benchmarks/device_suite.py) runs on a GPU for a few minutes now and
then; its CPU dry run, at tiny shapes, keeps it from rotting in between."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "device_suite.py"

sys.path.insert(0, str(ROOT / "benchmarks"))
from device_suite import Suite  # noqa: E402


def run_suite(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), str(out), "--dry-run", *args],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("part, files", [
    ("1", {"summary.md", "env.txt", "gpu-tests.log", "decode.log", "decode-1b.json",
           "decode-8b.json", "profile-1b-b1.md", "profile-1b-b4.md"}),
    ("2", {"summary.md", "env.txt", "decode.log", "decode-1b-full.json", "decode-8b-full.json",
           "kernels.json", "kernels.log"}),
    ("3", {"summary.md", "env.txt", "decode.log", "decode-families.json", "kernels-dsv3.json",
           "kernels-dsv3.log"}),
    ("4", {"summary.md", "env.txt", "decode.log", "decode-gemma4.json"}),
    ("5", {"summary.md", "env.txt", "decode.log", "decode-1b-extern.json",
           "decode-1b-triton.json", "decode-1b-unfused.json"}),
    ("6", {"summary.md", "env.txt", "kv-tiers.json", "kv-tiers.log"}),
    ("7", {"summary.md", "env.txt", "decode.log", "decode-1b-greedy.json", "decode-1b-t1.json",
           "decode-1b-t1-triton.json", "decode-1b-t1-p09.json", "decode-1b-t1-p09-triton.json"}),
    ("8", {"summary.md", "env.txt", "gemm-tune-t1.json", "gemm-tune-t1.log",
           "gemm-tune-t16.json", "gemm-tune-t16.log"}),
])
def test_dry_run_runs_every_stage_into_at_most_eight_files(tmp_path, part, files):
    r = run_suite(tmp_path, "--part", part)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {p.name for p in tmp_path.iterdir()} == files and len(files) <= 8
    summary = (tmp_path / "summary.md").read_text()
    stages = [line.split("|")[1:3] for line in summary.splitlines() if line.startswith("| ")
              and not line.startswith("| stage")]
    assert stages and all(s.strip() == "ok" or "dry run" in s for _, s in stages), summary
    for f in files:
        if f.endswith(".json"):
            doc = json.loads((tmp_path / f).read_text())
            assert doc["complete"] and doc["results"], f
    if part == "1":
        prof = (tmp_path / "profile-1b-b1.md").read_text()
        assert "% of the step" in prof and "| `aten::" in prof
        assert "check tiny Llama-3.2-1B:" in summary and "MISMATCH" not in summary
    if part == "3":
        for name in ("tiny Phi-4-mini", "tiny Gemma-3-1B", "tiny DeepSeek-V3-mini"):
            assert f"check {name}:" in summary and f"decode {name} batch 4:" in summary
        assert "MISMATCH" not in summary
        kernels = {r["kernel"] for r in json.loads((tmp_path / "kernels-dsv3.json").read_text())
                   ["results"] if r["ok"]}
        assert {"grouped_topk", "rms_norm"} <= kernels
    if part == "2":          # the skinny GEMM against cuBLAS (--small-m-gemm), 1B shape first
        rows = json.loads((tmp_path / "kernels.json").read_text())["results"]
        gemms = {(r["model"], r["kernel"], r["tokens"]) for r in rows if r["ok"]}
        assert rows[0]["model"] == "llama3.2-1b" and rows[0]["kernel"] == "gemm_qkv"
        for proj in ("qkv", "o", "gate_up", "down", "lm_head"):
            assert {("llama3.2-1b", f"gemm_{proj}", t) for t in (1, 5)} <= gemms
            assert ("llama3-8b", f"gemm_{proj}", 1) in gemms
        assert not any(r["kernel"].startswith("gemm_") and r["tokens"] > 16 for r in rows)
    if part == "5":          # --small-m-gemm extern vs triton, labelled, in one run
        for choice in ("extern", "triton"):
            doc = json.loads((tmp_path / f"decode-1b-{choice}.json").read_text())
            assert doc["config"]["small_m_gemm"] == choice and doc["config"]["engines"] == ["braze"]
            assert f"[{choice}] decode tiny Llama-3.2-1B batch 4:" in summary
        assert "MISMATCH" not in summary
        doc = json.loads((tmp_path / "decode-1b-unfused.json").read_text())
        assert doc["config"]["fused_prepare"] == "off"
        assert "[extern, prepare by torch ops] decode tiny Llama-3.2-1B batch 4:" in summary
    if part == "7":          # greedy, then sampled: the same engine, the sampler's cost
        for name, t, p, sampler in (("greedy", 0.0, 1.0, "torch"), ("t1", 1.0, 1.0, "torch"),
                                    ("t1-triton", 1.0, 1.0, "triton"),
                                    ("t1-p09", 1.0, 0.9, "torch"),
                                    ("t1-p09-triton", 1.0, 0.9, "triton")):
            cfg = json.loads((tmp_path / f"decode-1b-{name}.json").read_text())["config"]
            assert (cfg["temperature"], cfg["top_p"], cfg["sampler"]) == (t, p, sampler), name
        t1 = json.loads((tmp_path / "decode-1b-t1.json").read_text())["results"][0]
        assert t1["braze"]["runs"]["1"]["profile"]["rows"]   # batch 1's table, in the JSON
        assert "[t=1 triton] decode tiny Llama-3.2-1B batch 4:" in summary
        assert "[t=1 p=0.9 triton] decode tiny Llama-3.2-1B batch 4:" in summary
        assert "[greedy] check tiny" in summary and "[t=1] check" not in summary \
            and "[t=1 p=0.9] check" not in summary     # sampled tokens are not HF's argmax
    if part == "8":          # every projection of both shapes under every setting, checked
        from kernel_bench import GEMM_SWEEP
        for t in (1, 16):
            rows = json.loads((tmp_path / f"gemm-tune-t{t}.json").read_text())["results"]
            got = {(r["model"], r["kernel"], r["config"]) for r in rows if r["ok"]}
            assert all(r["tokens"] == t for r in rows)
            assert got == {(m, f"gemm_{p}", c) for m in ("llama3.2-1b", "llama3-8b")
                           for p in ("qkv", "o", "gate_up_glu", "down", "lm_head")
                           for c in GEMM_SWEEP}
    if part == "6":
        for case in ("computed", "host", "disk", "host beside a decoder"):
            assert f"kv-tiers TTFT {case}:" in summary
        assert "kv-tiers neighbour inter-token latency: median" in summary
    if part == "4":
        name = "tiny Gemma-4-E2B-like"
        assert f"check {name}:" in summary and f"decode {name} batch 4:" in summary
        assert "MISMATCH" not in summary


def test_gemm_settings_rank_by_their_geomean_over_the_cases_every_setting_finished():
    from device_suite import gemm_setting_facts

    def row(model, t, cfg, us):
        return {"model": model, "kernel": "gemm_o", "tokens": t, "config": cfg, "us": us,
                "ok": True}
    rows = [row("a", 1, "264/16/4", 10.0), row("a", 1, "528/16/4", 5.0),
            row("b", 1, "264/16/4", 8.0), row("b", 1, "528/16/4", 8.0),
            row("c", 1, "264/16/4", 1.0)]          # cut short: one setting only, left out
    rows.append(dict(row("c", 1, "528/16/4", 0.5), ok=False))   # a mismatch never wins
    [fact] = gemm_setting_facts("tune", rows)
    # 528: best in both full cases (1.000); 264: 2x then 1x -> sqrt(2)
    assert fact == ("tune: skinny GEMM settings over 2 cases, time / case's best (geomean): "
                    "528/16/4 1.000, 264/16/4 1.414 (default)")
    assert gemm_setting_facts("tune", [dict(r, us=None) for r in rows]) == []


def test_a_deadline_skips_stages_and_still_writes_the_summary(tmp_path):
    r = run_suite(tmp_path, "--deadline", "25")
    summary = (tmp_path / "summary.md").read_text()
    assert r.returncode == 1
    assert "| env | ok |" in summary
    assert "| decode-8b | skipped:" in summary


def test_a_stage_over_its_limit_is_stopped(tmp_path):
    s = Suite(tmp_path, deadline_s=60, dry_run=True, part=1)
    ok = s.stage("sleepy", 1, [[sys.executable, "-c", "import time; time.sleep(30)"]],
                 "sleepy.log", min_s=0)
    assert not ok and s.rows[-1]["status"].startswith("timed out") and s.rows[-1]["seconds"] < 10
    assert "| sleepy | timed out" in (tmp_path / "summary.md").read_text()


def test_a_decode_stage_budgets_the_time_left_not_its_limit(tmp_path):
    """decode.py's --budget (when it stops starting HF baselines) comes from the time the
    stage really has: earlier stages that ran long leave the last decode stage less than its
    limit, and a baseline started past that would be killed with the stage."""
    s = Suite(tmp_path, deadline_s=150, dry_run=True, part=1)
    seen = []
    s.stage = lambda name, limit_s, cmds, log, **kw: seen.append(cmds[0]) or True
    s.decode_stage("decode-8b", 220, "8b", "1", "eager", "decode-8b.json", [])
    s.decode_stage("decode-1b", 200, "1b", "1", "eager,compile", "decode-1b.json", [])
    eager, both = (float(cmd[cmd.index("--budget") + 1]) for cmd in seen)
    assert 100 <= eager <= s.left() - 20 + 1 and both <= s.left() - 60 + 1, (eager, both)


def test_device_wheels_runs_in_a_git_worktree(tmp_path):
    """benchmarks/device_wheels.sh marks .whl/ ignored where git keeps the checkout's
    excludes: in a worktree .git is a file, and `>> .git/info/exclude` stopped the script
    (set -e) before any wheel was fetched. pip is a stub here: nothing is downloaded."""
    import os
    import shutil
    git = shutil.which("git")
    if git is None:
        pytest.skip("needs git")
    main, wt, stub = tmp_path / "main", tmp_path / "wt", tmp_path / "bin"
    for d in (main / "benchmarks", stub):
        d.mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "device_wheels.sh", main / "benchmarks")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")
    run = lambda *a, cwd=main: subprocess.run(a, cwd=cwd, env=env, check=True,
                                              capture_output=True, text=True)
    run(git, "init", "-q")
    run(git, "add", ".")
    run(git, "commit", "-qm", "x")
    run(git, "worktree", "add", "-q", str(wt))
    (stub / "python3").write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n")
    (stub / "python3").chmod(0o755)
    r = subprocess.run(["bash", str(wt / "benchmarks" / "device_wheels.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "/.whl/" in (main / ".git" / "info" / "exclude").read_text().splitlines()
    assert "cryptography==" in (stub / "calls").read_text() and (wt / ".whl").is_dir()


def test_each_gemm_setting_launches_a_cubin_of_its_own():
    """kernel_bench --aot names each launch for the cubin cache: two --gemm-configs
    settings that lower the same case differently must not share a cubin (the first one's,
    with its constexprs and warps, would run for both)."""
    import torch
    from kernel_bench import TINY_MODELS, Builder, Prepared, gemm_config

    class FakeAot:          # what Prepared asks of AotCubins before anything launches
        sources: dict = {}

    names = {}
    for cfg in ("264/16/4/1", "264/16/8/1", "264/16/4/1"):
        b = Builder("llama3.2-1b", TINY_MODELS["llama3.2-1b"], "f32", torch.device("cpu"),
                    40, 32, 0)
        with gemm_config(cfg):
            prep = Prepared(b.gemm_qkv(1), interpret=True, device=torch.device("cpu"),
                            aot=FakeAot())
        names.setdefault(cfg, set()).update(ln["kernel"] for ln in prep.launches
                                            if "extern" not in ln)
    assert names["264/16/4/1"] and names["264/16/4/1"].isdisjoint(names["264/16/8/1"])
