"""Tensor parallelism on CPUs: gloo process groups, tiny float32 models.

The reference is the same checkpoint compiled for one rank: an N-rank artifact must give
the same logits (1e-4) from its ranks' weight shards and collectives, and the same greedy
tokens through the engine, whose rank 0 starts the other ranks itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal

import pytest
import torch

from braze.ir.errors import BrazeError

from conftest import PROMPT

# (conftest case, ranks): Llama with 2 KV heads (split at 2, replicated at 4), Qwen3 (QK
# norms, head_dim 24, tied embeddings), Qwen3-MoE (experts' intermediate split, a dense
# layer in the middle)
LOGIT_CASES = [("llama", 2), ("llama", 4), ("qwen3-headdim24-tied", 2),
               ("qwen3_moe-dense-middle", 2), ("qwen3_moe-dense-middle", 4),
               # the other families: Mixtral's experts, Phi-3's fused checkpoint tensors
               # (split into q/k/v and gate/up sources by the frontend), Gemma 3's soft-caps
               ("mixtral", 2), ("phi3-longrope-partial-tied", 2), ("gemma3-sandwich-softcap", 2),
               # Gemma 4: PLE, shared KV, MoE beside the MLP, one replicated KV head of
               # a global layer normed per head (q/k norms)
               ("gemma4-ple-kvshare-moe", 2),
               # biases on every projection: o_proj's and down_proj's (row-parallel) are
               # added once, after their all-reduce
               ("llama-biases", 2)]


def _steps():
    """A fresh prefill of two sequences, then a chunked prefill mixed with a decode."""
    from braze.ir.contract import SeqChunk
    a, b = PROMPT[:12], PROMPT[3:9]
    return [[SeqChunk(a[:8], 0, [0]), SeqChunk(b, 0, [2])],
            [SeqChunk(a[8:], 8, [0]), SeqChunk([PROMPT[15]], 6, [2])]]


def _logits(ex) -> list[torch.Tensor]:
    from conftest import run_step
    return [run_step(ex, chunks) for chunks in _steps()]


def _rank_main(rank, n, port, root, queue, config_home, backend="reference"):
    import datetime
    os.environ["XDG_CONFIG_HOME"] = config_home     # importing conftest here replaced it

    import torch.distributed as dist

    from braze.runtime import Executor, open_artifact
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=n, timeout=datetime.timedelta(seconds=120))
    try:
        ex = Executor(open_artifact(root), backend=backend, num_blocks=8)
        out = _logits(ex)
        if rank == 0:
            queue.put([t.numpy().copy() for t in out])
        dist.barrier()              # no rank leaves the group while another still uses it
    finally:
        dist.destroy_process_group()


def _run_ranks(root, n, backend="reference") -> list[torch.Tensor]:
    import torch.multiprocessing as mp

    from braze.runtime.parallel import _free_port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, n, port, str(root), q,
                                                  os.environ["XDG_CONFIG_HOME"], backend))
             for r in range(n)]
    for p in procs:
        p.start()
    try:
        out = q.get(timeout=300)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()
    assert all(p.exitcode == 0 for p in procs), f"rank exit codes {[p.exitcode for p in procs]}"
    return [torch.from_numpy(x) for x in out]


@pytest.mark.parametrize("case,n", LOGIT_CASES)
def test_logits_equal_one_rank(store, case, n):
    from braze.runtime import Executor, open_artifact
    one = Executor(open_artifact(store.artifact(case, opt_level=2)), backend="reference",
                   num_blocks=8)
    want = _logits(one)
    art = store.artifact(case, opt_level=2, tensor_parallel_size=n)
    got = _run_ranks(art, n)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.parametrize("case", ["llama", "qwen3_moe-dense-middle"])
def test_skinny_gemms_on_shards_equal_one_rank(store, case):
    """--small-m-gemm triton at 2 ranks (interpret backend: the launch plans a GPU runs, at
    steps of 14 and 5 tokens): each rank's skinny GEMMs over its shards, column-parallel
    q/k/v and gate/up (the gated epilogue on the rank's [gate, up] halves), row-parallel
    o/down before their all-reduce and the vocabulary-parallel LM head, give one rank's
    logits."""
    import json
    from braze.runtime import Executor, open_artifact
    one = Executor(open_artifact(store.artifact(case, opt_level=2)), backend="reference",
                   num_blocks=8)
    want = _logits(one)
    art = store.artifact(case, opt_level=2, tensor_parallel_size=2, small_m_gemm="triton")
    linears = json.loads((art / "manifest.json").read_text())["plan"]["small_m_gemm"]["linears"]
    assert any(ln.get("epilogue") for ln in linears) and all("when" in ln for ln in linears)
    for w, g in zip(want, _run_ranks(art, 2, backend="interpret")):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def _greedy(llm, max_tokens=6):
    from braze.runtime import SamplingParams
    prompts = [PROMPT[:7], PROMPT[5:19], PROMPT[2:4]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                ignore_eos=True))
    return [o.token_ids for o in outs]


# the interpret backend replays the launch plans (Triton kernels, the collectives as extern
# calls on static buffers) as the cuda backend does; it is slow, so it gets fewer tokens
@pytest.mark.parametrize("case,n,backend,tokens", [("llama", 2, "reference", 6),
                                                   ("qwen3_moe-dense-middle", 2, "reference", 6),
                                                   ("llama", 2, "interpret", 2),
                                                   # local and global layers: two KV cache
                                                   # groups' step inputs reach rank 1
                                                   ("gemma3-sandwich-softcap", 2, "reference", 6),
                                                   # shared-KV layers own no cache on any rank
                                                   ("gemma4-ple-kvshare-moe", 2, "reference", 6)])
def test_engine_greedy_tokens_equal_one_rank(store, case, n, backend, tokens):
    """The engine's rank 0 starts the other rank, batches three prompts (one split over
    steps by the token budget), and samples what one rank would."""
    from braze.runtime import LLM
    opts = dict(backend=backend, max_num_tokens=16, num_kv_blocks=16, buckets=[4, 8, 16])
    want = _greedy(LLM(store.artifact(case, opt_level=2), **opts), tokens)
    with LLM(store.artifact(case, opt_level=2, tensor_parallel_size=n), **opts) as llm:
        assert _greedy(llm, tokens) == want


def test_a_killed_rank_ends_the_run_with_an_error(store):
    from braze.runtime import LLM, parallel
    with LLM(store.artifact("llama", opt_level=2, tensor_parallel_size=2), backend="reference",
             collective_timeout_s=30) as llm:
        _greedy(llm, 2)
        (proc,) = parallel._GROUP.procs
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        info, dead = parallel.health()          # what braze serve's /health answers 503 with
        assert info == {"size": 2, "collective_timeout_s": 30} and "rank 1" in dead
        with pytest.raises(BrazeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited"):
            _greedy(llm, 2)


@pytest.mark.parametrize("opt", [0, 2])
def test_a_rank_killed_inside_a_step_is_named(store, opt):
    """Rank 1 killed while rank 0 is inside a step (its all_reduce meets a closed
    connection): the error names the rank that exited, as between steps, not gloo's
    "Connection reset by peer" wrapped in the interpreter's node error."""
    from braze.runtime import LLM, parallel
    with LLM(store.artifact("llama", opt_level=opt, tensor_parallel_size=2),
             backend="reference", collective_timeout_s=30) as llm:
        _greedy(llm, 2)
        (proc,) = parallel._GROUP.procs
        graphs = llm.engine.runner.graphs
        inner = graphs.inner.run

        def run(*args, **kw):       # the step's header and inputs are out: rank 1 is in it
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)
            return inner(*args, **kw)
        graphs.inner.run = run
        with pytest.raises(BrazeError, match=r"tensor-parallel rank 1 \(pid \d+\) exited "
                                             r"with code -9"):
            _greedy(llm, 2)


