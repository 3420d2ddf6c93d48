"""The command line as a user types it: compile, generate --json, inspect, opt, demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import hf_model


def braze(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "braze", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_compile_generate_inspect(store, tmp_path):
    ckpt = store.checkpoint("qwen3-headdim24-tied")
    art = tmp_path / "q.braze"
    r = braze("compile", ckpt, "-o", art, "--opt-level", "0", "--dump-ir", tmp_path / "ir")
    assert r.returncode == 0, r.stderr
    assert "[3/3]" in r.stderr and (tmp_path / "ir" / "00-traced.bir").exists()

    r = braze("generate", art, "--prompt-ids", "1,2,3", "--max-tokens", "8",
              "--backend", "reference", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    with torch.no_grad():
        ref = hf_model(ckpt).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
    assert out["token_ids"] == ref[0, 3:].tolist()
    assert isinstance(out["text"], str)

    r = braze("generate", art, "--prompt-ids", "1,2,3", "--max-tokens", "4", "--n", "2",
              "--temperature", "1", "--seed", "3", "--logprobs", "2", "--repetition-penalty",
              "1.2", "--backend", "reference", "--json", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 and all(len(x["logprobs"]) == 4 for x in lines)
    assert all(len(e["top"]) == 2 and e["rank"] >= 1 for e in lines[0]["logprobs"])
    r = braze("generate", art, "--prompt-ids", "1", "--presence-penalty", "5")
    assert r.returncode != 0 and "presence_penalty" in r.stderr

    r = braze("inspect", art, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model"]["architecture"] == "Qwen3ForCausalLM"
    assert info["ops"]["paged_attention"] == 2 and info["parameters"] > 0
    import triton
    assert info["cubins_here"] == {"triton_built": triton.__version__,
                                   "triton_here": triton.__version__, "gpu_here": None,
                                   "unusable": "this host has no CUDA GPU"}
    r = braze("inspect", art)
    assert "Qwen3ForCausalLM" in r.stdout and "paged_attention" in r.stdout
    assert f"built with triton {triton.__version__}" in r.stdout

    # a reader that left (`braze inspect ... | head`) is no error: stdout is a pipe nobody reads
    code = ("import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
            "from braze.cli import main; sys.exit(main(['inspect', sys.argv[1]]))")
    r = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and not r.stderr, r.stderr


def test_text_prompt_and_seeded_sampling(store):
    from braze.runtime import LLM, SamplingParams
    llm = LLM(store.artifact("llama"))
    p = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
    a = llm.generate("The quick brown fox", p)[0]
    b = llm.generate("The quick brown fox", p)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert a.prompt_token_ids == llm.tokenizer.encode("The quick brown fox")
    assert a.text == llm.tokenizer.decode(a.token_ids)
    seeds = {tuple(llm.generate("Hello", SamplingParams(max_tokens=12, temperature=5.0, seed=s,
                                                        ignore_eos=True))[0].token_ids)
             for s in range(4)}
    assert len(seeds) > 1, "different seeds should give different samples at high temperature"


def test_opt_prints_a_fixed_point(store, tmp_path):
    src = store.artifact("mixtral") / "graph.bir"
    r1 = braze("opt", src, "--passes", "")
    assert r1.returncode == 0, r1.stderr
    (tmp_path / "g.bir").write_text(r1.stdout)
    r2 = braze("opt", tmp_path / "g.bir", "--passes", "")
    assert r2.stdout == r1.stdout == src.read_text()


def test_ctrl_c_while_kernels_compile_stops_the_compile(store, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group) during kernel compilation:
    braze compile says "interrupted" and exits 130, the workers leave without tracebacks,
    no artifact or .partial directory is left, and the queued kernel jobs are dropped
    rather than all compiled first (counted in a fresh Triton cache: before the fix, every
    job ran to the end after the interrupt)."""
    art, cache = tmp_path / "a.braze", tmp_path / "triton-cache"
    p = subprocess.Popen(
        [sys.executable, "-m", "braze", "compile", store.checkpoint("llama"), "-o", art,
         "--targets", "sm_80,sm_90"], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TRITON_CACHE_DIR": str(cache)}, start_new_session=True,
        # a shell's background job starts with SIGINT ignored, and Python keeps that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, m = [], None
    for line in p.stderr:
        lines.append(line)
        m = re.search(r"kernels: (\d+)/(\d+) compiled on (\d+) processes", line)
        if m:
            os.killpg(p.pid, signal.SIGINT)
            break
    err = "".join(lines) + p.stderr.read()
    assert p.wait(timeout=300) == 130, err
    assert m is not None, err
    assert "braze: interrupted" in err and "Traceback" not in err, err
    assert not art.exists() and not list(tmp_path.glob("a.braze.partial*"))
    done, total, workers = map(int, m.groups())
    # what may still finish: the jobs the workers hold, and the one the pool queues ahead
    compiled = len(list(cache.rglob("*.cubin")))
    assert compiled <= done + 2 * workers + 2 < total, \
        f"{compiled} of {total} kernel jobs ran, {done} done when Ctrl-C came"


def test_demo_runs(tmp_path):
    r = braze("demo", "--max-tokens", "8", "--keep", tmp_path / "kept")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical greedy tokens" in r.stdout
    suggested = re.search(r"braze inspect (\S+)", r.stdout.splitlines()[-1]).group(1)
    assert braze("inspect", suggested).returncode == 0


def test_stop_text_takes_the_usual_escapes():
    from braze.cli import build_parser
    a = build_parser().parse_args(["generate", "a.braze", "--prompt-ids", "1", "--stop", "\\n",
                                   "--stop", "x\\ty", "--stop", "C:\\dir", "--stop", "\\\\n"])
    assert a.stop == ["\n", "x\ty", "C:\\dir", "\\n"]


def test_help_lists_commands():
    r = braze("--help")
    for cmd in ("compile", "generate", "inspect", "opt", "demo", "serve"):
        assert cmd in r.stdout
    r = braze("compile", "--help")
    for flag in ("--opt-level", "--dtype", "--max-num-tokens", "--max-num-seqs", "--max-model-len",
                 "--block-size", "--targets", "--cudagraph-mode", "--dump-ir", "--lora-slots",
                 "--max-lora-rank", "--lora-targets", "--max-logits-rows"):
        assert flag in r.stdout


def test_every_engine_option_is_reachable_from_generate_serve_and_llm(store):
    """One options object (runtime/options.py) from the command line and from braze.LLM:
    each of its fields has a flag on generate and serve, and a bad value is refused once,
    by name, before any work."""
    import dataclasses
    from dataclasses import fields

    from braze.cli import _engine_options, build_parser
    from braze.ir.errors import BrazeError
    from braze.runtime import LLM
    from braze.runtime.options import EngineOptions
    flags = ["--backend", "reference", "--device", "cpu", "--num-kv-blocks", "9",
             "--gpu-memory-utilization", "0.7", "--block-size", "16",
             "--max-model-len", "48", "--max-num-seqs", "3", "--max-num-tokens", "40", "--buckets", "1,8,40",
             "--cudagraph-mode", "none", "--no-prefix-caching", "--no-async-scheduling",
             "--fused-prepare", "--debug", "--trusted-keys", "keys", "--trust-artifact",
             "--kv-offload-cpu-gb", "0.5", "--kv-offload-dir", "kv", "--kv-offload-dir-gb", "3",
             "--max-cpu-loras", "6",
             "--speculative", '{"method": "ngram", "num_speculative_tokens": 2}',
             "--collective-timeout", "7.5", "--sampler", "triton",
             "--scheduling-policy", "priority"]
    want = EngineOptions(backend="reference", device="cpu", num_kv_blocks=9,
                         gpu_memory_utilization=0.7, block_size=16, max_model_len=48,
                         max_num_seqs=3,
                         max_num_tokens=40, buckets=[1, 8, 40], cudagraph_mode="none",
                         enable_prefix_caching=False, async_scheduling=False,
                         fused_prepare=True, debug=True,
                         trusted_keys="keys", trust_artifact=True, kv_offload_cpu_gb=0.5,
                         kv_offload_dir="kv", kv_offload_dir_gb=3.0, max_cpu_loras=6,
                         speculative={"method": "ngram", "num_speculative_tokens": 2},
                         collective_timeout_s=7.5, sampler="triton",
                         scheduling_policy="priority")
    set_by_server = {"freeze_gc"}
    # the lower KV tier is a directory or an object store, not both: checked on its own
    exclusive = {"kv_offload_s3"}
    # the model's sampling defaults are for requests that leave fields unset: serve's flags
    # (generate's sampling flags have their own defaults, greedy; it reads no defaults)
    serve_only = {"generation_config": ("--generation-config", "gen-dir"),
                  "override_generation_config": ("--override-generation-config",
                                                 '{"top_p": 0.5}'),
                  # reasoning splits chat replies: the server's (LLM takes it too)
                  "reasoning_parser": ("--reasoning-parser", "qwen3")}
    assert {f.name for f in fields(EngineOptions) if getattr(want, f.name) != f.default} \
        == {f.name for f in fields(EngineOptions)} - set_by_server - exclusive - set(serve_only)
    generate = _engine_options(build_parser().parse_args(
        ["generate", "a.braze", "--prompt-ids", "1"] + flags))
    assert generate == dataclasses.replace(want, generation_config="vllm")
    serve_flags = [x for flag in serve_only.values() for x in flag]
    assert _engine_options(build_parser().parse_args(["serve", "a.braze"] + flags + serve_flags)) \
        == dataclasses.replace(want, generation_config="gen-dir",
                               override_generation_config={"top_p": 0.5},
                               reasoning_parser="qwen3")
    assert _engine_options(build_parser().parse_args(["serve", "a.braze"])) \
        .generation_config == "auto"
    for cmd in (["generate", "a.braze", "--prompt-ids", "1"], ["serve", "a.braze"]):
        s3 = build_parser().parse_args(cmd + ["--kv-offload-s3", "s3://b/p"])
        assert _engine_options(s3).kv_offload_s3 == "s3://b/p"
    llm = LLM(store.artifact("llama", max_num_tokens=64, max_num_seqs=8), backend="reference",
              max_num_seqs=3, max_num_tokens=40, buckets=[1, 8, 40], num_kv_blocks=9,
              enable_prefix_caching=False)
    s = llm.stats()
    assert (s["max_num_seqs"], s["max_num_tokens"], s["kv_blocks_total"]) == (3, 40, 9)
    with pytest.raises(BrazeError, match="unknown engine option 'max_seqs'"):
        LLM(store.artifact("llama"), max_seqs=3)
    with pytest.raises(BrazeError, match="max_num_tokens must be a positive integer"):
        LLM(store.artifact("llama"), max_num_tokens=0)
    with pytest.raises(BrazeError, match="max_num_seqs=9 exceeds the 8"):
        LLM(store.artifact("llama", max_num_tokens=64, max_num_seqs=8), max_num_seqs=9)


def test_every_option_says_what_it_does_and_its_default():
    """`--help` explains each argument of each command, and names the default of every
    option that has one (a flag that is off needs none)."""
    import argparse

    from braze.cli import build_parser
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        for a in parser._actions:
            if isinstance(a, (argparse._HelpAction, argparse._StoreFalseAction)):
                continue
            text = a.help or ""
            has_default = not (a.default is None or a.default is False)
            if not text or (has_default and "default" not in text.lower()):
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def test_prompt_from_a_file_or_stdin(store, tmp_path):
    from transformers import AutoTokenizer
    art = store.artifact("llama")
    text = "The quick brown fox\njumps over"
    ids = AutoTokenizer.from_pretrained(store.checkpoint("llama"))(text)["input_ids"]
    want = json.loads(braze("generate", art, "--prompt-ids", ",".join(map(str, ids)),
                            "--max-tokens", "5", "--json").stdout)["token_ids"]
    f = tmp_path / "prompt.txt"
    f.write_text(text)
    r = braze("generate", art, "--prompt-file", f, "--max-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want
    r = subprocess.run([sys.executable, "-m", "braze", "generate", str(art), "--prompt-file",
                        "-", "--max-tokens", "5", "--json"], input=text, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want


@pytest.mark.parametrize("args,words", [
    (["--prompt-file", "/nonexistent/p.txt"], ["/nonexistent/p.txt"]),
    (["--prompt", "hi", "--prompt-file", "-"], ["exactly one", "--prompt-file"]),
    (["--prompt", "hi", "--logprobs", "2"], ["--logprobs", "--json"])])
def test_generate_input_errors(store, args, words):
    from cli_helpers import assert_one_line_error
    r = braze("generate", store.artifact("llama"), *args)
    assert_one_line_error(r.returncode, r.stderr, *words)


@pytest.mark.parametrize("flags,want", [
    ([], True), (["--enable-prefix-caching"], True), (["--no-enable-prefix-caching"], False),
    (["--no-prefix-caching"], False)])
def test_prefix_caching_takes_vllms_spelling(flags, want):
    """vLLM's --enable-prefix-caching / --no-enable-prefix-caching, beside braze's own
    --no-prefix-caching, on generate and serve."""
    from braze.cli import _engine_options, build_parser
    for cmd in (["generate", "a.braze", "--prompt-ids", "1"], ["serve", "a.braze"]):
        a = build_parser().parse_args(cmd + flags)
        assert _engine_options(a).enable_prefix_caching is want


def test_kv_cache_sizing_takes_vllms_flags(store, monkeypatch):
    """vLLM's --gpu-memory-utilization sizes the KV cache from that share of the GPU, and
    --num-gpu-blocks-override is --num-kv-blocks; braze.LLM takes the same names."""
    from braze.cli import _engine_options, build_parser
    from braze.ir.errors import BrazeError
    from braze.runtime import LLM, kv_cache, model_runner
    for cmd in (["generate", "a.braze", "--prompt-ids", "1"], ["serve", "a.braze"]):
        o = _engine_options(build_parser().parse_args(
            cmd + ["--gpu-memory-utilization", "0.5", "--num-gpu-blocks-override", "9"]))
        assert (o.gpu_memory_utilization, o.num_kv_blocks) == (0.5, 9)
        assert _engine_options(build_parser().parse_args(cmd)).gpu_memory_utilization == 0.9
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "a.braze", "--gpu-memory-utilization", "1.5"])
    art = store.artifact("llama")
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(BrazeError, match="gpu_memory_utilization must be"):
            LLM(art, gpu_memory_utilization=bad)
    llm = LLM(art, backend="reference", num_gpu_blocks_override=7)
    assert llm.engine.runner.num_kv_blocks == 7

    # the engine's share reaches the sizing
    seen = []
    real = kv_cache.default_num_blocks

    def sizing(*args, **kw):
        seen.append(kw["gpu_memory_utilization"])
        return real(*args, **kw)
    monkeypatch.setattr(model_runner, "default_num_blocks", sizing)
    LLM(art, backend="reference", gpu_memory_utilization=0.25)
    assert seen == [0.25]

    # on a GPU of T bytes, all free: the share of T, in blocks, less nothing else
    cache = llm.engine.runner.executor.cache
    per = cache.bytes_per_block
    total = 1000 * per
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (total, total))
    for share in (0.5, 0.25, 1.0):
        assert real(cache, "cuda", 10 ** 4, 4, gpu_memory_utilization=share) == int(share * 1000)
    with pytest.raises(BrazeError, match="--gpu-memory-utilization"):
        real(cache, "cuda", 1, 600, gpu_memory_utilization=0.5)


