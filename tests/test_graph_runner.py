"""The step executor's bound launch plans, replayed on the CPU (runtime/graph_runner.py).

What a CUDA graph needs is checked here without a GPU: for every batch bucket the
plans bound to the static buffers give the reference interpreter's logits (and KV
cache) on real mixed steps with padding tokens and zero-length sequences; replay
allocates nothing, reads no device value on the host and touches only static
storage; it sees a step only through the static input buffers; debug mode notices
a buffer that moved; and the modes none / piecewise / full agree.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from braze.ir import run_graph
from braze.ir.errors import BrazeError
from braze.runtime import Executor, open_artifact
from braze.ir.contract import SeqChunk, build_step
from braze.ir.contract import default_buckets
from braze.runtime.graph_runner import GraphRunner, _group, segments_for, validate_buckets

from discipline_helpers import (Discipline, HostReads, stale_workspaces, static_storages,
                                zeroed_workspaces)

BUCKETS = [1, 2, 4, 8]
MAX_T, MAX_S, NUM_BLOCKS = 8, 4, 16
OPTIONS = {"opt_level": 2, "max_num_tokens": MAX_T, "max_num_seqs": MAX_S, "max_model_len": 64}


@pytest.fixture(scope="module")
def art(store):
    return open_artifact(store.artifact("llama", **OPTIONS))


@pytest.fixture(scope="module")
def ex(art):
    return Executor(art, backend="interpret", num_blocks=NUM_BLOCKS)


def static_for(ex, max_t=MAX_T, max_s=MAX_S):
    """The caller-owned persistent step buffers (garbage-filled: padding is the caller's job)."""
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randint(0, 3, shape, generator=g)
    return {"input_ids": r(max_t), "positions": r(max_t), "slot_mapping": r(max_t) - 1,
            "query_start_loc": r(max_s + 1).int(), "seq_lens": r(max_s).int(),
            "block_tables": r(max_s, ex.max_blocks).int(), "logits_indices": r(max_s)}


def random_cache(ex, seed):
    """Fill the runner's cache in place with random values; the reference gets a copy."""
    g = torch.Generator().manual_seed(seed)
    for t in ex.cache.tensors.values():
        t.copy_(torch.randn(t.shape, generator=g))
    return {k: v.clone() for k, v in ex.cache.tensors.items()}


def reference_logits(ex, chunks, ref_cache):
    feeds = build_step(chunks, ex.block_size, ex.max_blocks)
    feeds.update(ref_cache)
    return run_graph(ex.graph, feeds, ex.params)["logits"]


def replay(runner, ex, chunks):
    n, s = runner.write_step(build_step(chunks, ex.block_size, ex.max_blocks))
    out = runner.run(n, s, decode_only=all(len(c.token_ids) == 1 for c in chunks))
    return out[:s].clone() if ex.logits_pruned else \
        out.index_select(0, runner.static["logits_indices"][:s]).clone()


def C(tokens, computed, blocks):
    return SeqChunk(list(tokens), computed, list(blocks))


# Two steps per bucket (each needing exactly that bucket): a prefill, then a mixed step on
# top of it -- decodes, a chunked prefill after cached tokens, new prompts, and (bucket 8) a
# decode at position 20 whose keys span two blocks of the random-filled cache.
STEPS = {
    1: [[C([5], 0, [0])], [C([9], 1, [0])]],
    2: [[C([5, 6], 0, [0])], [C([9], 2, [0]), C([40], 0, [1])]],
    4: [[C([5, 6, 7], 0, [0])], [C([9], 3, [0]), C([41, 42], 0, [1])]],
    8: [[C([5, 6, 7, 8, 9], 0, [0]), C([11, 12], 0, [1])],
        [C([10], 5, [0]), C([13, 14], 2, [1]), C([20, 21, 22], 0, [2]), C([23], 20, [5, 3])]],
}


def test_steps_cover_each_bucket_and_padding(ex):
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S)
    for T, steps in STEPS.items():
        for chunks in steps:
            n, s = sum(len(c.token_ids) for c in chunks), len(chunks)
            assert r.bucket_for(n, s) == (T, min(T, MAX_S))
    assert any(sum(len(c.token_ids) for c in ch) < T for T, st in STEPS.items() for ch in st)
    assert any(len(ch) < min(T, MAX_S) for T, st in STEPS.items() for ch in st)