def test_a_hung_rank_ends_the_run_at_the_collective_timeout(store):
    from braze.runtime import LLM, parallel
    with LLM(store.artifact("llama", opt_level=2, tensor_parallel_size=2), backend="reference",
             collective_timeout_s=3) as llm:
        (proc,) = parallel._GROUP.procs
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BrazeError, match="collective failed.*timeout"):
                _greedy(llm, 2)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)


def test_a_tensor_parallel_artifact_refuses_a_group_of_another_size(store, monkeypatch):
    from braze.runtime import LLM
    for k, v in dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BrazeError, match="WORLD_SIZE=3 but .* --tensor-parallel-size 2"):
        LLM(store.artifact("llama", opt_level=2, tensor_parallel_size=2), backend="reference")


# a vocabulary two ranks do not divide (a fine-tune's added pad token): Llama, and Qwen3,
# whose LM head is its embedding table (tied)
ODD_VOCAB = {"llama-vocab301": ("llama", {"vocab_size": 301}),
             "qwen3-tied-vocab301": ("qwen3", {"vocab_size": 301})}


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    from conftest import _Store
    return _Store(tmp_path_factory, cases=ODD_VOCAB)


@pytest.mark.parametrize("case", list(ODD_VOCAB))
def test_a_vocab_the_ranks_do_not_divide_is_padded_per_rank(odd, case):
    """Each rank holds 160 rows of the 301 (a multiple of 16: passes/shard.py says why),
    rank 1's last 19 zero; the gathered logits are cut back to the 301 in the graph."""
    from braze.inspect import format_summary, summarize
    from braze.ir.types import R
    from braze.runtime import open_artifact
    from safetensors import safe_open
    art = open_artifact(odd.artifact(case, opt_level=2, tensor_parallel_size=2))
    logits = art.graph.outputs["logits"]
    assert logits.type.shape == (R, 301)
    gather = logits.producer
    assert gather.op == "all_gather" and gather.attrs["size"] == 301
    assert gather.operands[0].type.shape == (R, 160)
    full = open_artifact(odd.artifact(case, opt_level=2)).load_weights()
    tables = ["model.embed_tokens.weight"] + ([] if "tied" in case else ["lm_head.weight"])
    assert ("lm_head.weight" in full) == ("tied" not in case)
    shards = art.manifest["parallel"]["shards"]
    for name in tables:
        assert shards[name] == {"dim": 0, "ranges": [[0, 160], [160, 320]], "size": 301}
        parts = []
        for r in range(2):
            (f,) = art.manifest["weights"]["ranks"][r]["files"]
            with safe_open(str(art.root / f), "pt") as sf:
                parts.append(sf.get_tensor(name))
        assert [p.shape[0] for p in parts] == [160, 160]
        assert torch.equal(torch.cat(parts)[:301], full[name])
        assert not parts[1][141:].any()                     # the padding rows
    assert "dim 0: r0[0:160], r1[160:320] (zero rows past 301)" in format_summary(
        summarize(art.root))