def test_block_size_at_run_time_must_be_the_artifacts(store):
    """vLLM's --block-size on serve/generate: the artifact fixed it when it was compiled, so
    the same value is accepted and another is refused by name, saying how to get it."""
    from braze.cli import _engine_options, build_parser
    from braze.ir.errors import BrazeError
    from braze.runtime import LLM
    for cmd in (["generate", "a.braze", "--prompt-ids", "1"], ["serve", "a.braze"]):
        assert _engine_options(build_parser().parse_args(cmd + ["--block-size", "16"])) \
            .block_size == 16
    art = store.artifact("llama")
    compiled = json.loads((art / "manifest.json").read_text())["options"]["block_size"]
    llm = LLM(art, backend="reference", block_size=compiled)
    assert llm.engine.runner.block_size == compiled
    with pytest.raises(BrazeError, match=rf"block_size={2 * compiled}.*{compiled}.*"
                                         rf"braze compile .*--block-size {2 * compiled}"):
        LLM(art, backend="reference", block_size=2 * compiled)


def test_max_model_len_at_run_time_caps_sequences_below_the_artifacts(store):
    """vLLM's --max-model-len on serve/generate (and LLM's max_model_len=): below the
    artifact's, prompts at the cap are refused naming it and outputs stop there with
    finish reason 'length', the same tokens as the artifact's own limit gives up to
    there; above it, refused naming the compile flag."""
    from braze.cli import _engine_options, build_parser
    from braze.ir.errors import BrazeError
    from braze.runtime import LLM
    from braze.runtime.sampler import SamplingParams
    for cmd in (["generate", "a.braze", "--prompt-ids", "1"], ["serve", "a.braze"]):
        assert _engine_options(build_parser().parse_args(cmd + ["--max-model-len", "24"])) \
            .max_model_len == 24
    art = store.artifact("llama")
    compiled = json.loads((art / "manifest.json").read_text())["limits"]["max_model_len"]
    cap = 20
    assert cap < compiled
    llm = LLM(art, backend="reference", num_kv_blocks=32, max_model_len=cap)
    assert llm.engine.max_model_len == cap
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    sp = SamplingParams(max_tokens=None, ignore_eos=True)
    (capped,) = llm.generate([prompt], sp)
    assert len(capped.outputs[0].token_ids) == cap - len(prompt)
    assert capped.outputs[0].finish_reason == "length"
    full = LLM(art, backend="reference", num_kv_blocks=32)
    (ref,) = full.generate([prompt], SamplingParams(max_tokens=cap - len(prompt),
                                                    ignore_eos=True))
    assert capped.outputs[0].token_ids == ref.outputs[0].token_ids
    with pytest.raises(BrazeError, match=rf"{cap}.*max_model_len"):
        llm.generate([list(range(1, cap + 1))], sp)
    with pytest.raises(BrazeError, match=rf"max_model_len={compiled + 1}.*{compiled}.*"
                                         rf"--max-model-len {compiled + 1}"):
        LLM(art, backend="reference", max_model_len=compiled + 1)