def test_replay_equals_reference_for_every_bucket(ex):
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S)
    r.capture()
    # the artifact's mode, full: a whole-step plan per bucket, and a decode-only one per
    # bucket with T == S
    decode_variants = sum(1 for T in BUCKETS if T <= MAX_S)
    assert r.mode == "full" and r.stats["cuda_graphs_captured"] == 0
    assert r.stats["plans_bound"] == len(BUCKETS) + decode_variants
    for T, steps in STEPS.items():
        ref_cache = random_cache(ex, seed=T)
        for chunks in steps:          # different contents through the same bound plan
            got = replay(r, ex, chunks)
            want = reference_logits(ex, chunks, ref_cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for name, t in ex.cache.tensors.items():   # same writes, none from padding tokens
            torch.testing.assert_close(t, ref_cache[name], atol=1e-5, rtol=1e-5)


def _clobber(ex, r):
    ex.plan.arena.fill_(255)                        # NaN in every float slot
    for flat in ex.plan._static_out.values():
        flat.fill_(float("nan"))
    for flat in stale_workspaces(ex.plan.runner):
        flat.fill_(float("nan") if flat.is_floating_point() else -1)


def test_replay_sees_the_step_only_through_the_static_buffers(ex):
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S)
    r.capture()
    random_cache(ex, seed=11)
    a = [C([5, 6, 7, 8], 0, [0]), C([30, 31], 0, [1])]
    b = [C([50, 51, 52], 0, [2]), C([60], 0, [3]), C([61, 62], 0, [4])]
    first = replay(r, ex, a)
    other = replay(r, ex, b)
    _clobber(ex, r)                                 # stale intermediates must not matter
    again = replay(r, ex, a)
    assert torch.equal(first, again)
    assert not torch.allclose(first[:2], other[:2])


def test_replay_allocates_nothing_and_touches_only_static_storage(ex):
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S)
    r.capture()
    random_cache(ex, seed=3)
    chunks = [C([5, 6, 7], 0, [0]), C([8], 4, [1])]
    n, s = r.write_step(build_step(chunks, ex.block_size, ex.max_blocks))
    allowed = static_storages(r)
    # every tensor bound into the plans lives in that static storage
    for b in r._buckets.values():
        for name, t in b.plan.tensors():
            assert t.untyped_storage().data_ptr() in allowed, name
    with Discipline(allowed) as spy:
        out = r.run(n, s, decode_only=False)
    assert not spy.bad, dict(spy.bad)
    assert spy.ops["aten.mm.out"] == 9                       # the GEMMs write in place
    assert out.untyped_storage().data_ptr() in allowed
    # the check has teeth: the eager plan runner allocates its GEMM results
    eager = build_step(chunks, ex.block_size, ex.max_blocks)
    with Discipline(allowed | {t.untyped_storage().data_ptr() for t in eager.values()}) as spy:
        ex.run(eager)
    assert any("makes" in k for k in spy.bad)


def test_debug_mode_catches_moved_buffers(ex):
    static = static_for(ex)
    r = GraphRunner(ex, static, BUCKETS, MAX_S, debug=True)
    r.capture()
    chunks = [C([5], 0, [0])]
    replay(r, ex, chunks)
    original = static["positions"]
    static["positions"] = original.clone()           # a new tensor: the plans still read the old
    with pytest.raises(BrazeError, match="positions"):
        r.run(1, 1, decode_only=True)
    static["positions"] = original
    b = r._buckets[1]
    name, t, _ = next(c for c in b.checks if re.fullmatch(r"%\d+", c[0]))   # an arena slot view
    t.set_(torch.empty_like(t))                      # a bound intermediate re-pointed
    with pytest.raises(BrazeError, match=re.escape(f"bound buffer {name} ")):
        r.run(1, 1, decode_only=True)


