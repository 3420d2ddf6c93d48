"""codegen/cubin_report.py and `braze inspect --kernels`: what each stored cubin asks of an SM,
read from real cubins compiled here for sm_80/sm_90 (no GPU)."""

from __future__ import annotations

import json

import pytest
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.codegen.cubin_report import SM_LIMITS, cuobjdump, occupancy, read_cubin

needs_tool = pytest.mark.skipif(cuobjdump() is None, reason="triton ships no cuobjdump here")


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


@triton.jit
def _row_sums(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # a [BLOCK, BLOCK] fp32 tile held at once: ~BLOCK * BLOCK / 128 registers a thread
    r = tl.arange(0, BLOCK)
    t = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
    t = tl.exp(t) * t + tl.sqrt(tl.abs(t))
    tl.store(y_ptr + r, tl.sum(t * tl.trans(t), axis=1))


def _cubin(tmp_path, fn, sig, constexprs, aligned, target="sm_90", tag="", **options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", int(target[3:]), 32),
                       options={"num_warps": 4, **options})
    path = tmp_path / f"{fn.__name__}-{len(aligned)}-{target}{tag}.cubin"
    path.write_bytes(k.asm["cubin"])
    return path


COPY_SIG = {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}


@needs_tool
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_aligned_pointers_load_in_128_bit_vectors_and_unaligned_ones_do_not(tmp_path, target):
    aligned = read_cubin(_cubin(tmp_path, _copy, COPY_SIG, {"BLOCK": 1024}, (0, 1, 2), target))
    plain = read_cubin(_cubin(tmp_path, _copy, COPY_SIG, {"BLOCK": 1024}, (), target))
    # 1024 halves over 128 threads: 8 each, one 16-byte vector where Triton may assume
    # alignment; element by element (16 bits) where it may not
    assert set(aligned.loads) == {128} and set(aligned.stores) == {128}, aligned
    assert 128 not in plain.loads and 16 in plain.loads, plain
    assert sum(plain.loads.values()) > sum(aligned.loads.values())
    assert aligned.spill_bytes == 0 and 0 < aligned.regs <= 64


@needs_tool
def test_a_register_cap_below_the_kernels_need_shows_as_spilled_bytes(tmp_path):
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}
    free = read_cubin(_cubin(tmp_path, _row_sums, sig, {"BLOCK": 64}, (0, 1)))
    capped = read_cubin(_cubin(tmp_path, _row_sums, sig, {"BLOCK": 64}, (0, 1), tag="-capped",
                               maxnreg=32))
    assert free.spill_bytes == 0 and free.regs > 32, free
    assert capped.regs <= 32 and capped.spill_bytes > 0, capped


def test_occupancy_follows_cudas_allocation_rules():
    # 128 registers a thread: 4096 a warp, 16 warps of the 65536, 4 blocks of 4 warps
    assert occupancy("sm_90", 128, 0, 4) == {"blocks": 4, "warps": 16, "fraction": 0.25,
                                             "limited_by": "registers"}
    # 97 registers round up to 104 (per-warp units of 256): 3328 a warp, 19 warps -> 4 blocks
    # (counted exactly, 3104 a warp would give 21 warps, 5 blocks)
    assert occupancy("sm_90", 97, 0, 4)["blocks"] == 4
    # shared memory: 100 KiB + 1 KiB reserved per block -> 2 blocks of 228 KiB on sm_90, 1 of
    # 164 KiB on sm_80
    assert occupancy("sm_90", 32, 100 * 1024, 4)["blocks"] == 2
    assert occupancy("sm_80", 32, 100 * 1024, 4)["limited_by"] == "shared memory"
    assert occupancy("sm_80", 32, 100 * 1024, 4)["blocks"] == 1
    # a light kernel is bounded by the warps an SM holds
    assert occupancy("sm_90", 16, 0, 4)["limited_by"] == "warps"
    assert occupancy("sm_75", 16, 0, 4) is None


@settings(max_examples=200, deadline=None)
@given(target=st.sampled_from(sorted(SM_LIMITS)), regs=st.integers(1, 255),
       shared=st.integers(0, 160 * 1024), warps=st.sampled_from([1, 2, 4, 8, 16]),
       more_regs=st.integers(0, 64), more_shared=st.integers(0, 32 * 1024))
