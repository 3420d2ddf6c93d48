"""The MTP graph's calls through bucketed static buffers (runtime/mtp_graphs.py), like the
main model's steps (runtime/graph_runner.py).

On `interpret` with an -O2 DeepSeek-V3 artifact whose next-n layer guesses well:
- every MTP call of a generation (catch-up chunks and chained one-row calls) replays a
  plan bound once per bucket: the bound plans are the same objects before and after, no
  plan is bound again, and several calls share a bucket;
- each replay allocates nothing, touches only static storage and reads no device value
  on the host (the main runner's graph-discipline check), but inside the extern ops bound
  without an in-place form that the main graph has too (einsum: on a GPU its temporaries
  come from the graph's pool);
- its logits and hidden states equal the unbucketed launch plan's on the same inputs, calls
  larger than the largest bucket (cut into calls that fit) included; greedy output equals
  plain decoding;
- `kernel_stats` (Engine.stats) counts the MTP plan's kernels beside the target's;
- on a GPU (`gpu`), the MTP graphs are captured into CUDA graphs and agree with eager.
"""

from __future__ import annotations

import pytest
import torch

from braze.runtime.engine import Engine
from braze.runtime.mtp_graphs import MTPGraphs

from conftest import prompts_of, run_all
from discipline_helpers import Discipline, static_storages
import test_mtp_plan
from test_mtp_plan import GREEDY, MTP

dsv3 = test_mtp_plan.dsv3          # the fixture: an -O2 DeepSeek-V3 artifact whose MTP guesses well

BUCKETS = [1, 2, 4, 8]


class _Discipline(Discipline):
    """The discipline, except inside an extern call bound without an in-place form (a
    `(fallback)` launch: its temporaries come from the graph's pool on a GPU; the main
    runner reports them in stats["extern_fallbacks"]) while `exempt` is set."""

    def __init__(self, allowed, exempt: list):
        super().__init__(allowed)
        self.exempt = exempt

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.exempt:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _watch(graphs: MTPGraphs, log: list, bad: list, fallbacks: list):
    """Wrap the MTP runner's replay: each call's (tokens, sequences, bucket) into `log`,
    what the graph discipline flags during it into `bad`, and the fallback externs it ran
    into `fallbacks`."""
    runner = graphs.runner
    allowed = static_storages(runner)
    exempt = []
    for b in runner._buckets.values():
        for c in b.plan.calls:          # the same call objects every step list replays
            if c.name.endswith("(fallback)"):
                def call(orig=c.call, name=c.name):
                    exempt.append(name)
                    try:
                        orig()
                    finally:
                        fallbacks.append(exempt.pop())
                c.call = call
    run = runner.run

    def watched(n, s, decode_only, wide=False):
        log.append((n, s, runner.bucket_for(n, s)[0]))
        with _Discipline(allowed, exempt) as spy:
            out = run(n, s, decode_only, wide)
        bad.extend(spy.bad)
        return out
    runner.run = watched


def _versus_unbucketed(graphs: MTPGraphs, diffs: list, sizes: list):
    """Wrap the proposer's call: the unbucketed launch plan (PlanExecutor.run) runs the
    same inputs on a copy of the MTP cache as it was; the largest difference of logits and
    hidden states, and of the cache each wrote, is recorded."""
    plan = graphs.plan

    def call(feeds):
        ref = {k: v.clone() for k, v in feeds.items()}
        got = graphs(feeds)
        want = {k: v.clone() for k, v in plan.run(ref).items()}
        sizes.append(int(feeds["input_ids"].shape[0]))
        for k in ("logits", "hidden_states"):
            assert got[k].shape == want[k].shape, k
            diffs.append((got[k] - want[k]).abs().max().item())
        for k, v in feeds.items():
            if v.is_floating_point() and k != graphs.hidden_input:
                diffs.append((v - ref[k]).abs().max().item())
        return got
    return call


def _engine(art, **kw):
    return Engine(art, backend="interpret", buckets=BUCKETS, speculative=MTP, **kw)


