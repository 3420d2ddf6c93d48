"""A tensor-parallel group over its life (runtime/parallel.py, runtime/parallel_start.py):
ranks that fail while it starts, engines opened and closed in one process, stopping the
ranks from `braze serve` and on Ctrl-C. Two ranks of the tiny Llama, gloo, reference."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from braze.ir.errors import BrazeError

from conftest import PROMPT

OPTS = dict(backend="reference", num_kv_blocks=16)


def _greedy(llm, n=3):
    from braze.runtime import SamplingParams
    outs = llm.generate([PROMPT[:7], PROMPT[4:9]], SamplingParams(max_tokens=n, temperature=0.0,
                                                                   ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def arts(store):
    return (store.artifact("llama", opt_level=2),
            store.artifact("llama", opt_level=2, tensor_parallel_size=2))


def _started_groups(monkeypatch):
    """Every group rank 0 starts from here on (to look at its ranks after it is gone)."""
    from braze.runtime import parallel_start
    seen, start = [], parallel_start.start_local

    def spy(*a, **k):
        seen.append(start(*a, **k))
        return seen[-1]
    monkeypatch.setattr(parallel_start, "start_local", spy)
    return seen


def test_engines_opened_one_after_another_in_one_process(arts, monkeypatch, capfd):
    """An engine that fails after its ranks started stops them cleanly (they wait for its
    settings; a stop header there made gloo abort them); a second engine on the ranks of an
    open one is refused, and the first keeps its ranks; closing a one-rank LLM leaves
    another LLM's ranks alone; a closed LLM says so."""
    from braze.runtime import LLM
    one_rank, two_ranks = arts
    one = LLM(one_rank, **OPTS)
    want = _greedy(one)
    groups = _started_groups(monkeypatch)
    with pytest.raises(BrazeError, match="max_num_seqs=100000 exceeds"):
        LLM(two_ranks, max_num_seqs=100000, **OPTS)
    assert [p.exitcode for p in groups[0].procs] == [0]
    with LLM(two_ranks, **OPTS) as llm:
        with pytest.raises(BrazeError, match=r"already runs tensor-parallel artifact .* close "
                                             r"that one first"):
            LLM(two_ranks, **OPTS)
        one.close()
        assert _greedy(llm) == want
    with pytest.raises(BrazeError, match="this engine was closed"):
        _greedy(llm)
    assert [p.exitcode for p in groups[1].procs] == [0]
    err = capfd.readouterr().err            # the ranks write to this process's stderr
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]


def test_an_engine_dropped_without_close_gives_its_ranks_to_the_next(arts):
    from braze.runtime import LLM, parallel
    llm = LLM(arts[1], **OPTS)
    want = _greedy(llm)
    (first,) = parallel.current_group().procs
    del llm
    with LLM(arts[1], **OPTS) as again:
        assert _greedy(again) == want
    assert first.exitcode == 0


