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

from braze.tiny import make_checkpoint, tiny_llama3_rope

# braze keeps its per-user signing key and trusted keys in $XDG_CONFIG_HOME/braze: the tests
# (and the braze subprocesses they start, which inherit this) get their own, not the user's
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="braze-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], True)

# Each case is a family plus config overrides; together they cover llama3 RoPE scaling,
# tied embeddings, head_dim != hidden/heads, a sliding window shorter than the prompt,
# and MoE models with dense layers mixed in.
CASES = {
    "llama": ("llama", {}),
    "llama-llama3rope-tied": ("llama", {"rope_scaling": tiny_llama3_rope(),
                                        "tie_word_embeddings": True}),
    "mistral-window8": ("mistral", {}),
    "qwen3-headdim24-tied": ("qwen3", {}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe-dense-middle": ("qwen3_moe", {}),
    "qwen3_moe-step2-nonorm": ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [],
                                             "norm_topk_prob": False}),
}


# a prompt long enough to span two 16-token KV blocks, for the model-vs-transformers tests
PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45, 200, 3, 77, 12, 190, 55, 8, 101, 42]


class _Store:
    def __init__(self, factory):
        self.factory = factory
        self.checkpoints = {}
        self.artifacts = {}

    def checkpoint(self, case: str):
        if case not in self.checkpoints:
            family, overrides = CASES[case]
            d = self.factory.mktemp(case)
            shard = "40KB" if case == "mixtral" else None   # one case loads a sharded index
            with contextlib.redirect_stderr(io.StringIO()):
                self.checkpoints[case] = make_checkpoint(family, d / "model", seed=1,
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


def executor(store, case, opt_level=0, backend="reference", num_blocks=32):
    from braze.runtime import Executor, open_artifact
    return Executor(open_artifact(store.artifact(case, opt_level=opt_level)), backend=backend,
                    num_blocks=num_blocks)


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
