"""The hybrid KV cache end to end: artifacts record their KV cache groups, the engine
frees the blocks sliding-window layers no longer see, and outputs still equal
transformers' (Mistral with every layer windowed; Gemma 3 with local and global layers),
at -O0 and -O2, on the reference backend and with the Triton kernels interpreted."""

from __future__ import annotations

import json

import pytest
import torch

from braze.runtime.engine import Engine
from braze.runtime.hybrid_cache import NULL_BLOCK, HybridBlockManager
from braze.runtime.sampler import SamplingParams

from conftest import hf_model, prompts_of

BS = 4          # small blocks, so that a window of 8 tokens spans few of them
W = 8           # the tiny Mistral and Gemma 3 configs' sliding window (braze/tiny.py)
OPTS = dict(block_size=BS, max_model_len=128, max_num_tokens=16, max_num_seqs=4)


def _artifact(store, case, opt_level):
    return store.artifact(case, opt_level=opt_level, **OPTS)


def _greedy_hf(store, case, prompt, n):
    with torch.no_grad():
        out = hf_model(store.checkpoint(case)).generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_manifest_records_groups_and_graph_reads_group_tables(store):
    art = _artifact(store, "gemma3-sandwich-softcap", 0)
    m = json.loads((art / "manifest.json").read_text())
    # every layer's cache has one shape: the local layers are cut into groups of the global
    # layers' count (one), so one block of any group is the same bytes (a shared pool)
    assert m["kv_groups"] == [{"window": 0, "layers": [1]}, {"window": W, "layers": [0]},
                              {"window": W, "layers": [2]}]
    text = (art / "graph.bir").read_text()
    assert "cache_write(" in text and "%slot_mapping.g1)" in text and "%slot_mapping.g2)" in text
    assert text.count("%block_tables.g1)") == text.count("%block_tables.g2)") == 1
    m = json.loads((_artifact(store, "mistral-window8", 0) / "manifest.json").read_text())
    assert m["kv_groups"] == [{"window": W, "layers": [0, 1]}]     # one group: no new inputs
    # Gemma 4: its KV-shared layers (3 and 4) own no cache and sit in no group; its global
    # layers' caches differ from the local ones' (head_dim 32 vs 16): no cut
    m = json.loads((_artifact(store, "gemma4-ple-kvshare-moe", 0) / "manifest.json").read_text())
    assert m["kv_groups"] == [{"window": 0, "layers": [1]}, {"window": W, "layers": [0, 2]}]
    m = json.loads((store.artifact("llama") / "manifest.json").read_text())
    assert m["kv_groups"] == [{"window": 0, "layers": [0, 1]}]


def poison_free_blocks(eng):
    """After every step, fill each pool's plain free blocks (no computed KV a prefix hit
    could use) with 100.0 in every cache of the group: a step that still reads a block its
    window group released gets a wrong answer instead of a lucky stale one."""
    step, cache, bm = eng.step, eng.runner.executor.cache, eng.block_manager

    def poisoned():
        out = step()
        for group, pool in zip(bm.groups, bm.pools):
            free = torch.tensor(list(pool._plain_free), dtype=torch.int64)
            for name in cache.group_names(group.layers):
                cache.tensors[name][free] = 100.0
        return out

    eng.step = poisoned


CASES = [("mistral-window8", 0, "reference"), ("mistral-window8", 2, "reference"),
         ("gemma3-sandwich-softcap", 0, "reference"), ("gemma3-sandwich-softcap", 2, "reference"),
         ("mistral-window8", 2, "interpret"), ("gemma3-sandwich-softcap", 2, "interpret"),
         ("gemma4-ple-kvshare-moe", 0, "reference")]


@pytest.mark.parametrize("case,opt,backend", CASES)
def test_greedy_equals_transformers_with_window_freeing(store, case, opt, backend):
    """Prompts several windows long, prefilled in chunks of 16 with a prefix shared through
    the cache, then decoding: every token equals transformers' greedy run."""
    eng = Engine(_artifact(store, case, opt), backend=backend, num_kv_blocks=96,
                 buckets=[1, 2, 4, 8, 16] if backend == "interpret" else None)
    poison_free_blocks(eng)
    assert eng.stats()["kv_window_freeing"] is True
    assert isinstance(eng.block_manager, HybridBlockManager)
    # Gemma 3's groups are cut to equal pages and share one pool; Gemma 4's differ in size
    assert eng.stats()["kv_shared_pool"] is (case == "gemma3-sandwich-softcap")
    a, b = prompts_of([37, 29], seed=3)
    prompts = [a, a[:30] + b[:9]]       # the second shares 7 blocks of the first's prefix
    n = 10 if backend == "reference" else 6
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
        out = eng.run_to_completion([f"r{i}"])[f"r{i}"]
        assert out.token_ids == _greedy_hf(store, case, p, n), f"prompt {i}"
    s = eng.stats()
    assert s["prefix_cache_hit_tokens"] > 0
    for g in s["kv_groups"]:
        assert g["blocks_used"] == 0        # everything freed when the requests finished