def test_mtp_calls_replay_plans_bound_once_per_bucket(dsv3):
    eng = _engine(dsv3)
    p = eng.spec.proposer
    graphs = p.run_graph
    assert isinstance(graphs, MTPGraphs) and p.runs_on == "plan"
    buckets = graphs.runner.buckets
    assert buckets == eng.runner.graphs.buckets == BUCKETS + [64]     # + max_num_tokens
    assert graphs.stats["plans_bound"] == len(buckets)
    bound = {T: b.plan for T, b in graphs.runner._buckets.items()}
    log, bad, fallbacks, diffs, sizes = [], [], [], [], []
    _watch(graphs, log, bad, fallbacks)
    p.run_graph = _versus_unbucketed(graphs, diffs, sizes)
    prompts = prompts_of([6, 11, 3], seed=8)
    got = run_all(eng, prompts, GREEDY)
    # bound once, replayed: the same plans, nothing bound again, buckets shared by calls
    assert graphs.stats["plans_bound"] == len(buckets)
    assert {T: b.plan for T, b in graphs.runner._buckets.items()} == bound
    assert len(log) == p.num_mtp_calls > len({T for _, _, T in log})
    assert any(n == s for n, s, _ in log) and any(n > s for n, s, _ in log)  # chained, catch-up
    assert any(n < T for n, _, T in log)                         # padded into its bucket
    # the discipline; the only externs that allocate at replay are the main graph's too
    assert not bad, bad
    assert set(fallbacks) == set(graphs.stats["extern_fallbacks"]) <= \
        set(eng.runner.graphs.stats["extern_fallbacks"])
    # the unbucketed plan's outputs and cache writes; plain greedy output
    assert len(diffs) > 2 * len(log) and max(diffs) < 1e-5, max(diffs)
    plain = run_all(Engine(dsv3, backend="interpret", buckets=BUCKETS), prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0


def test_a_call_larger_than_the_largest_bucket_is_cut(dsv3):
    """max_num_tokens 4 and 2 sequences: a call of 9 tokens over 3 sequences runs as
    calls that fit, one sequence cut across two (its second part sees the first's KV),
    and equals the unbucketed plan, the MTP KV it writes too."""
    small = dict(max_num_tokens=4, max_num_seqs=2, buckets=[1, 2, 4])
    eng = Engine(dsv3, backend="interpret", speculative=MTP, **small)
    p = eng.spec.proposer
    graphs = p.run_graph
    g = torch.Generator().manual_seed(5)
    for t in p.cache.tensors.values():
        t.copy_(torch.randn(t.shape, generator=g))
    bs = p.block_size
    # (positions, block table): 5 new tokens; 3 after 2 cached; 1 after 6 cached
    seqs = [(range(0, 5), [1]), (range(2, 5), [2]), (range(6, 7), [3])]
    pos = [q for r, _ in seqs for q in r]
    width = eng.runner.max_blocks
    feeds = {
        "input_ids": torch.randint(3, 200, (len(pos),), generator=g),
        "positions": torch.tensor(pos),
        "slot_mapping": torch.tensor([t[q // bs] * bs + q % bs for r, t in seqs for q in r]),
        "query_start_loc": torch.tensor([0, 5, 8, 9], dtype=torch.int32),
        "seq_lens": torch.tensor([r[-1] + 1 for r, _ in seqs], dtype=torch.int32),
        "block_tables": torch.tensor([t + [0] * (width - 1) for _, t in seqs], dtype=torch.int32),
        "logits_indices": torch.tensor([4, 7, 8]),
        p.hidden_input: torch.randn(len(pos), graphs.runner.static[p.hidden_input].shape[1], generator=g),
    }
    assert graphs._pieces([0, 5, 8, 9]) == [[(0, 0, 4)], [(0, 4, 5), (1, 5, 8)], [(2, 8, 9)]]
    diffs, sizes = [], []
    call = _versus_unbucketed(graphs, diffs, sizes)
    call(dict(feeds, **p.cache.tensors))
    assert sizes == [9] and max(diffs) < 1e-5, diffs


def test_cut_calls_cover_every_token_in_order(dsv3):
    eng = _engine(dsv3, max_num_tokens=8)
    graphs = eng.spec.proposer.run_graph
    qsl = [0, 3, 3, 15, 16, 17, 18, 19, 20]
    pieces = graphs._pieces(qsl)
    flat = [(i, t) for piece in pieces for i, a, b in piece for t in range(a, b)]
    assert flat == [(i, t) for i in range(len(qsl) - 1) for t in range(qsl[i], qsl[i + 1])]
    assert all(sum(b - a for _, a, b in p) <= 8 and len(p) <= eng.runner.max_num_seqs
               for p in pieces)
    assert any(i == 1 for p in pieces for i, _, _ in p)         # the empty sequence kept


def test_kernel_stats_count_the_mtp_plan(dsv3):
    """Where kernels resolve through a cubin cache (the cuda backend), Engine.stats counts
    the MTP plan's kernel specialisations beside the target's. Here a cache that can use
    no cubin (no GPU) resolves every one to "jit"."""
    from braze.runtime.cubins import CubinCache
    eng = _engine(dsv3)
    graphs = eng.spec.proposer.run_graph
    plan = graphs.plan
    assert eng.stats()["kernels_jit"] == 0
    manifest = dict(eng.artifact.manifest, kernels=eng.artifact.manifest["mtp"]["kernels"])
    plan.runner.cubins = CubinCache(eng.artifact.root, manifest, plan.modules)
    graphs.runner.capture()                   # bound again: each kernel resolved once
    specs = {(c.name, c.spec) for b in graphs.runner._buckets.values()
             for c in b.plan.calls if c.spec is not None}
    assert specs
    st = eng.stats()
    assert st["kernels_jit"] == len(specs) and st["kernels_cubin"] == 0
    assert eng.runner.executor.kernel_stats()["kernels_jit"] == 0    # the target's alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_captures_the_mtp_graphs_and_agrees_with_eager(tmp_path):
    """float16 -O2 with cubins: the MTP graphs are captured per bucket (the artifact's
    default mode full: one whole-step graph, its MLA attention included); every call equals
    the eager plan on the same inputs; greedy output equals plain greedy; kernel_stats
    counts the MTP kernels' cubins."""
    import braze
    from braze.tiny_mtp import guessing_deepseek
    ckpt = guessing_deepseek(tmp_path)
    art = braze.compile(ckpt, tmp_path / "a", opt_level=2, dtype="float16", max_num_seqs=8,
                        max_logits_rows=32, max_num_tokens=128, targets="sm_80,sm_90").root
    prompts = prompts_of([6, 11, 17, 40], seed=8)
    plain_eng = Engine(art, backend="cuda")
    plain = run_all(plain_eng, prompts, GREEDY)
    eng = Engine(art, backend="cuda", speculative=MTP)
    graphs = eng.spec.proposer.run_graph
    assert isinstance(graphs, MTPGraphs)
    assert graphs.runner.mode == "full" and graphs.runner.full_capture == "any"
    assert graphs.stats["cuda_graphs_captured"] >= len(graphs.runner.buckets)
    diffs, sizes = [], []
    eng.spec.proposer.run_graph = _versus_unbucketed(graphs, diffs, sizes)
    got = run_all(eng, prompts, GREEDY)
    assert diffs and max(diffs) < 3e-2, max(diffs)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert eng.stats()["spec_decode_num_accepted_tokens"] > 0
    cubins = graphs.plan.runner.cubins
    assert cubins is not None and cubins.usable, cubins and cubins.reason
    mtp = cubins.counts()
    assert mtp["cubin"] > 0
    main = eng.runner.executor.kernel_stats()
    assert eng.stats()["kernels_cubin"] == main["kernels_cubin"] + mtp["cubin"]
    assert eng.stats()["cuda_graphs_captured"] == (eng.runner.graphs.stats["cuda_graphs_captured"]
                                                   + graphs.stats["cuda_graphs_captured"])