def test_reallocated_cache_is_refused(art):
    ex = Executor(art, backend="interpret", num_blocks=NUM_BLOCKS)
    r = GraphRunner(ex, static_for(ex), [1], MAX_S)
    r.capture()
    ex.cache.resize(NUM_BLOCKS + 1)
    with pytest.raises(BrazeError, match="capture"):
        r.run(1, 1, decode_only=True)
    r.capture()                                       # re-bound to the new cache
    r.write_step(build_step([C([5], 0, [0])], ex.block_size, ex.max_blocks))
    r.run(1, 1, decode_only=True)


def test_a_recapture_waits_for_replays_in_flight_before_dropping_graphs(art, monkeypatch):
    """Captured graphs own their pool's memory; dropping them while a replay still runs
    on the GPU hands that memory to the next capture under the running kernels. So the
    device is synchronised before the old graphs go (and not at all when there are none)."""
    import weakref
    ex = Executor(art, backend="interpret", num_blocks=NUM_BLOCKS)
    r = GraphRunner(ex, static_for(ex), [1], MAX_S)
    events = []

    class Graph:
        pass
    g = Graph()
    weakref.finalize(g, events.append, "graph dropped")
    r._graphs.append(g)
    del g
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("synchronize"))
    r.capture()
    assert events == ["synchronize", "graph dropped"]
    events.clear()
    r.capture()                                   # nothing captured on the interpreter
    assert events == []


def test_modes_agree(ex):
    mixed = [C([5, 6, 7, 8, 9], 0, [0]), C([11], 0, [1])]
    decode = [C([10], 5, [0]), C([12], 1, [1])]
    results, bound = {}, {}
    for mode in ("none", "piecewise", "full"):
        r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S, mode=mode)
        r.capture()
        random_cache(ex, seed=5)
        results[mode] = (replay(r, ex, mixed), replay(r, ex, decode))
        bound[mode] = (r.stats["plans_bound"], r.stats["full_capture"])
        assert r.last_variant == {"none": "eager", "piecewise": "piecewise", "full": "full"}[mode]
    for mode in ("none", "full"):
        for got, want in zip(results[mode], results["piecewise"]):
            assert torch.equal(got, want), mode
    # full: a whole-step plan for every bucket, attention included, and a decode-only one
    # (no decode-idle launches) for each bucket with T == S; no piecewise plans
    assert bound == {"none": (4, None), "piecewise": (4, None), "full": (4 + 3, "any")}


@pytest.mark.parametrize("mode", ["none", "piecewise", "full"])
def test_a_decode_step_runs_no_prefill_path_launch(ex, mode):
    """At a bucket with T == S a decode-only step leaves out attention's prefill-path launch
    (decode_idle) from what runs: the whole-step graph of mode full, the eager steps of the
    others. With stale NaN everywhere it still gives the reference's logits, padding
    sequences included, and a mixed step of the same bucket still runs the launch."""
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S, mode=mode)
    r.capture()
    layers = sum(node.op == "attention" for node in ex.graph.nodes)
    assert layers
    for T in BUCKETS:
        b = r._buckets[T]
        idle = [c for c in b.plan.calls if c.decode_idle]
        assert len(idle) == layers and all("attn_fwd_kernel" in c.name for c in idle)
        steps = b.full_decode if mode == "full" else b.decode
        if T > MAX_S:                   # S < T: a decode step cannot fill the bucket
            assert steps is None and b.decode is None
            continue
        assert len(steps) == len(b.plan.calls) - layers
        if mode == "full":              # and the bucket's whole-step graph for any batch
            assert b.pieces is None and b.full == b.plan.calls
        assert not any(getattr(c, "decode_idle", False) for c in steps)
    idle_ran = []                       # the decode-idle launches of bucket 4 that ran
    for c in r._buckets[4].plan.calls:
        if c.decode_idle:
            c.call = (lambda call: lambda: (idle_ran.append(1), call()))(c.call)
    ref_cache = random_cache(ex, seed=31)
    decode = [C([10], 40, [2, 3, 4]), C([13], 63, [5, 6, 7, 8]), C([14], 2, [1])]   # bucket 4
    mixed = [C([20, 21], 0, [9]), C([22], 7, [10])]                                 # bucket 4
    for chunks in (decode, mixed):
        _clobber(ex, r)
        idle_ran.clear()
        got = replay(r, ex, chunks)
        assert len(idle_ran) == (0 if chunks is decode else layers)
        want = reference_logits(ex, chunks, ref_cache)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert r.last_variant == {"none": "eager", "piecewise": "piecewise", "full": "full"}[mode]