@pytest.mark.parametrize("case", ["mistral-window8", "gemma3-sandwich-softcap"])
def test_blocks_in_use_follow_the_window_arithmetic(store, case):
    """One request decoding far past its window: after every step its window group holds
    exactly the blocks from its window's start (of the last chunk's first token) to its
    end, and a full-attention group every block."""
    eng = Engine(_artifact(store, case, 0), backend="reference", num_kv_blocks=96,
                 enable_prefix_caching=False)
    poison_free_blocks(eng)
    bm = eng.block_manager
    windows = bm.windows
    (prompt,) = prompts_of([23], seed=5)
    eng.add_request("r", prompt, SamplingParams(max_tokens=60, ignore_eos=True))
    req = eng.requests["r"]
    seen = 0
    while eng.has_unfinished():
        start = req.num_computed
        eng.step()
        if "r" not in bm:
            break
        end = req.num_computed
        for g, w in enumerate(windows):
            used = bm.group_used_blocks(g)
            if w:
                lo = max(0, start - w + 1) // BS
                assert used == -(-end // BS) - lo, (g, start, end)
                assert bm.block_table("r", g)[:lo] == [NULL_BLOCK] * lo
                assert used <= -(-(w - 1) // BS) + -(-16 // BS) + 1
                seen = max(seen, lo)
            else:
                assert used == -(-max(end, len(prompt)) // BS)     # the prompt from admission
    assert seen > 10            # the window slid well past the start
    # and with its blocks released (and poisoned) behind it, the tokens are transformers'
    assert req.output_token_ids == _greedy_hf(store, case, prompt, 60)


@pytest.mark.parametrize("case,async_scheduling", [("mistral-window8", False),
                                                   ("gemma3-sandwich-softcap", False),
                                                   ("gemma3-sandwich-softcap", True)])
def test_concurrent_requests_without_prefix_caching_equal_transformers(store, case,
                                                                      async_scheduling):
    """Three requests at once, no prefix cache: released window blocks go straight back to
    the pool (and are poisoned) while the others still run; with async scheduling too
    (blocks released while the step before still runs)."""
    eng = Engine(_artifact(store, case, 0), backend="reference", num_kv_blocks=96,
                 enable_prefix_caching=False, async_scheduling=async_scheduling)
    poison_free_blocks(eng)
    prompts = prompts_of([33, 21, 40], seed=7)
    for i, p in enumerate(prompts):
        eng.add_request(f"c{i}", p, SamplingParams(max_tokens=12, ignore_eos=True))
    outs = eng.run_to_completion()
    for i, p in enumerate(prompts):
        assert outs[f"c{i}"].token_ids == _greedy_hf(store, case, p, 12), f"request {i}"


@pytest.mark.parametrize("case,tier", [("gemma3-sandwich-softcap", "cpu"),
                                       ("gemma3-sandwich-softcap", "dir"),
                                       ("gemma3-sandwich-softcap", "s3"),
                                       ("mistral-window8", "cpu")])
def test_kv_offload_with_window_freeing_equals_transformers(store, case, tier, tmp_path,
                                                            request):
    """A prompt's blocks go to the host tier (or through a 15-block host tier to a
    directory, or to S3 on a real S3-compatible server), other traffic evicts them from
    the small device pools, and the prompt again (with a new tail) loads them back: each
    group gets its own blocks, a window group only those inside its window, and every
    output is transformers'."""
    lower = {"cpu": {}, "dir": {"kv_offload_dir": str(tmp_path)},
             "s3": {"kv_offload_s3": "s3://braze-kv/hybrid"}}[tier]
    if tier == "s3":
        request.getfixturevalue("s3")
    kw = {"kv_offload_cpu_gb": 0.01} if tier == "cpu" else \
        {"kv_offload_cpu_gb": 4.5e-5, **lower}                          # ~15 host blocks
    eng = Engine(_artifact(store, case, 0), backend="reference", num_kv_blocks=16, **kw)
    assert eng.stats()["kv_window_freeing"] is True
    poison_free_blocks(eng)
    a, b, c, d = prompts_of([42, 40, 40, 9], seed=21)
    prompts = [a, b, c, a[:37] + d]
    for i, p in enumerate(prompts):
        eng.add_request(f"o{i}", p, SamplingParams(max_tokens=8, ignore_eos=True))
        out = eng.run_to_completion([f"o{i}"])[f"o{i}"]
        assert out.token_ids == _greedy_hf(store, case, p, 8), f"prompt {i}"
    s = eng.stats()
    loaded = s["kv_offload_load_blocks_host"] + s["kv_offload_load_blocks_lower"]
    assert loaded >= 5
    if tier != "cpu":
        assert s["kv_offload_load_blocks_lower"] > 0


@pytest.mark.parametrize("case", ["mistral-window8", "gemma3-sandwich-softcap"])
def test_speculative_decoding_with_window_freeing_equals_transformers(store, case):
    """ngram speculation over repetitive prompts (guesses accepted and rejected, rolled
    back with `truncate`) while window groups release their blocks: transformers' tokens."""
    eng = Engine(_artifact(store, case, 0), backend="reference", num_kv_blocks=96,
                 speculative={"method": "ngram", "num_speculative_tokens": 3})
    poison_free_blocks(eng)
    assert eng.stats()["kv_window_freeing"] is True
    base = prompts_of([12, 9], seed=11)
    prompts = [base[0] * 3, base[1] * 2 + base[0][:5]]
    for i, p in enumerate(prompts):
        eng.add_request(f"s{i}", p, SamplingParams(max_tokens=24, ignore_eos=True))
    outs = eng.run_to_completion()
    for i, p in enumerate(prompts):
        assert outs[f"s{i}"].token_ids == _greedy_hf(store, case, p, 24), f"request {i}"
    s = eng.stats()
    assert s["spec_decode_num_draft_tokens"] > 0
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]


def test_prometheus_exports_each_kv_group(store):
    from braze.serving.metrics import Metrics

    from serve_helpers import parse_metrics
    eng = Engine(_artifact(store, "gemma3-sandwich-softcap", 0), backend="reference",
                 num_kv_blocks=96)
    (p,) = prompts_of([30], seed=2)
    eng.add_request("m", p, SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    snap = eng.stats()
    got = parse_metrics(Metrics("m").render(snap))
    used = snap["kv_groups"][1]["blocks_used"]
    assert used > 0
    assert got[f'braze_kv_group_blocks_used{{group="1",window="{W}"}}'] == used
    # one pool the groups share: each group may take any of its pages (the null one aside)
    total = eng.runner.executor.cache.num_blocks - 1
    assert snap["kv_shared_pool"] and snap["kv_blocks_total"] == total
    for g in range(3):
        assert got[f'braze_kv_group_blocks_total{{group="{g}",window="{W if g else 0}"}}'] \
            == total


def test_inspect_shows_the_kv_groups(store):
    from braze.inspect import format_summary, summarize
    text = format_summary(summarize(_artifact(store, "gemma3-sandwich-softcap", 0)))
    assert f"kv groups  full attention: layers 1; window {W}: layers 0; window {W}: layers 2" \
        in text


@pytest.mark.parametrize("case", ["mistral-window8", "gemma3-sandwich-softcap"])
def test_tensor_parallel_keeps_window_freeing_and_equals_transformers(store, case):
    """Two ranks (gloo, CPU): rank 0 frees window blocks and broadcasts every group's
    inputs; rank 1's caches are sized as rank 0's. Greedy tokens are transformers'."""
    from braze.runtime import LLM
    art = store.artifact(case, opt_level=0, tensor_parallel_size=2, **OPTS)
    prompts = prompts_of([31, 22], seed=13)
    with LLM(art, backend="reference", num_kv_blocks=64, enable_prefix_caching=False) as llm:
        eng = llm.engine
        assert eng.stats()["kv_window_freeing"] is True
        poison_free_blocks(eng)
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0,
                                                    ignore_eos=True))
        s = eng.stats()
        if case == "mistral-window8":       # one group: a window pool of its own size
            assert s["kv_groups"][-1]["blocks_total"] < 64
        else:                               # one pool the groups share, on both ranks
            assert s["kv_shared_pool"] and s["kv_blocks_total"] > 64
    for p, o in zip(prompts, outs):
        assert o.token_ids == _greedy_hf(store, case, p, 10)


@pytest.mark.parametrize("case,blocks", [("mistral-window8", 12),
                                         ("gemma3-sandwich-softcap", 24)])
def test_preemption_under_a_small_cache_equals_transformers(store, case, blocks):
    """More long requests than the pools hold at once: requests are preempted (their
    blocks in every group freed) and readmitted from the prefix cache, and every output is
    still transformers'."""
    eng = Engine(_artifact(store, case, 0), backend="reference", num_kv_blocks=blocks)
    poison_free_blocks(eng)
    prompts = prompts_of([41, 27, 36, 45, 22, 33], seed=17)
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, SamplingParams(max_tokens=14, ignore_eos=True))
    outs = eng.run_to_completion()
    assert eng.stats()["preemptions"] > 0
    for i, p in enumerate(prompts):
        assert outs[f"p{i}"].token_ids == _greedy_hf(store, case, p, 14), f"request {i}"
    for g in eng.stats()["kv_groups"]:
        assert g["blocks_used"] == 0


