"""The CPU benchmark scripts of benchmarks/ as an operator runs them: what they build still
opens, their arguments are checked with a clear message, not a traceback or a silently
different measurement."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from braze.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def script(name: str):
    """benchmarks/NAME.py as a module (its imports of results_file etc. resolved)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_verify_time_meta_artifact_opens_and_verifies(tmp_path):
    """verify_time.py's weightless artifact is a manifest the loader takes and a plan this
    braze regenerates byte for byte (it was refused as damaged: no "model" section)."""
    vt = script("verify_time")
    model_dir = tmp_path / "model"
    tiny_config("llama").save_pretrained(model_dir)
    art = vt.build_meta(model_dir, tmp_path / "a.braze")
    from braze.artifact import read_manifest_bytes
    from braze.runtime.trust import establish
    from braze.ir import parse_graph
    manifest, raw = read_manifest_bytes(art)
    assert manifest["model"]["num_layers"] == tiny_config("llama").num_hidden_layers
    graph = parse_graph((art / "graph.bir").read_text())
    assert establish(art, manifest, raw, graph).how == "verified"
    r = vt.worker(str(art))
    assert r["launches"] == sum(len(s["launches"]) for s in manifest["plan"]["segments"])
    json.dumps(r)


def test_sampler_options_small_vocab_and_case_names(tmp_path, capsys):
    """sampler_options.py at a small --vocab measures every case (its logit_bias ids were
    fixed at up to 1455: IndexError below that), and a misspelt --cases name is refused, not
    measured as plain greedy under that name."""
    so = script("sampler_options")
    out = tmp_path / "so.json"
    assert so.main(["--vocab", "64", "--requests", "2", "--history", "8", "--steps", "1",
                    "--warmup", "0", "--cases", "greedy+bias,sampled+opts",
                    "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] and [r["case"] for r in doc["results"]] == ["greedy+bias",
                                                                       "sampled+opts"]
    for bad in (["--cases", "greedy+penalty"], ["--vocab", "8"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            so.main(bad)
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_compile_memory_refuses_a_size_it_cannot_build(capsys):
    """compile_memory.py --mb below its shape's smallest checkpoint (embedding, LM head and
    one layer) is refused naming the least it builds; it built that larger one silently."""
    cm = script("compile_memory")
    least = cm.checkpoint_mib(1)
    for args, needle in ((["--mb", str(int(least) - 1)], f"{least:.0f} MiB"),
                         (["--shard-mb", "0"], "--shard-mb 0")):
        with pytest.raises(SystemExit) as e:
            cm.main(args)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err


def test_readme_names_the_scripts_whose_json_is_rewritten_per_row():
    """benchmarks/README.md's list of scripts whose --json PATH is rewritten after every
    row is exactly the scripts that write it through results_file.py (it said every
    script, and several have no --json file)."""
    import re
    text = (BENCH / "README.md").read_text()
    para = text[text.index("The scripts that take `--json PATH`"):]
    listed = set(re.findall(r"`(\w+)\.py`", para[:para.index(")")]))
    users = {p.stem for p in BENCH.glob("*.py")
             if re.search(r"^from results_file import", p.read_text(), re.M)}
    assert listed == users


@pytest.mark.parametrize("name, args, needle", [
    ("prompt_logprobs", ["--prompt-len", "0"], "--prompt-len 0"),
    ("prompt_logprobs", ["--prompt-len", "1024"], "--prompt-len 1024"),
    ("prompt_logprobs", ["--repeat", "0"], "--repeat 0"),
    ("lora", ["--batch", "0"], "--batch 0"),
    ("lora", ["--hidden", "100", "--heads", "8"], "--hidden 100"),
    ("lora", ["--heads", "8", "--kv-heads", "3"], "--kv-heads 3"),
])
def test_bad_sizes_are_refused_before_any_work(name, args, needle, capsys):
    """A size the run cannot use is an argparse error naming the flag, before the checkpoint
    and artifacts are built (they were tracebacks from the engine or torch after that)."""
    with pytest.raises(SystemExit) as e:
        script(name).main(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU-only host")
def test_cuda_options_on_a_cpu_host_are_refused(capsys):
    for name, args in (("lora", ["--backend", "cuda"]),
                       ("sampler_options", ["--device", "cuda"])):
        with pytest.raises(SystemExit) as e:
            script(name).main(args)
        assert e.value.code == 2
        assert "CUDA" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU-only host")
@pytest.mark.parametrize("name, args", [
    ("kv_offload", ["--backend", "cuda"]),
    ("speculative", ["--backend", "cuda"]),
    ("structured_throughput", ["--tiny", "--backend", "cuda"]),
])
def test_backend_cuda_on_a_cpu_host_is_refused_before_building(name, args, capsys):
    """--backend cuda without a GPU: one argparse line, not the engine's traceback after
    the checkpoint and artifacts were built."""
    with pytest.raises(SystemExit) as e:
        script(name).main(args)
    assert e.value.code == 2
    assert "--backend cuda needs a CUDA GPU" in capsys.readouterr().err


def test_serve_load_says_why_it_cannot_load_a_server():
    """serve_load.py --url of no server, or of a server that wants an API key: one line
    saying so (an httpx traceback, or a KeyError on the 401 body, before); the key is sent
    when given."""
    import asyncio
    import socket

    import httpx
    sl = script("serve_load")
    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SystemExit, match=f"cannot reach {url}"):
        sl.main(["--url", url, "--requests", "1", "--warmup", "0"])

    def server(request):
        if request.headers.get("authorization") != "Bearer k":
            return httpx.Response(401, json={"error": {"code": "invalid_api_key"}})
        return httpx.Response(200, json={"object": "list", "data": [{"id": "m"}]})

    async def model(headers):
        async with httpx.AsyncClient(transport=httpx.MockTransport(server), headers=headers,
                                     base_url="http://x") as client:
            return await sl.served_model(client, "http://x")
    with pytest.raises(SystemExit, match="wants an API key.*--api-key"):
        asyncio.run(model({}))
    assert asyncio.run(model({"Authorization": "Bearer k"})) == "m"


@pytest.mark.parametrize("buckets, needle", [("abc", "comma list of integers"),
                                             ("0,1", "1 token or more")])
def test_launch_count_bad_buckets_are_refused(buckets, needle, tmp_path, capsys):
    """launch_count.py's --buckets that are not step sizes: one argparse line (a ValueError
    or the engine's BrazeError traceback before), as is an artifact path with nothing there."""
    lc = script("launch_count")
    with pytest.raises(SystemExit) as e:
        lc.main([str(tmp_path), "--buckets", buckets])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        lc.main([str(tmp_path / "none.braze")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "none.braze does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("name, args, needle", [
    ("tp_allreduce", ["--models", "llama3-8b", "--tp", "0"], "--tp 0"),
    ("tp_allreduce", ["--models", "llama3-8b", "--batch", "0"], "--batch 0"),
    ("hybrid_cache", ["--context", "0"], "--context 0"),
    ("hybrid_cache", ["--block-size", "3"], "--block-size 3"),
    ("hybrid_cache", ["--dtype", "fp8"], "--dtype"),
    ("mla_cache", ["--dtype", "fp8"], "--dtype"),
])
def test_no_gpu_scripts_refuse_bad_arguments(name, args, needle, capsys):
    """The CPU-only analyses refuse a size or dtype they cannot use in one argparse line (a
    ZeroDivisionError, or a BrazeError traceback from tracing or the block manager, before)."""
    with pytest.raises(SystemExit) as e:
        script(name).main(args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_compile_time_refuses_a_pass_it_would_never_profile(capsys):
    """compile_time.py --profile-pass NAME for no pass of the pipeline measured its models
    for minutes and then profiled nothing, silently; refused up front now, listing the
    pipeline's passes (braze.passes.pipeline, the same list the runs use)."""
    from braze.passes import pipeline
    ct = script("compile_time")
    with pytest.raises(SystemExit) as e:
        ct.main(["--models", "llama3-8b", "--profile-pass", "fuse-nrom"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--profile-pass fuse-nrom" in err
    assert all(name in err for name in pipeline(2))


def test_readme_table_lists_every_script():
    """benchmarks/README.md's table has a row for every file of benchmarks/ (gemm_settings.py
    had none, and step_profile.py's read as a script to run: it is a module)."""
    import re
    listed = {name for line in (BENCH / "README.md").read_text().splitlines()
              if line.startswith("| `") for name in re.findall(r"`([\w.]+)`", line.split("|")[1])}
    assert {p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh")} - listed == set()


@pytest.mark.parametrize("args, needle", [
    (["--batches", "1", "--profile-batches", "4"], "--profile-batches 4: not among"),
    (["--profile-batches", "one"], "--profile-batches 'one'"),
])
def test_decode_profile_batches_must_be_measured(args, needle, capsys):
    """decode.py --profile-batches B for a batch it does not measure wrote no profile and
    said nothing (profiles are taken at measured batches only); refused up front now."""
    with pytest.raises(SystemExit) as e:
        script("decode").main(["--dry-run", *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_kernel_bench_says_when_nothing_applies():
    """kernel_bench.py with kernels none of its models has (attention on the GEMM-only 1B
    shape) printed "checked 0/0 cases" and exited 0, as if it had passed; exit 2 naming the
    selection now. A subprocess: the dry run sets TRITON_INTERPRET and a tile size."""
    import subprocess
    r = subprocess.run([sys.executable, str(BENCH / "kernel_bench.py"), "--dry-run",
                        "--models", "llama3.2-1b", "--kernels", "attention"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no case to run: --kernels attention" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name, args, needle", [
    ("structured_throughput", ["--artifact", "{tmp}/none.braze"], "none.braze does not exist"),
    ("speculative", ["--hidden", "60"], "--hidden 60"),
])
def test_artifact_and_shape_errors_are_one_line(name, args, needle, tmp_path, capsys):
    """structured_throughput.py --artifact of nothing (a BrazeError traceback) and
    speculative.py --hidden giving odd RoPE heads (transformers' ValueError after a while)."""
    with pytest.raises(SystemExit) as e:
        script(name).main([x.format(tmp=tmp_path) for x in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err