@pytest.mark.parametrize("case, opt_level", [("llama", 0), ("llama", 1), ("llama", 2),
                                             ("qwen3_moe-dense-middle", 0),
                                             ("gemma4-ple-kvshare-moe", 0)])
@pytest.mark.parametrize("mode", ["piecewise", "full"])
def test_what_a_cuda_graph_captures_reads_nothing_on_the_host(store, case, opt_level, mode):
    """Every extern torch call a CUDA graph would capture (the "graph" segments; in mode full
    the whole forward of a decode or a mixed step, break ops included) runs without a host
    read or an output shaped by device data: on a GPU either one fails the capture, on the
    CPU nothing shows. -O0/-O1 keep cache_write (no template) as an extern inside the
    captured segments."""
    art = open_artifact(store.artifact(case, **dict(OPTIONS, opt_level=opt_level)))
    ex = Executor(art, backend="interpret", num_blocks=NUM_BLOCKS)
    r = GraphRunner(ex, static_for(ex), [1, 2, 4], MAX_S, mode=mode)
    r.capture()
    assert r.full_capture == ("any" if mode == "full" else None)
    random_cache(ex, seed=2)
    externs = 0
    for chunks in ([C([5], 3, [0]), C([8], 4, [1])], [C([5, 6, 7], 0, [0]), C([8], 4, [1])]):
        n, s = r.write_step(build_step(chunks, ex.block_size, ex.max_blocks))
        b = r._buckets[r.bucket_for(n, s)[0]]
        for kind, first, last, calls in _group(b.plan.calls, segments_for(ex.graph, mode)):
            for c in calls:
                if kind != "graph" or not c.name.startswith("extern."):
                    c()
                    continue
                externs += 1
                with HostReads() as spy:
                    c()
                assert not spy.bad, (c, dict(spy.bad))
    assert externs


def test_artifact_mode_is_the_default(store):
    art = open_artifact(store.artifact("llama", cudagraph_mode="full", **OPTIONS))
    ex = Executor(art, backend="interpret", num_blocks=NUM_BLOCKS)
    r = GraphRunner(ex, static_for(ex), [1, 2], MAX_S)
    assert r.mode == "full" and r.full_capture == "any"
    r.capture()
    ref_cache = random_cache(ex, seed=9)
    chunks = [C([9], 3, [0])]
    torch.testing.assert_close(replay(r, ex, chunks), reference_logits(ex, chunks, ref_cache),
                               atol=1e-4, rtol=1e-4)


def test_reference_backend_runs_padded_steps(art):
    ex = Executor(art, backend="reference", num_blocks=NUM_BLOCKS)
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S)
    r.capture()
    assert r.stats["plans_bound"] == 0
    for T, steps in STEPS.items():
        ref_cache = random_cache(ex, seed=T)
        for chunks in steps:
            got = replay(r, ex, chunks)
            torch.testing.assert_close(got, reference_logits(ex, chunks, ref_cache),
                                       atol=1e-5, rtol=1e-5)