@pytest.mark.parametrize("case", list(ODD_VOCAB))
def test_a_padded_vocab_gives_the_logits_of_one_rank_and_transformers(odd, case):
    from braze.runtime import Executor, open_artifact

    from conftest import assert_steps_match_transformers
    one = open_artifact(odd.artifact(case, opt_level=2))
    assert_steps_match_transformers(odd, case, Executor(one, backend="reference", num_blocks=8))
    want = _logits(Executor(one, backend="reference", num_blocks=8))
    got = _run_ranks(odd.artifact(case, opt_level=2, tensor_parallel_size=2), 2)
    for w, g in zip(want, got):
        assert g.shape[-1] == w.shape[-1] == 301
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_a_padded_vocab_samples_and_reports_logprobs_as_one_rank(odd):
    """Greedy tokens, logprobs and prompt logprobs over the 301 real entries (padding rows
    in the softmax would lower every logprob), a logit_bias forcing the last real id; at
    two ranks the request without logprobs (speculation skips those) verifies ngram drafts
    (k + 1 rows a sequence), at one it decodes plainly."""
    from braze.runtime import LLM, SamplingParams

    from test_speculative import NGRAM, repetitive
    prompts = [PROMPT[:7], repetitive(1, 5, 5), PROMPT[5:19]]
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = [SamplingParams(max_tokens=5, logprobs=3, prompt_logprobs=2, **greedy),
              SamplingParams(max_tokens=10, **greedy),
              SamplingParams(max_tokens=3, logprobs=1, logit_bias={300: 100.0}, **greedy)]
    limits = dict(opt_level=2, max_num_seqs=4, max_num_tokens=64, max_logits_rows=16)
    opts = dict(backend="reference", max_num_tokens=16, num_kv_blocks=32, buckets=[4, 8, 16])

    def run(llm):
        outs = llm.generate(prompts, params)
        return [(o.token_ids,
                 [(t.token_id, t.logprob, t.rank, t.top) for t in o.logprobs or []],
                 [None if t is None else (t.token_id, t.logprob, t.top)
                  for t in (o.prompt_logprobs or [])]) for o in outs]
    want = run(LLM(odd.artifact("llama-vocab301", **limits), **opts))
    with LLM(odd.artifact("llama-vocab301", tensor_parallel_size=2, **limits),
             speculative=NGRAM, **opts) as llm:
        got = run(llm)
        assert llm.stats()["spec_decode_num_draft_tokens"] > 0
    assert want[2][0] == [300] * 3
    assert len(want[0][2]) == len(PROMPT[:7])
    for (wt, wl, wp), (gt, gl, gp) in zip(want, got):
        assert gt == wt
        assert len(gl) == len(wl) and len(gp) == len(wp)
        for a, b in zip(wl + [p for p in wp if p], gl + [p for p in gp if p]):
            assert a[0] == b[0] and [i for i, _ in a[-1]] == [i for i, _ in b[-1]]
            torch.testing.assert_close(torch.tensor([a[1]] + [v for _, v in a[-1]]),
                                       torch.tensor([b[1]] + [v for _, v in b[-1]]),
                                       atol=1e-4, rtol=1e-4)