def test_a_hybrid_artifact_as_draft_model(store):
    """Gemma 3 as its own draft: the target frees window blocks, the draft keeps one table
    over equal pools (its group inputs mirror it); every guess is accepted and the tokens
    are transformers'."""
    case = "gemma3-sandwich-softcap"
    art = _artifact(store, case, 0)
    spec = {"method": "draft", "model": str(art), "num_speculative_tokens": 3}
    eng = Engine(art, backend="reference", num_kv_blocks=64, speculative=spec)
    assert eng.stats()["kv_window_freeing"] is True
    assert eng.spec.proposer.runner.window_freeing is False
    poison_free_blocks(eng)
    prompts = prompts_of([26, 19], seed=23)
    for i, p in enumerate(prompts):
        eng.add_request(f"d{i}", p, SamplingParams(max_tokens=12, ignore_eos=True))
    outs = eng.run_to_completion()
    for i, p in enumerate(prompts):
        assert outs[f"d{i}"].token_ids == _greedy_hf(store, case, p, 12), f"request {i}"
    s = eng.stats()
    assert s["spec_decode_num_accepted_tokens"] == s["spec_decode_num_draft_tokens"] > 0


def test_shared_pool_is_one_memory_of_the_separate_pools_bytes(store):
    """Gemma 3's groups (cut to one layer each) share one pool: the bytes the separate
    pools would take (so `num_kv_blocks` still sizes the memory), as pages every group's
    layers view: block b of one group is the same memory as block b of another."""
    from braze.runtime.hybrid_cache import group_pool_blocks
    eng = Engine(_artifact(store, "gemma3-sandwich-softcap", 0), backend="reference",
                 num_kv_blocks=96)
    r, cache = eng.runner, eng.runner.executor.cache
    names = [cache.group_names(g.layers) for g in r.kv_groups]
    assert len(names) == 3 and r.kv_shared
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in cache.tensors.values()}
    assert len(storages) == 2           # k and v slots; each group's layer views both
    separate = group_pool_blocks(r.kv_groups, 96, BS, r.max_num_seqs, r.max_num_tokens, True)
    want = sum(n * cache.bytes_per_block_of(grp) for grp, n in zip(names, separate))
    page = cache.page_bytes(names)
    assert want - page < sum(storages.values()) <= want
    assert eng.stats()["kv_blocks_total"] == sum(storages.values()) // page - 1  # null block
    k1, k2 = cache.tensors[names[1][0]], cache.tensors[names[2][0]]
    assert k1.is_contiguous() and k1.shape == k2.shape
    k1[5].fill_(3.0)
    assert (k2[5] == 3.0).all() and (k2[4] == 0).all()
    assert (cache.tensors[names[0][1]] == 0).all()      # v slot untouched