def test_default_buckets():
    b = default_buckets(8192)
    assert b[:8] == [1, 2, 4, 8, 16, 24, 32, 40]
    assert b == sorted(set(b)) and b[-1] == 8192
    steps = {(lo, hi): hi - lo for lo, hi in itertools.pairwise(b)}
    assert all(d == 8 for (lo, hi), d in steps.items() if 8 <= lo < 256)
    assert all(d == 16 for (lo, hi), d in steps.items() if 256 <= lo < 512)
    assert all(d == 32 for (lo, hi), d in steps.items() if 512 <= lo < 1024)
    assert all(d <= lo // 8 for (lo, hi), d in steps.items() if lo >= 1024)   # <= 12.5% padding
    assert default_buckets(8) == [1, 2, 4, 8]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_buckets(1) == [1]


@pytest.mark.parametrize("bad", [[0], [-2], [2.5], [True], [16], []])
def test_bad_buckets_are_refused(bad):
    with pytest.raises(BrazeError, match="bucket"):
        validate_buckets(bad, 8)


def test_buckets_sorted_and_capped():
    assert validate_buckets([4, 2, 2], 8) == [2, 4, 8]
    assert validate_buckets(None, 8) == [1, 2, 4, 8]


def test_bucket_for(ex):
    r = GraphRunner(ex, static_for(ex), [4, 1, 2], MAX_S)
    assert r.buckets == [1, 2, 4, 8]
    assert r.bucket_for(1, 1) == (1, 1)
    assert r.bucket_for(3, 2) == (4, 4)
    assert r.bucket_for(5, 3) == (8, 4)
    assert r.bucket_for(2, 2) == (2, 2)
    assert r.bucket_for(1, 3) == (4, 4)          # zero-length sequences need sequence rows
    with pytest.raises(BrazeError, match="max_num_tokens"):
        r.bucket_for(9, 1)
    with pytest.raises(BrazeError, match="max_num_seqs"):
        r.bucket_for(4, 5)


def test_bad_setup_is_refused(ex):
    with pytest.raises(BrazeError, match="cudagraph mode"):
        GraphRunner(ex, static_for(ex), BUCKETS, MAX_S, mode="partial")
    with pytest.raises(BrazeError, match="max-num-tokens"):       # bigger than the arena plan
        GraphRunner(ex, static_for(ex, max_t=16), None, MAX_S)
    with pytest.raises(BrazeError, match="max-num-seqs"):
        GraphRunner(ex, static_for(ex, max_s=8), BUCKETS, 8)
    st = static_for(ex)
    del st["seq_lens"]
    with pytest.raises(BrazeError, match="seq_lens"):
        GraphRunner(ex, st, BUCKETS, MAX_S)
    with pytest.raises(BrazeError, match="decode-only"):
        GraphRunner(ex, static_for(ex), BUCKETS, MAX_S).run(3, 2, decode_only=True)


@pytest.mark.parametrize("slots", [[-1, -1, -1], [0, -1, 5], [-1, 0, -1, 7], [3, 9, 0],
                                   [-1, -1, 12]])
def test_cache_write_skips_padding_tokens(slots):
    """The op's torch form (an extern in -O0/-O1 plans, captured in CUDA graphs) writes each
    valid token's k and v at its slot and nothing else, slot 0 included, with no boolean-mask
    indexing (test_what_a_cuda_graph_captures_reads_nothing_on_the_host)."""
    from braze.ir import get_op
    g = torch.Generator().manual_seed(len(slots))
    k = torch.randn(len(slots) + 1, 2, 4, generator=g)    # one row more: k may be longer
    v = torch.randn(len(slots) + 1, 2, 4, generator=g)
    kc, vc = torch.randn(4, 4, 2, 4, generator=g), torch.randn(4, 4, 2, 4, generator=g)
    want_k, want_v = kc.clone(), vc.clone()
    for i, s in enumerate(slots):
        if s >= 0:
            want_k.view(-1, 2, 4)[s] = k[i]
            want_v.view(-1, 2, 4)[s] = v[i]
    with HostReads() as spy:
        get_op("cache_write").impl(k, v, kc, vc, torch.tensor(slots))
    assert not spy.bad, dict(spy.bad)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("case", ["qwen3_moe-dense-middle", "gemma4-ple-kvshare-moe",
                                  "mistral-window8", "gemma3-sandwich-softcap"])
def test_stale_device_memory_never_reaches_a_result(store, case):
    """On a GPU the arena, the workspaces and the output buffers hold whatever the caching
    allocator last put there; on the CPU they tend to start as zeros, which hides a kernel
    that reads bytes no launch of the step wrote (an expert count not reset, a split-KV
    partial never stored). Poisoned with NaN before every step, the bound plans still give
    the reference's logits, on decodes long enough to split their keys."""
    art = open_artifact(store.artifact(case, **OPTIONS))
    ex = Executor(art, backend="interpret", num_blocks=NUM_BLOCKS)
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S)
    r.capture()
    steps = [[C([5, 6, 7, 8, 9], 0, [0]), C([11, 12], 0, [1])],
             [C([10], 40, [2, 3, 4]), C([13], 63, [5, 6, 7, 8]), C([14, 15], 2, [1])],
             # decode-only, padded to T == S: no prefill-path launch zeroes the padding rows
             [C([16], 39, [2, 3, 4]), C([17], 62, [5, 6, 7, 8]), C([18], 4, [1])]]
    stale = [ex.plan.arena] + list(ex.plan._static_out.values()) + \
        stale_workspaces(ex.plan.runner)
    for seed, chunks in enumerate(steps):
        ref_cache = random_cache(ex, seed=20 + seed)
        for t in stale:
            t.fill_(float("nan") if t.is_floating_point() else -1)
        got = replay(r, ex, chunks)
        feeds = build_step(chunks, ex.block_size, ex.max_blocks)
        for name in ex.group_inputs:        # one table given: every KV cache group uses it
            feeds.setdefault(name, feeds[name.split(".")[0]])
        feeds.update(ref_cache)
        want = run_graph(ex.graph, feeds, ex.params)["logits"]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # attention's split arrivals are counted in zeroed workspaces that every launch
        # leaves zeroed again (no clearing launch): a miscount would survive into the next
        # step, where the last split of a sequence would never combine the partials
        zeroed = zeroed_workspaces(ex.plan.runner)
        assert zeroed and all(not t.any() for t in zeroed.values()), case


