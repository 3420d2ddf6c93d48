"""The draft proposer's k greedy steps as one device loop (runtime/decode_loop.py): its
guesses are the draft artifact's plain greedy continuation (computed by a plain engine on
the reference backend), cut by each row's budget and by an id outside the target's
vocabulary; they come back in one host read per proposal, not one per step, while the
host builds one batch for the k steps; a full draft cache gives fewer guesses, never
wrong ones; and a speculating engine's greedy output stays the plain engine's, through
preemption. The launch plans run under Triton's interpreter (-O2); the CUDA test is
marked gpu."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from braze.runtime.draft_proposer import DraftProposer
from braze.runtime.engine import Engine
from braze.runtime.loader import open_artifact
from braze.runtime.model_runner import StepResult
from braze.runtime.options import EngineOptions
from braze.runtime.request import Request
from braze.runtime.sampler import SamplingParams

from conftest import prompts_of, run_all

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


def draft_artifact(store, case: str = "llama"):
    """-O2, with logits rows to spare for serving as a speculating target too; a short
    max_model_len keeps the split-KV attention's grid small under the interpreter."""
    return store.artifact(case, opt_level=2, max_num_seqs=8, max_num_tokens=32,
                          max_logits_rows=32, max_model_len=64)


def proposer(art, backend: str, **options) -> DraftProposer:
    """A draft proposer for a target that is the draft artifact itself (same tokenizer)."""
    a = open_artifact(art)
    engine = SimpleNamespace(options=EngineOptions(backend=backend, **options), artifact=a,
                             runner=SimpleNamespace(max_num_seqs=8),
                             vocab_size=a.model["vocab_size"])
    return DraftProposer(SimpleNamespace(model=str(art)), engine)


def greedy(art, contexts: list[list[int]], n: int) -> list[list[int]]:
    """The draft's own greedy continuation of each context, by a plain engine."""
    eng = Engine(art, backend="reference", num_kv_blocks=64)
    return [o.token_ids for o in run_all(eng, contexts, SamplingParams(max_tokens=n,
                                                                       ignore_eos=True))]


def cut(tokens: list[int], vocab: int) -> list[int]:
    for i, t in enumerate(tokens):
        if t >= vocab:
            return tokens[:i]
    return tokens


class Counts:
    """Host reads of step results, batches built on the host, and forward replays, while
    a proposal runs."""

    def __init__(self, monkeypatch, runner):
        self.tokens = self.forwards = self.replays = 0
        tokens, forward, replay = StepResult.tokens, runner.forward, runner.replay_decode

        def count_tokens(res):
            self.tokens += 1
            return tokens(res)

        def count_forward(*a, **k):
            self.forwards += 1
            return forward(*a, **k)

        def count_replay(*a, **k):
            self.replays += 1
            return replay(*a, **k)
        monkeypatch.setattr(StepResult, "tokens", count_tokens)
        monkeypatch.setattr(runner, "forward", count_forward)
        monkeypatch.setattr(runner, "replay_decode", count_replay)


@pytest.mark.parametrize("backend,case", [("interpret", "llama"), ("reference", "llama"),
                                          ("reference", "gemma3-sandwich-softcap")])
def test_device_loop_gives_the_drafts_greedy_tokens(store, monkeypatch, backend, case):
    """Two proposals. Budgets differ per row (a row with budget 1 takes no decode step);
    one context crosses a KV block during the steps; the second proposal follows rejected
    and accepted guesses, so the shadows keep part of their KV. Gemma 3's sliding-window
    layers form more KV cache groups (cut to the full layers' count, sharing one pool),
    whose slot mappings the loop advances too."""
    art = draft_artifact(store, case)
    p = proposer(art, backend)
    assert p.runner.executor.backend == backend
    if case != "llama":
        assert p.runner.batch.num_groups >= 2
    contexts = prompts_of([3, 6, 4, 14], seed=11)
    budgets = [3, 1, 2, 4]
    want = greedy(art, contexts, 4)
    reqs = [Request(f"d{i}", c, GREEDY) for i, c in enumerate(contexts)]
    counts = Counts(monkeypatch, p.runner)
    got = p.propose(reqs, budgets)
    assert got == [w[:b] for w, b in zip(want, budgets)]
    # one catch-up step and one prepared decode step, replayed for 2 more (budget 4: 3
    # steps after the catch-up's guess); one host read, at the end, and no step's tokens
    assert (counts.forwards, counts.replays, counts.tokens, p.num_host_reads) == (2, 2, 0, 1)

    # the target accepts some guesses and then picks its own token (or takes all + bonus)
    accept = [3, 1, 0, 4]
    for r, w, a in zip(reqs, want, accept):
        r.all_token_ids += w[:a] + [(w[a] + 1) % 200 if a < len(w) else 7]
    want2 = greedy(art, [r.all_token_ids for r in reqs], 3)
    counts.tokens = 0
    got = p.propose(reqs, [3, 3, 3, 2])
    assert got == [w[:b] for w, b in zip(want2, [3, 3, 3, 2])]
    assert counts.tokens == 0 and p.num_host_reads == 2
    for r in reqs:
        p.forget(r)
    assert p.bm.num_free_blocks == p.bm.num_blocks and not p.shadows