def test_generate_closes_its_engine_so_kv_tier_writes_are_bounded(store, tmp_path,
                                                                   monkeypatch, capsys):
    """`braze generate` with a lower KV tier: the blocks it stored are written before it
    exits, within KVOffload.close's bound (left to the interpreter's exit, a tier that
    hangs held the command for every block's retries)."""
    from braze.cli import main
    from braze.runtime import kv_offload
    closed = []
    real = kv_offload.KVOffload.close
    monkeypatch.setattr(kv_offload.KVOffload, "close",
                        lambda self, timeout=None: (closed.append(timeout), real(self, timeout)))
    kv = tmp_path / "kv"
    ids = ",".join(["1"] + [str(3 + i % 90) for i in range(40)])
    assert main(["generate", str(store.artifact("llama")), "--prompt-ids", ids,
                 "--max-tokens", "2", "--backend", "reference", "--kv-offload-dir",
                 str(kv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]
    assert closed == [None] and len(list(kv.rglob("*.kv"))) == 2


@pytest.mark.parametrize("where", ["url", "file"])
def test_an_artifact_that_is_a_url_or_a_file_is_named_as_it_is(tmp_path, where):
    """A vLLM user gives an s3:// URL (vLLM can stream from one) or a tarball of the
    artifact: the error says what was given and what braze takes, not that a path with
    one slash of the URL dropped "does not exist"."""
    from cli_helpers import assert_one_line_error
    if where == "url":
        given, words = "s3://bucket/models/a.braze", ["s3://bucket/models/a.braze",
                                                      "local directory", "download"]
    else:
        given = tmp_path / "a.braze.tar.gz"
        given.write_bytes(b"\x1f\x8b not really a tarball")
        words = [str(given), "a file", "directory"]
    for command in (["inspect", given], ["generate", given, "--prompt-ids", "1"]):
        r = braze(*command)
        assert_one_line_error(r.returncode, r.stderr, *words)
        assert "does not exist" not in r.stderr, r.stderr


@pytest.mark.parametrize("targets", ["", "sm_80,sm_90"])
def test_inspect_counts_the_cubins_the_artifact_holds(store, targets):
    """`braze inspect` says how many cubins are stored per target, counted as the files
    under cubin/ are; an artifact compiled with --targets '' holds none, and inspect said
    '78 specialisations ... built with triton X' of it."""
    from braze.inspect import format_summary, summarize
    art = store.artifact("llama", opt_level=2, dtype="bfloat16", targets=targets)
    s = summarize(art)
    on_disk = {t.name: len(list(t.glob("*.cubin"))) for t in (art / "cubin").glob("*")} \
        if (art / "cubin").is_dir() else {}
    assert s["cubins_stored"] == on_disk
    json.dumps(s)
    line = next(ln for ln in format_summary(s).splitlines() if ln.startswith("cubins"))
    if not on_disk:
        assert "none stored" in line and "built with" not in line, line
    else:
        for t, n in on_disk.items():
            assert f"{n} for {t}" in line, line


def test_max_num_batched_tokens_is_vllms_name_for_max_num_tokens(store):
    """vLLM's --max-num-batched-tokens / max_num_batched_tokens= (the step's token budget)
    is braze's --max-num-tokens, on generate, serve and braze.LLM; the budget it sets
    chunks a long prompt and leaves the greedy output as the default budget gives."""
    from braze.cli import _engine_options, build_parser
    from braze.ir.errors import BrazeError
    from braze.runtime import LLM, SamplingParams
    for cmd in (["generate", "a.braze", "--prompt-ids", "1"], ["serve", "a.braze"]):
        o = _engine_options(build_parser().parse_args(cmd + ["--max-num-batched-tokens", "24"]))
        assert o.max_num_tokens == 24
    art = store.artifact("llama")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompt = list(range(3, 60))
    small = LLM(art, backend="reference", num_kv_blocks=16, max_num_batched_tokens=24)
    assert small.engine.runner.max_num_tokens == 24
    plain = LLM(art, backend="reference", num_kv_blocks=16)
    assert small.generate([prompt], params)[0].token_ids == \
        plain.generate([prompt], params)[0].token_ids
    with pytest.raises(BrazeError, match="max_num_batched_tokens.*max_num_tokens"):
        LLM(art, backend="reference", max_num_batched_tokens=24, max_num_tokens=24)


def test_vllms_chunked_prefill_and_scheduling_policy_are_taken(store):
    """vLLM's enable_chunked_prefill (and its flag): braze always chunks long prompts, so
    True is taken (the output is the plain one) and False is refused, saying so; it was
    'unknown engine option' / 'unrecognized arguments' even at braze's own behaviour.
    scheduling_policy is an option of its own (tests/test_priority_scheduling.py): an
    unknown policy is refused by name."""
    from braze.cli import _engine_options, build_parser
    from braze.ir.errors import BrazeError
    from braze.runtime import LLM, SamplingParams
    art = store.artifact("llama")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompt = list(range(3, 50))
    vllm_style = LLM(art, backend="reference", num_kv_blocks=16, enable_chunked_prefill=True,
                     scheduling_policy="fcfs", max_num_batched_tokens=16)
    plain = LLM(art, backend="reference", num_kv_blocks=16)
    assert vllm_style.generate([prompt], params)[0].token_ids == \
        plain.generate([prompt], params)[0].token_ids
    with pytest.raises(BrazeError, match=r"enable_chunked_prefill=False.*chunks.*leave"):
        LLM(art, backend="reference", enable_chunked_prefill=False)
    with pytest.raises(BrazeError, match=r"scheduling_policy must be one of fcfs, priority"):
        LLM(art, backend="reference", scheduling_policy="lifo")
    for cmd in (["generate", "a.braze", "--prompt-ids", "1"], ["serve", "a.braze"]):
        ok = build_parser().parse_args(cmd + ["--enable-chunked-prefill",
                                              "--scheduling-policy", "fcfs"])
        assert _engine_options(ok).max_num_tokens is None
        with pytest.raises(BrazeError, match="enable_chunked_prefill"):
            _engine_options(build_parser().parse_args(cmd + ["--no-enable-chunked-prefill"]))


@pytest.mark.parametrize("theirs,ours,bad", [("num_gpu_blocks_override", "num_kv_blocks", 0),
                                             ("max_num_batched_tokens", "max_num_tokens", -4),
                                             ("max_num_batched_tokens", "max_num_tokens", 2.5)])
def test_a_bad_value_under_vllms_name_is_refused_under_that_name(theirs, ours, bad):
    """A vLLM user who wrote num_gpu_blocks_override=0 was told 'num_kv_blocks must be a
    positive integer', an option they never gave; the error now names what they wrote,
    and braze's name for it."""
    from braze.ir.errors import BrazeError
    from braze.runtime.options import EngineOptions
    with pytest.raises(BrazeError, match=rf"^{theirs} must be a positive integer, got "
                                         rf"{bad}.*{theirs} is vLLM's name for {ours}"):
        EngineOptions.of(**{theirs: bad})
    with pytest.raises(BrazeError, match=rf"^{ours} must be a positive integer"):
        EngineOptions.of(**{ours: bad})