def test_a_wide_step_leaves_its_own_outputs_for_the_proposers(store):
    """The MTP proposers read `last_outputs` (hidden states) after every step; a wide step
    (prompt logprobs on a pruned LM head) must leave its own there, not the step before's."""
    art = open_artifact(store.artifact("llama", max_logits_rows=MAX_T, **OPTIONS))
    ex = Executor(art, backend="interpret", num_blocks=NUM_BLOCKS)
    r = GraphRunner(ex, static_for(ex), BUCKETS, MAX_S, wide_rows=MAX_T)
    r.capture()
    random_cache(ex, seed=4)
    r.write_step(build_step([C([9], 1, [0])], ex.block_size, ex.max_blocks))
    r.run(1, 1, decode_only=True)
    r.wide_indices[:MAX_T] = torch.arange(MAX_T)
    n, s = r.write_step(build_step([C(range(5, 5 + MAX_T), 0, [1])], ex.block_size,
                                   ex.max_blocks))
    logits = r.run(n, s, decode_only=False, wide=True)
    assert r.last_variant == "wide" and r.last_outputs["logits"] is logits
    assert r.last_outputs["logits"].shape[0] == MAX_T


def test_a_step_buffer_of_another_dtype_is_refused_at_bind(ex):
    """A stored cubin reads its pointers as the types it was compiled for: given a tensor
    of another dtype it misreads it on the GPU, silently (the JIT would recompile). Binding
    refuses it, naming the kernel and the buffer."""
    static = static_for(ex)
    static["query_start_loc"] = static["query_start_loc"].long()
    r = GraphRunner(ex, static, BUCKETS, MAX_S)
    with pytest.raises(BrazeError, match=r"takes %query_start_loc as i32, and is given a int64"):
        r.capture()