def test_guesses_outside_the_targets_vocabulary_end_the_row(store):
    """A guess the target's vocabulary lacks (an id only the draft's padded vocabulary has)
    cuts its row there; the steps that ran past it leave the shadow's next proposal right."""
    art = draft_artifact(store)
    p = proposer(art, "reference")
    contexts = prompts_of([5, 8, 11], seed=4)
    want = greedy(art, contexts, 4)
    firsts = sorted(w[0] for w in want)
    p.vocab = firsts[1] + 1 if firsts[1] < max(t for w in want for t in w) else firsts[1]
    expect = [cut(w, p.vocab) for w in want]
    assert any(len(e) < 4 for e in expect) and any(e for e in expect)   # both kinds
    reqs = [Request(f"v{i}", c, GREEDY) for i, c in enumerate(contexts)]
    assert p.propose(reqs, [4, 4, 4]) == expect
    for r, e in zip(reqs, expect):         # all kept guesses accepted, then a token of its own
        r.all_token_ids += e + [9]
    want2 = greedy(art, [r.all_token_ids for r in reqs], 3)
    assert p.propose(reqs, [3, 3, 3]) == [cut(w, p.vocab) for w in want2]


def test_a_full_draft_cache_gives_fewer_guesses(store):
    """Slots for every guess are reserved before the loop: where the draft's cache runs
    out, a row gets the guesses whose slots it holds (none where its catch-up does not
    fit) while the others run all their steps, and the blocks all come back."""
    art = draft_artifact(store)
    p = proposer(art, "reference")
    bm = p.bm
    bm.allocate("hog", [0] * ((bm.num_free_blocks - 4) * bm.block_size), use_cache=False)
    contexts = prompts_of([15, 15, 40], seed=6)
    want = greedy(art, contexts, 4)
    reqs = [Request(f"c{i}", c, GREEDY) for i, c in enumerate(contexts)]
    # each shadow starts with a block, one is left: a's guesses reach position 16 in it,
    # b's stay in its first block (2 guesses), c's 40 tokens never catch up
    got = p.propose(reqs, [4, 4, 4])
    assert got == [want[0][:4], want[1][:2], []]
    assert bm.num_free_blocks == 0
    bm.free("hog")
    got = p.propose(reqs, [4, 4, 4])             # room again: every guess
    assert got == [w[:4] for w in want]
    for r in reqs:
        p.forget(r)
    assert bm.num_free_blocks == bm.num_blocks


def test_speculating_engine_with_an_interpreted_draft_accepts_every_guess(store):
    """The target (on the reference backend) is the draft artifact itself, whose device
    loop runs under the interpreter: every guess is the target's own greedy choice, so
    all are accepted, and the output is the plain engine's."""
    art = draft_artifact(store)
    prompts = prompts_of([5, 9], seed=3)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    plain = run_all(Engine(art, backend="reference", num_kv_blocks=32), prompts, params)
    spec = {"method": "draft", "model": str(art), "num_speculative_tokens": 3}
    eng = Engine(art, backend="reference", num_kv_blocks=32, speculative=spec)
    eng.spec.proposer = draft = proposer(art, "interpret")
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_decode_num_draft_tokens"] > 0
    assert s["spec_decode_num_accepted_tokens"] == s["spec_decode_num_draft_tokens"]
    assert draft.num_host_reads == s["steps"] - 1      # one a proposal: after each prefill
    assert not draft.shadows and draft.bm.num_free_blocks == draft.bm.num_blocks
    # the engine's CUDA-graph count includes the draft runner's (none captured on a CPU:
    # give it some, as a GPU would)
    draft.runner.graphs.stats["cuda_graphs_captured"] = 3
    assert eng.stats()["cuda_graphs_captured"] == (eng.runner.graphs.stats["cuda_graphs_captured"]
                                                   + 3)


