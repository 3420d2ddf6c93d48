"""Shared fixtures: tiny random checkpoints and their compiled artifacts, built once per session."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import tempfile
import weakref

import pytest
import torch

from braze.tiny import make_checkpoint, tiny_llama3_rope, tiny_longrope

# braze keeps its per-user signing key and trusted keys in $XDG_CONFIG_HOME/braze: the tests
# (and the braze subprocesses they start, which inherit this) get their own, not the user's
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="braze-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], True)

# Each case is a family plus config overrides; together they cover every RoPE type the
# models support (default, llama3, linear, dynamic, yarn with its cos/sin scale of 1.139),
# tied embeddings, head_dim != hidden/heads, a sliding window shorter than the prompt,
# MoE models with dense layers mixed in, and Phi-3/Phi-4's fused qkv/gate_up tensors with
# partial rotary and longrope (its short factors, original length = the whole context; and
# its long ones, original length 1, where transformers uses them for any call of 2+ tokens),
# Gemma 3 and Gemma 4 (see braze.tiny.tiny_config for what their tiny configs keep).
CASES = {
    "llama": ("llama", {}),
    "llama-llama3rope-tied": ("llama", {"rope_scaling": tiny_llama3_rope(),
                                        "tie_word_embeddings": True}),
    "llama-linearrope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0,
                                                    "rope_theta": 10000.0}}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-dynamicrope": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0,
                                                     "rope_theta": 10000.0}}),
    "qwen3-yarnrope": ("qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 64,
                                                  "rope_theta": 10000.0}}),
    "mistral-window8": ("mistral", {}),
    "qwen3-headdim24-tied": ("qwen3", {}),
    "qwen2-qkv-bias-tied": ("qwen2", {}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe-dense-middle": ("qwen3_moe", {}),
    "qwen3_moe-step2-nonorm": ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [],
                                             "norm_topk_prob": False}),
    "phi3-longrope-partial-tied": ("phi3", {}),
    "phi3-longfactors": ("phi3", {"original_max_position_embeddings": 1,
                                  "rope_scaling": {**tiny_longrope(12, original=1),
                                                   "attention_factor": 1.25}}),
    "gemma3-sandwich-softcap": ("gemma3", {}),
    "gemma4-ple-kvshare-moe": ("gemma4", {}),
}


# a prompt long enough to span two 16-token KV blocks, for the model-vs-transformers tests
PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45, 200, 3, 77, 12, 190, 55, 8, 101, 42]


class _Store:
    """Checkpoints of `cases` (name -> (family, overrides)), made by `make` (a function like
    braze.tiny.make_checkpoint), and their artifacts, each built once."""

    def __init__(self, factory, cases=None, make=make_checkpoint):
        self.factory = factory
        self.cases, self.make = CASES if cases is None else cases, make
        self.checkpoints = {}
        self.artifacts = {}

    def checkpoint(self, case: str):
        if case not in self.checkpoints:
            family, overrides = self.cases[case]
            d = self.factory.mktemp(case)
            shard = "40KB" if case == "mixtral" else None   # one case loads a sharded index
            with contextlib.redirect_stderr(io.StringIO()):
                self.checkpoints[case] = self.make(family, d / "model", seed=1,
                                                   max_shard_size=shard, **overrides)
        return self.checkpoints[case]

    def artifact(self, case: str, **options):
        options.setdefault("opt_level", 0)
        options.setdefault("targets", "")      # cubins are tested where they matter
        key = (case, tuple(sorted(options.items())))
        if key not in self.artifacts:
            import braze
            out = self.factory.mktemp(case + "-art") / "a.braze"
            braze.compile(self.checkpoint(case), out, **options)
            self.artifacts[key] = out
        return self.artifacts[key]


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    torch.manual_seed(0)
    return _Store(tmp_path_factory)


def hf_model(path):
    from transformers import AutoModelForCausalLM
    with contextlib.redirect_stderr(io.StringIO()):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None   # compare fixed-length greedy runs
    m.generation_config.pad_token_id = 0
    return m


_TAKEN = weakref.WeakKeyDictionary()      # executor -> KV blocks handed out by take_blocks


def take_blocks(ex, n: int) -> list[int]:
    """`n` KV blocks of `ex` that no earlier call handed out, for hand-built steps
    (the engine's block manager does this in serving)."""
    start = _TAKEN.get(ex, 0)
    if start + n > ex.cache.num_blocks:
        raise AssertionError(f"the test asks for more than the {ex.cache.num_blocks} KV blocks")
    _TAKEN[ex] = start + n
    return list(range(start, start + n))


def step_inputs(ex, chunks) -> dict:
    """A hand-built step's inputs for executor `ex` (the contract's reference builder)."""
    from braze.ir.contract import build_step
    return build_step(chunks, ex.block_size, ex.max_blocks, device=ex.device)


def run_step(ex, chunks) -> torch.Tensor:
    """Run one hand-built step on `ex`: the logits of each sequence's last new token."""
    inputs = step_inputs(ex, chunks)
    logits = ex.run(inputs)
    return logits if ex.logits_pruned else logits.index_select(0, inputs["logits_indices"])


def executor(store, case, opt_level=0, backend="reference", num_blocks=32):
    from braze.runtime import Executor, open_artifact
    return Executor(open_artifact(store.artifact(case, opt_level=opt_level)), backend=backend,
                    num_blocks=num_blocks)


def assert_steps_match_transformers(store, case, ex, atol=1e-4, rtol=1e-4):
    """Three steps on `ex` (a fresh prefill; a chunked prefill over a cached prefix mixed
    with a decode) give transformers' logits for the same positions of PROMPT."""
    assert_steps_match(ex, hf_model(store.checkpoint(case)), atol, rtol)


def assert_steps_match(ex, model, atol=1e-4, rtol=1e-4):
    """assert_steps_match_transformers with the transformers `model` given (loaded some
    other way than from a case's checkpoint)."""
    from braze.ir.contract import SeqChunk
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    a, b = take_blocks(ex, 2), take_blocks(ex, 2)
    got = run_step(ex, [SeqChunk(PROMPT[:9], 0, a)])
    torch.testing.assert_close(got[0], expected[8], atol=atol, rtol=rtol)
    run_step(ex, [SeqChunk(PROMPT[:4], 0, b)])
    # one step: sequence a continues with 11 tokens after 9 cached; b decodes its 5th token
    got = run_step(ex, [SeqChunk(PROMPT[9:], 9, a), SeqChunk(PROMPT[4:5], 4, b)])
    torch.testing.assert_close(got[0], expected[-1], atol=atol, rtol=rtol)
    torch.testing.assert_close(got[1], expected[4], atol=atol, rtol=rtol)


def assert_greedy_matches_transformers(store, case, ex, prompt, max_tokens):
    """Our engine's greedy continuation of `prompt` (on `ex`'s artifact and backend) equals
    transformers' `generate` on the same weights."""
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    eng = Engine(ex.artifact, backend=ex.backend, num_kv_blocks=16, max_num_seqs=4,
                 buckets=[1, 2, 4, 8, 16] if ex.backend == "interpret" else None)
    eng.add_request("r", list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    ours = eng.run_to_completion()["r"].token_ids
    with torch.no_grad():
        theirs = hf_model(store.checkpoint(case)).generate(
            torch.tensor([list(prompt)]), max_new_tokens=max_tokens, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()


@contextlib.contextmanager
def count_triton_jit():
    """Collects the name of every kernel Triton's JIT compiles (or loads from its disk
    cache) inside the block, through Triton's own pre-compile hook."""
    import triton
    knobs = triton.knobs.runtime
    seen: list[str] = []
    old = knobs.jit_cache_hook

    def hook(*args, **kwargs):
        seen.append(str(kwargs.get("repr") or getattr(kwargs.get("fn"), "name", args[:1])))
        return False          # compile as usual

    knobs.jit_cache_hook = hook
    try:
        yield seen
    finally:
        knobs.jit_cache_hook = old


# -- the engine ------------------------------------------------------------------------

def prompts_of(lengths, seed=0):
    """Random prompts of the given lengths, each starting with BOS (1)."""
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 200, (n - 1,), generator=g).tolist() for n in lengths]


def run_all(engine, prompts, params):
    """Queue `prompts` (with one SamplingParams, or one each) on `engine` at once and run
    them to completion; their final outputs, in order."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    base = len(engine.requests) + engine.stats()["requests_finished"]
    ids = [f"q{base + i}" for i in range(len(prompts))]
    for rid, p, sp in zip(ids, prompts, plist):
        engine.add_request(rid, p, sp)
    final = engine.run_to_completion(ids)
    return [final[r] for r in ids]


def run_with_aborts(engine, prompts, params, aborts, plain):
    """Run `prompts` (one SamplingParams each) on `engine`, aborting request i after step
    `aborts[i]`; check every output against `plain` (the same requests run without
    aborts): an aborted one is a prefix of it, the others equal it. The final outputs."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    final, step = {}, 0
    while engine.has_unfinished():
        step += 1
        for i, after in aborts.items():
            if after == step:
                engine.abort_request(f"r{i}")
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    outs = [final[f"r{i}"] for i in range(len(prompts))]
    for got, want in zip(outs, plain):
        if got.finish_reason == "abort":
            assert got.token_ids == want.token_ids[:len(got.token_ids)]
        else:
            assert got.token_ids == want.token_ids
    return outs


def last_token_stops(tokenizer, token_ids):
    """Stops that first complete at the last of `token_ids[:k]`, for the largest k that
    has them: (k, a stop token id, a stop string). For tests of a stop on the last allowed
    token (max_tokens = k); `token_ids` is a run without stops."""
    for k in range(len(token_ids), 1, -1):
        tok = token_ids[k - 1]
        text, before = tokenizer.decode(token_ids[:k]), tokenizer.decode(token_ids[:k - 1])
        if tok in token_ids[:k - 1] or len(text) <= len(before) or not text.startswith(before):
            continue
        stop = text[-2:]
        if stop.strip() and text.find(stop) == len(text) - len(stop):
            return k, tok, stop
    raise AssertionError(f"no token of {token_ids} both stops first and adds text")


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with bucket `braze-kv`,
    and the AWS environment variables that point boto3 at it."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server._server.server_port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": url}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="braze-kv")
    yield server
    try:
        server.stop()
    except Exception:       # a test stopped it already
        pass