def _storage_bytes(cache) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in cache.tensors.values()}.values())


def test_shared_pool_keeps_more_prefixes_than_separate_pools_on_the_same_memory(store,
                                                                              monkeypatch):
    """The engine with Gemma 3's groups in one pool and (forced) in separate pools of the
    same bytes: after a stream of short prompts, the shared pool still holds more of them
    whole (the separate window pools ran out while the full pool had room), and the
    outputs are transformers' either way."""
    from braze.runtime import hybrid_cache
    art = _artifact(store, "gemma3-sandwich-softcap", 0)
    prompts = prompts_of([9] * 26, seed=31)
    kept, sizes = {}, {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(hybrid_cache, "MAX_SHARED_WASTE", -1.0)
        # separate: a full pool of 64 blocks and window pools of 30 (for 4 sequences)
        eng = Engine(art, backend="reference", num_kv_blocks=64)
        assert eng.stats()["kv_shared_pool"] is shared
        poison_free_blocks(eng)
        for i, p in enumerate(prompts):
            eng.add_request(f"q{i}", p, SamplingParams(max_tokens=1, ignore_eos=True))
            out = eng.run_to_completion([f"q{i}"])[f"q{i}"]
            if i % 8 == 0:
                assert out.token_ids == _greedy_hf(store, "gemma3-sandwich-softcap", p, 1)
        bm = eng.block_manager
        kept[shared] = sum(bm.cached_prefix_blocks(p + [0]) == 2 for p in prompts)
        sizes[shared] = _storage_bytes(eng.runner.executor.cache)
    page = eng.runner.executor.cache.bytes_per_block_of(
        eng.runner.executor.cache.group_names(eng.runner.kv_groups[0].layers))
    assert sizes[False] - page < sizes[True] <= sizes[False]
    assert kept[True] > kept[False] > 0
    print("prefixes kept: shared", kept[True], "separate", kept[False])