def test_occupancy_never_exceeds_an_sms_limits_and_never_grows_with_use(
        target, regs, shared, warps, more_regs, more_shared):
    lim = SM_LIMITS[target]
    o = occupancy(target, regs, shared, warps)
    assert o["warps"] == o["blocks"] * warps <= lim["warps"]
    assert o["blocks"] <= lim["blocks"]
    assert o["blocks"] * -(-regs * 32 // 256) * 256 * warps <= lim["regs"]
    assert o["blocks"] * (shared + 1024 if shared else 0) <= lim["shared"]
    heavier = occupancy(target, min(255, regs + more_regs), shared + more_shared, warps)
    assert heavier["blocks"] <= o["blocks"]


@pytest.fixture(scope="module")
def sm90_artifact(store):
    return store.artifact("llama", opt_level=2, targets="sm_90")


@needs_tool
def test_inspect_kernels_reads_every_stored_cubin(sm90_artifact, capsys):
    from braze.cli import main
    assert main(["inspect", str(sm90_artifact), "--kernels", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    m = json.loads((sm90_artifact / "manifest.json").read_text())
    stored = {(vid, key) for vid, k in m["kernels"].items() for key in k["cubins"]["sm_90"]}
    rows = s["cubin_resources"]
    assert {(r["variant"], r["spec"]) for r in rows} == stored
    for r in rows:
        assert r["target"] == "sm_90" and r["regs"] > 0 and r["spill_bytes"] == 0
        assert r["num_warps"] == m["kernels"][r["variant"]]["num_warps"]
        assert r["occupancy"]["warps"] >= r["num_warps"]
        assert sum(r["loads"].values()) + sum(r["async_copies"].values()) > 0

    assert main(["inspect", str(sm90_artifact), "--kernels"]) == 0
    text = capsys.readouterr().out
    assert "| kernel | spec | target |" in text
    assert f"{len(stored)} cubins; none spills registers" in text


def test_inspect_kernels_without_cuobjdump_says_what_to_install(sm90_artifact, monkeypatch,
                                                                 capsys):
    import braze.codegen.cubin_report
    from braze.cli import main
    monkeypatch.setattr(braze.codegen.cubin_report, "cuobjdump", lambda: None)
    assert main(["inspect", str(sm90_artifact), "--kernels"]) != 0
    err = capsys.readouterr().err
    assert "cuobjdump" in err and "pip install triton" in err


def test_inspect_kernels_of_an_artifact_without_cubins_says_so(store, capsys):
    from braze.cli import main
    assert main(["inspect", str(store.artifact("llama")), "--kernels"]) == 0
    assert "no cubins stored" in capsys.readouterr().out


@needs_tool
def test_compile_logs_what_its_cubins_ask_and_names_any_that_spill(store, tmp_path,
                                                                    monkeypatch):
    """The line is what the full report gives, read without disassembling any cubin
    (`cuobjdump -sass`, ~300 ms a cubin, had made a tiny model's compile 40 s)."""
    import subprocess

    import braze
    from braze.codegen import cubin_report
    from braze.codegen.cubin_report import kernel_rows, summary_line
    calls = []
    real_run = subprocess.run

    def run(args, *a, **kw):
        calls.append(list(args))
        return real_run(args, *a, **kw)

    monkeypatch.setattr(cubin_report.subprocess, "run", run)
    lines = []
    art = braze.compile(store.checkpoint("llama"), tmp_path / "a.braze", opt_level=2,
                        targets="sm_90", log=lines.append)
    read = [c for c in calls if c and str(c[0]).endswith("cuobjdump")]
    assert read and not any("-sass" in c for c in read)
    monkeypatch.setattr(cubin_report.subprocess, "run", real_run)
    [line] = [x for x in lines if x.startswith("cubin resources:")]
    rows = kernel_rows(art.root, json.loads((art.root / "manifest.json").read_text()))
    heaviest = max(r["regs"] for r in rows)
    assert line == summary_line(rows) and f"up to {heaviest} registers a thread" in line
    assert line.endswith("none spills registers")
    spilled = [dict(rows[0], spill_bytes=96)] + rows[1:]
    warned = summary_line(spilled)
    assert "WARNING: 1 spill registers" in warned
    assert f"{rows[0]['variant']}@{rows[0]['spec']} (sm_90, 96 B)" in warned