def test_uneven_split_is_refused_naming_the_dimension(tmp_path):
    import braze
    from braze.tiny import make_checkpoint
    with contextlib.redirect_stderr(io.StringIO()):
        ckpt = make_checkpoint("llama", tmp_path / "m", seed=1, num_hidden_layers=1,
                               intermediate_size=130)
    with pytest.raises(BrazeError, match=r"intermediate_size \(130.*--tensor-parallel-size 4"):
        braze.compile(ckpt, tmp_path / "a", targets="", tensor_parallel_size=4)
    with pytest.raises(BrazeError, match=r"num_key_value_heads \(2\) is fewer than "
                                         r"--tensor-parallel-size 3"):
        braze.compile(ckpt, tmp_path / "a", targets="", tensor_parallel_size=3)
    assert not (tmp_path / "a").exists()


def test_artifact_holds_per_rank_shards_and_inspect_shows_them(store):
    from braze.inspect import format_summary, summarize
    from braze.runtime import open_artifact
    from safetensors import safe_open
    art = open_artifact(store.artifact("llama", opt_level=2, tensor_parallel_size=2))
    w = art.manifest["weights"]
    assert [len(r["files"]) for r in w["ranks"]] == [1, 1]
    one = open_artifact(store.artifact("llama", opt_level=2))
    full = one.load_weights()
    for r in range(2):
        (f,) = w["ranks"][r]["files"]
        with safe_open(str(art.root / f), "pt") as sf:
            o = sf.get_tensor("model.layers.0.self_attn.o_proj.weight")
            up = sf.get_tensor("lm_head.weight")
        whole = full["model.layers.0.self_attn.o_proj.weight"]
        assert torch.equal(o, whole[:, r * 32:(r + 1) * 32])           # row-parallel
        assert torch.equal(up, full["lm_head.weight"][r * 128:(r + 1) * 128])   # vocab
    text = format_summary(summarize(art.root))
    assert "tensor-parallel over 2 ranks" in text
    assert "shard @model.layers.0.self_attn.o_proj.weight dim 1: r0[0:32], r1[32:64]" in text
    ops = art.graph.op_counts()
    collectives = [ln for ln in text.splitlines() if ln.startswith("  collective ")]
    assert len(collectives) == ops["all_reduce"] + ops["all_gather"] > 0


def test_torchrun_starts_the_same_artifact(store):
    """Under torchrun every process runs `braze generate`: rank 0 prints, rank 1 follows."""
    import json
    import subprocess
    import sys

    from braze.runtime import LLM
    from braze.runtime.parallel import _free_port
    want = _greedy(LLM(store.artifact("llama", opt_level=2), backend="reference"), 4)[0]
    art = store.artifact("llama", opt_level=2, tensor_parallel_size=2)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), "-m", "braze", "generate", str(art),
                        "--prompt-ids", ",".join(map(str, PROMPT[:7])), "--max-tokens", "4",
                        "--json", "--backend", "reference"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]   # rank 0 only
    assert json.loads(line)["token_ids"] == want


@pytest.mark.parametrize("lag", [False, True])
def test_engine_preemption_and_prefix_cache_at_two_ranks(store, lag):
    """Too few KV blocks (preemption, recompute) and a shared prompt prefix (prefix-cache
    hits) at two ranks, with and without async scheduling: the tokens of one roomy rank."""
    import random

    from braze.runtime import LLM, SamplingParams
    rng = random.Random(5)
    shared = [rng.randrange(3, 256) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 256) for _ in range(k)] for k in (4, 9, 1, 20)]
    prompts += [[rng.randrange(3, 256) for _ in range(k)] for k in (25, 30)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    one = LLM(store.artifact("llama", opt_level=2), backend="reference", num_kv_blocks=64)
    want = [o.token_ids for o in one.generate(prompts, params)]
    with LLM(store.artifact("llama", opt_level=2, tensor_parallel_size=2), backend="reference",
             num_kv_blocks=8, async_scheduling=lag) as llm:
        first = llm.generate(prompts[:1], params)
        got = llm.generate(prompts, params)
        s = llm.stats()
    assert first[0].token_ids == want[0]
    assert [o.token_ids for o in got] == want
    assert s["preemptions"] > 0 and s["prefix_cache_hit_tokens"] >= 32