def test_preempted_targets_keep_their_shadows_right(store):
    """A target with 7 KV blocks preempts requests while their shadows keep the draft's
    KV: the output is still the plain engine's and no block of either cache leaks. (A
    shadow asked again for the same tokens is test_a_full_draft_cache_gives_fewer_guesses's
    second proposal.)"""
    target = store.artifact("qwen3-headdim24-tied", opt_level=2, max_num_seqs=8,
                            max_logits_rows=32, max_num_tokens=32, max_model_len=64)
    prompts = prompts_of([9, 17, 6, 30, 12], seed=3)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = run_all(Engine(target, backend="reference", num_kv_blocks=64), prompts, params)
    spec = {"method": "draft", "model": str(draft_artifact(store)), "num_speculative_tokens": 3}
    eng = Engine(target, backend="reference", num_kv_blocks=7, speculative=spec)
    draft = eng.spec.proposer
    calls = []
    propose = draft.propose
    draft.propose = lambda reqs, budgets: (calls.append(1), propose(reqs, budgets))[1]
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_decode_num_draft_tokens"] > 0 and s["preemptions"] > 0
    assert 0 < draft.num_host_reads <= len(calls)     # at most one read per proposal
    assert s["kv_blocks_free"] == s["kv_blocks_total"] and not draft.shadows
    assert draft.bm.num_free_blocks == draft.bm.num_blocks


@pytest.mark.gpu
def test_cuda_device_loop_gives_the_drafts_greedy_tokens(store, monkeypatch):
    """On a GPU: the draft's decode steps replay its captured CUDA graph (full mode) with
    no device->host sync among them (torch's sync debug mode set to raise), and give the
    tokens the same artifact decodes greedily on its own."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import braze.runtime.draft_proposer as dp
    art = store.artifact("llama", opt_level=2, max_num_seqs=8, max_num_tokens=32,
                         dtype="float32", targets="sm_80,sm_90")
    p = proposer(art, "cuda", cudagraph_mode="full")
    assert p.runner.graphs.stats["cuda_graphs_captured"] > 0
    contexts = prompts_of([3, 6, 4, 14], seed=11)
    budgets = [3, 1, 2, 4]
    eng = Engine(art, backend="cuda", num_kv_blocks=64, async_scheduling=False)
    want = [o.token_ids for o in run_all(eng, contexts, SamplingParams(max_tokens=4,
                                                                      ignore_eos=True))]
    steps = dp.greedy_steps

    def strict(*a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return steps(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(dp, "greedy_steps", strict)
    replays = []
    run = p.runner.graphs.run
    monkeypatch.setattr(p.runner.graphs, "run", lambda *a, **k: (replays.append(a), run(*a, **k))[1])
    reqs = [Request(f"g{i}", c, GREEDY) for i, c in enumerate(contexts)]
    got = p.propose(reqs, budgets)
    assert got == [w[:b] for w, b in zip(want, budgets)]
    assert p.runner.graphs.last_variant == "full" and p.num_host_reads == 1
    assert len(replays) == 1 + 3      # the catch-up (27 tokens), then 3 decode steps (budget 4)


def test_a_draft_models_kv_cache_keeps_to_the_engines_gpu_share(store, monkeypatch):
    """--gpu-memory-utilization is the engine's share of the GPU, the draft model's cache
    included: the draft sizes its cache within the same share (with 0.9 of its own, a
    draft next to a target at 0.5 would take the GPU to 0.9)."""
    from braze.runtime import kv_cache, model_runner
    seen = []

    def sizing(*args, **kw):
        seen.append(kw["gpu_memory_utilization"])
        return kv_cache.default_num_blocks(*args, **kw)
    monkeypatch.setattr(model_runner, "default_num_blocks", sizing)
    art = draft_artifact(store)
    spec = {"method": "draft", "model": str(art), "num_speculative_tokens": 3}
    Engine(art, backend="reference", gpu_memory_utilization=0.3, speculative=spec)
    assert seen == [0.3, 0.3]           # the target's cache, then the draft's
