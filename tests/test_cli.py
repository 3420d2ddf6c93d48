"""The command line as a user types it: compile, generate --json, inspect, opt, demo."""

from __future__ import annotations

import json
import subprocess
import sys

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

    r = braze("inspect", art, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model"]["architecture"] == "Qwen3ForCausalLM"
    assert info["ops"]["paged_attention"] == 2 and info["parameters"] > 0
    r = braze("inspect", art)
    assert "Qwen3ForCausalLM" in r.stdout and "paged_attention" in r.stdout


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


def test_demo_runs():
    r = braze("demo", "--max-tokens", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical greedy tokens" in r.stdout


def test_help_lists_commands():
    r = braze("--help")
    for cmd in ("compile", "generate", "inspect", "opt", "demo", "serve"):
        assert cmd in r.stdout
    r = braze("compile", "--help")
    for flag in ("--opt-level", "--dtype", "--max-num-tokens", "--max-num-seqs", "--max-model-len",
                 "--block-size", "--targets", "--cudagraph-mode", "--dump-ir"):
        assert flag in r.stdout