def test_a_rank_that_dies_while_starting_is_named_at_once(arts, tmp_path):
    """A script without a __main__ guard: spawn imports it again in rank 1, whose LLM
    fails there. Rank 0 names the rank and why, not a rendezvous timeout (300 s here)."""
    script = tmp_path / "noguard.py"
    script.write_text(textwrap.dedent(f"""
        import braze
        llm = braze.LLM({str(arts[1])!r}, backend="reference", num_kv_blocks=16)
        print("generated", llm.generate([[1, 2, 3]])[0].token_ids)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=200, cwd=tmp_path)
    assert r.returncode != 0 and "generated" not in r.stdout
    assert "tensor-parallel rank 1" in r.stderr and "exited with code 1 while starting" in \
        r.stderr and "__main__" in r.stderr, r.stderr[-3000:]
    assert "Timed out" not in r.stderr


def test_a_rank_that_fails_loading_reports_its_error(arts, tmp_path):
    """Rank 1's weight file is damaged after rank 0 checked the artifact: rank 0's LLM
    fails naming the rank and its error, before any collective waits on it."""
    import shutil

    from braze.runtime import LLM, open_artifact
    root = tmp_path / "a.braze"
    shutil.copytree(arts[1], root)
    art = open_artifact(root)
    (f,) = art.manifest["weights"]["ranks"][1]["files"]
    (root / f).write_bytes(b"not safetensors")
    with pytest.raises(BrazeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited with code "
                                         r"1 while loading its weights: .*cannot be read"):
        LLM(art, **OPTS)


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_serve_tells_its_ranks_to_stop(arts, tmp_path):
    """SIGTERM drains and stops `braze serve`; rank 1 is told to stop, rather than finding
    rank 0 gone (a gloo traceback, exit status 1: a failure under torchrun)."""
    from serve_helpers import MODEL, Server
    s = Server(arts[1], tmp_path, "--num-kv-blocks", "16")
    try:
        assert s.http.get("/health").json()["tensor_parallel"]["size"] == 2
        ranks = [p for p in _children(s.proc.pid) if "spawn_main" in
                 open(f"/proc/{p}/cmdline").read()]
        assert len(ranks) == 1
        s.client.completions.create(model=MODEL, prompt=PROMPT[:5], max_tokens=2)
    finally:
        rc = s.stop()
    assert rc == 0
    err = s.stderr()
    assert "Traceback" not in err and "Connection closed" not in err, err[-3000:]
    assert _gone(ranks[0])


def test_ctrl_c_stops_every_rank_without_tracebacks(arts):
    """Ctrl-C (SIGINT to the terminal's process group) while `braze generate` runs: one
    "interrupted" from rank 0, which stops rank 1; no rank prints a traceback."""
    import time
    p = subprocess.Popen([sys.executable, "-m", "braze", "generate", str(arts[1]),
                          "--prompt-ids", "1,2,3", "--max-tokens", "200", "-n", "64",
                          "--ignore-eos", "--backend", "reference", "--num-kv-blocks", "900"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ranks = []
        deadline = time.monotonic() + 120
        while not ranks and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            ranks = [c for c in _children(p.pid) if "spawn_main" in
                     open(f"/proc/{c}/cmdline").read()]
        assert ranks, "rank 1 did not start"
        time.sleep(4)                   # well into its start or its steps
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "braze: interrupted" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert _gone(ranks[0])



def test_a_launcher_port_in_use_is_named(arts, monkeypatch):
    """torchrun-style variables whose MASTER_PORT another process holds: rank 0 cannot
    listen there, and says so (it was an 'internal error')."""
    import socket

    from braze.runtime import LLM
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port)).items():
            monkeypatch.setenv(k, v)
        with pytest.raises(BrazeError, match=rf"RANK=0 could not join the 2-rank "
                                             rf"tensor-parallel group at MASTER_ADDR:MASTER_PORT "
                                             rf"127.0.0.1:{port} .*address already in use"):
            LLM(arts[1], **OPTS)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k)
    with LLM(arts[1], **OPTS) as llm:      # the failed start left nothing behind
        assert len(_greedy(llm)[0]) == 3


def test_the_ranks_run_where_the_executor_puts_the_tensors(arts, monkeypatch):
    """On a (pretended) host of 2 GPUs: the reference backend, or --device cpu, runs the
    ranks on the CPU (gloo), not NCCL over CPU tensors; a GPU index, which would put every
    rank on that one GPU, is refused."""
    import torch

    from braze.runtime import open_artifact
    from braze.runtime.options import EngineOptions
    from braze.runtime.parallel import group_device_type
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    art = open_artifact(arts[1])
    assert "plan" in art.manifest
    where = {(b, d): group_device_type(art, EngineOptions(backend=b, device=d))
             for b, d in [("auto", None), ("cuda", None), ("cuda", "cuda"), ("reference", None),
                          ("reference", "cpu"), ("interpret", None), ("reference", "cuda")]}
    assert where == {("auto", None): "cuda", ("cuda", None): "cuda", ("cuda", "cuda"): "cuda",
                     ("reference", None): "cpu", ("reference", "cpu"): "cpu",
                     ("interpret", None): "cpu", ("reference", "cuda"): "cuda"}
    with pytest.raises(BrazeError, match=r"device 'cuda:1': a tensor-parallel artifact puts "
                                         r"each rank on its own GPU"):
        group_device_type(art, EngineOptions(backend="cuda", device="cuda:1"))


@pytest.mark.parametrize("bad", [float("inf"), 1e20, float("nan"), 0, -1, True])
def test_a_collective_timeout_torch_cannot_take_is_refused_by_name(bad):
    """inf ("no timeout") and 1e20 reached torch.distributed's timedelta as an
    OverflowError from the group's start."""
    from braze.runtime.options import EngineOptions
    with pytest.raises(BrazeError, match="collective_timeout_s must be a positive number"):
        EngineOptions(collective_timeout_s=bad)


@pytest.mark.parametrize("command", [["generate", "--prompt-ids", "1,2,3"], ["serve"]])
def test_torchrun_with_an_artifact_of_one_rank_is_refused(arts, command):
    """Every torchrun process runs the command: with a one-rank artifact each ran the whole
    model (generate printed its output once per process; serve's rank 1 loaded it, then
    left), where the user meant it split."""
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    r = subprocess.run([sys.executable, "-m", "braze", command[0], str(arts[0]), *command[1:],
                        "--backend", "reference"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode != 0 and not r.stdout
    assert "WORLD_SIZE=2 (torchrun) but artifact" in r.stderr and \
        "--tensor-parallel-size 2" in r.stderr, r.stderr[-2000:]


def test_a_rank_that_loses_rank_0_says_so_in_one_line(arts, tmp_path):
    """Rank 0 killed between steps: rank 1 finds its peer gone and says so, one line, no
    gloo traceback and no abort from the interpreter's teardown."""
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent(f"""
        import os, braze
        if __name__ == "__main__":
            llm = braze.LLM({str(arts[1])!r}, backend="reference", num_kv_blocks=16)
            print("generated", llm.generate([[1, 2, 3]])[0].token_ids, flush=True)
            os.kill(os.getpid(), 9)
    """))
    # the pipes close once rank 1, which shares them, has exited too
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=200, cwd=tmp_path)
    assert r.returncode == -9 and "generated" in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if "tensor-parallel rank 1" in ln]
    assert len(lines) == 1 and lines[0].startswith("braze: error: tensor-parallel rank 1 "
                                                   "stops: ") and "rank 0 exited" in lines[0]
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr, r.stderr[-2000:]


def test_after_a_step_cut_short_the_next_is_refused(arts):
    """Ctrl-C in a notebook while rank 0 runs its part of a step (rank 1 is inside it, at
    its first all-reduce): the next generate would send its header into that step (a gloo
    mismatch); it is refused, and closing ends the rank, which cannot be told."""
    from braze.runtime import LLM, parallel
    with LLM(arts[1], **OPTS) as llm:
        (proc,) = parallel.current_group().procs
        runner = llm.engine.runner.graphs.inner

        def interrupted(*a, **k):
            raise KeyboardInterrupt
        runner.run = interrupted
        with pytest.raises(KeyboardInterrupt):
            _greedy(llm)
        del runner.run
        with pytest.raises(BrazeError, match="an earlier step of this tensor-parallel group "
                                             "failed part way .*KeyboardInterrupt.* close it"):
            _greedy(llm)
    assert proc.exitcode is not None


def test_vllms_parallel_options_to_llm_are_checked_against_the_artifact(arts, monkeypatch):
    """`LLM(model, tensor_parallel_size=N)` is how vLLM scripts ask for N GPUs: taken where
    the artifact was compiled for N ranks (it was 'unknown engine option'), refused naming
    the compile flag where it was not, before any rank starts; so are expert and pipeline
    parallelism the artifact does not do."""
    from braze.runtime import LLM
    seen = _started_groups(monkeypatch)
    with LLM(arts[0], tensor_parallel_size=1, pipeline_parallel_size=1,
             enable_expert_parallel=False, **OPTS) as llm:
        want = _greedy(llm)
    with LLM(arts[0], **OPTS) as llm:
        assert want == _greedy(llm)
    for art, asks, msg in [
            (arts[0], {"tensor_parallel_size": 2}, "compiled for --tensor-parallel-size 1"),
            (arts[1], {"tensor_parallel_size": 4}, "compiled for --tensor-parallel-size 2"),
            (arts[1], {"enable_expert_parallel": True}, "--expert-parallel"),
            (arts[0], {"pipeline_parallel_size": 2}, "no pipeline parallelism"),
            (arts[0], {"tensor_parallel_size": "2"}, "positive integer")]:
        with pytest.raises(BrazeError, match=msg) as e:
            LLM(art, **asks, **OPTS)
        assert next(iter(asks)) in str(e.value)
    assert not seen                 # refused before starting ranks
