"""CUDA-graph segments on a GPU (pytest -m gpu): for every batch bucket the captured graphs
replay what the same launch plans compute eagerly; modes none / piecewise / full agree;
capture time and graph-pool memory are printed (run with -s to see them).

The checks are written against a backend name so the same code also runs on the CPU
under the Triton interpreter (`run_checks("interpret", ...)`), where it exercises the
bound plans without graphs; the tests here run it on "cuda".
"""

from __future__ import annotations

import random

import pytest
import torch

from braze.ir import run_graph
from braze.runtime import Executor, open_artifact
from braze.ir.contract import SeqChunk, build_step
from braze.ir.contract import default_buckets
from braze.runtime.graph_runner import GraphRunner, segments_for
from braze.runtime.input_batch import static_buffers as runtime_static_buffers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BUCKETS = [1, 2, 4, 8, 16, 24, 32]
MAX_T, MAX_S, NUM_BLOCKS = 32, 8, 64
OPTIONS = {"opt_level": 2, "max_num_tokens": MAX_T, "max_num_seqs": MAX_S, "max_model_len": 128}


def static_buffers(ex, max_t, max_s):
    return runtime_static_buffers(max_t, max_s, ex.max_blocks, ex.device)


def make_step(rng: random.Random, num_tokens: int, max_seqs: int, block_size: int,
              num_blocks: int, decode_only: bool = False) -> list[SeqChunk]:
    """Decodes over random-length cached contexts plus (unless decode_only) one prefill
    chunk, possibly after a cached prefix, taking the remaining tokens; each sequence
    gets its own shuffled blocks."""
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    s = num_tokens if decode_only else min(max_seqs, num_tokens, 3)
    chunks = []
    for i in range(s):
        n = 1 if (decode_only or i < s - 1) else num_tokens - (s - 1)
        computed = rng.randint(1 if n == 1 else 0, 40)
        need = -(-(computed + n) // block_size)
        table, blocks = blocks[:need], blocks[need:]
        chunks.append(SeqChunk([rng.randint(3, 200) for _ in range(n)], computed, table))
    return chunks


def steps_for_bucket(rng, runner, T: int, block_size: int, num_blocks: int):
    """A full step and a padded one (just above the previous bucket), both in bucket T."""
    i = runner.buckets.index(T)
    sizes = {T, (runner.buckets[i - 1] + 1) if i else T}
    return [make_step(rng, n, runner.max_num_seqs, block_size, num_blocks) for n in sorted(sizes)]


def fill_cache(ex, seed):
    g = torch.Generator(device=ex.device).manual_seed(seed)
    for t in ex.cache.tensors.values():
        t.copy_(torch.randn(t.shape, generator=g, device=ex.device).to(t.dtype))


def replay(runner, ex, chunks, decode_only=False):
    n, s = runner.write_step(build_step(chunks, ex.block_size, ex.max_blocks, device=ex.device))
    out = runner.run(n, s, decode_only=decode_only)
    if ex.logits_pruned:
        return out[:s].clone()
    return out.index_select(0, runner.static["logits_indices"][:s]).clone()


def eager(ex, chunks, cache):
    """The same launch plans run eagerly (PlanExecutor.run), on their own copy of the cache."""
    feeds = build_step(chunks, ex.block_size, ex.max_blocks, device=ex.device)
    feeds.update(cache)
    logits = ex.plan.run(feeds)["logits"] if ex.plan is not None else \
        run_graph(ex.graph, feeds, ex.params)["logits"]
    return logits if ex.logits_pruned else logits.index_select(0, feeds["logits_indices"])


def check_every_bucket(ex, buckets, atol, rtol, mode="piecewise", seed=0):
    rng = random.Random(seed)
    max_t = buckets[-1] if buckets else MAX_T
    runner = GraphRunner(ex, static_buffers(ex, max_t, MAX_S), buckets, MAX_S, mode=mode,
                         debug=True)
    runner.capture(progress=print)
    st = runner.stats
    print(f"\n[{ex.backend} {mode}] {st['cuda_graphs_captured']} graphs for buckets "
          f"{st['buckets']} in {st['capture_seconds']:.2f}s, pool {st['capture_bytes'] / 2**20:.1f} MiB")
    for T in runner.buckets:
        fill_cache(ex, seed=T)
        ref_cache = {k: v.clone() for k, v in ex.cache.tensors.items()}
        for chunks in steps_for_bucket(rng, runner, T, ex.block_size, ex.cache.num_blocks):
            n = sum(len(c.token_ids) for c in chunks)
            assert runner.bucket_for(n, len(chunks))[0] == T
            got = replay(runner, ex, chunks)
            want = eager(ex, chunks, ref_cache)
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol,
                                       msg=lambda m, T=T, n=n: f"bucket {T}, {n} tokens: {m}")
        for name, t in ex.cache.tensors.items():
            torch.testing.assert_close(t.float(), ref_cache[name].float(), atol=atol, rtol=rtol,
                                       msg=lambda m, T=T, name=name: f"bucket {T} cache {name}: {m}")
    return runner


def check_modes_agree(ex, buckets, atol, rtol, seed=1):
    rng = random.Random(seed)
    mixed = {T: steps_for_bucket(rng, GraphRunner(ex, static_buffers(ex, buckets[-1], MAX_S),
                                                  buckets, MAX_S), T, ex.block_size,
                                 ex.cache.num_blocks)[-1] for T in buckets}
    decode = {n: make_step(rng, n, MAX_S, ex.block_size, ex.cache.num_blocks, decode_only=True)
              for n in range(1, MAX_S + 1)}
    results, runners = {}, {}
    for mode in ("none", "piecewise", "full"):
        runner = GraphRunner(ex, static_buffers(ex, buckets[-1], MAX_S), buckets, MAX_S, mode=mode)
        runner.capture()
        st = runner.stats
        print(f"\n[{ex.backend} {mode}] {st['cuda_graphs_captured']} graphs, "
              f"{st['capture_seconds']:.2f}s, pool {st['capture_bytes'] / 2**20:.1f} MiB")
        out = {}
        for T, chunks in mixed.items():
            fill_cache(ex, seed=T)
            out[("mixed", T)] = replay(runner, ex, chunks)
            assert runner.last_variant == {"none": "eager", "piecewise": "piecewise",
                                           "full": "full"}[mode]
        for n, chunks in decode.items():
            fill_cache(ex, seed=100 + n)
            out[("decode", n)] = replay(runner, ex, chunks, decode_only=True)
            assert runner.last_variant == {"none": "eager", "piecewise": "piecewise",
                                           "full": "full"}[mode]
        results[mode], runners[mode] = out, runner
        del runner
    for mode in ("none", "full"):
        for key, want in results["piecewise"].items():
            torch.testing.assert_close(results[mode][key].float(), want.float(), atol=atol,
                                       rtol=rtol, msg=lambda m, mode=mode, key=key: f"{mode} {key}: {m}")
    if ex.backend == "cuda":
        pieces = sum(1 for s in segments_for(ex.graph, "piecewise") if s[0] == "graph")
        # full: one whole-step graph per bucket for any batch, and one more for decode-only
        # steps where the bucket has T == S (it leaves out attention's prefill path)
        decode_variants = sum(1 for T in buckets if runners["full"].bucket_for(T, T) == (T, T))
        assert runners["none"].stats["cuda_graphs_captured"] == 0
        assert runners["piecewise"].stats["cuda_graphs_captured"] == pieces * len(buckets)
        assert runners["full"].stats["cuda_graphs_captured"] == len(buckets) + decode_variants


@pytest.fixture(scope="module")
def f32(store):
    return Executor(open_artifact(store.artifact("llama", **OPTIONS)), backend="cuda",
                    num_blocks=NUM_BLOCKS)


def test_every_bucket_graph_replay_equals_eager(f32):
    check_every_bucket(f32, BUCKETS, atol=1e-4, rtol=1e-4)


def test_modes_agree(f32):
    check_modes_agree(f32, BUCKETS, atol=1e-5, rtol=1e-5)


def test_default_buckets_capture(f32):
    """buckets=None: the default list up to max_num_tokens, captured and replayed."""
    runner = check_every_bucket(f32, None, atol=1e-4, rtol=1e-4, seed=3)
    assert runner.buckets == default_buckets(MAX_T)
    assert runner.stats["cuda_graphs_captured"] > 0 and runner.stats["capture_bytes"] >= 0


@pytest.mark.parametrize("case", ["llama", "qwen3_moe-dense-middle"])
def test_bf16_cubins_in_graphs_equal_eager(store, case):
    """bf16 artifacts compiled on this machine launch every kernel from the stored cubins
    (Triton's JIT never runs: our counts and Triton's own compile hook both say so), and
    replay inside graphs like they run eagerly."""
    from conftest import count_triton_jit
    art = open_artifact(store.artifact(case, dtype="bfloat16", targets="sm_80,sm_90", **OPTIONS))
    ex = Executor(art, backend="cuda", num_blocks=NUM_BLOCKS)
    cubins = ex.plan.runner.cubins
    assert cubins.usable, cubins.reason
    with count_triton_jit() as jit:
        check_every_bucket(ex, BUCKETS, atol=2e-2, rtol=2e-2, mode="piecewise")
        check_modes_agree(ex, [1, 2, 4, 8], atol=2e-2, rtol=2e-2)
    st = ex.kernel_stats()
    print(f"\n{case}: {st}")
    assert st["kernels_jit"] == 0 and st["kernels_cubin"] > 0, st
    assert jit == [], f"Triton JIT-compiled {len(jit)} kernels: {jit[:5]}"


@pytest.mark.parametrize("opt_level", [0, 1])
def test_o0_o1_plans_capture_and_replay_like_eager(store, opt_level):
    """-O0/-O1 keep cache_write as an extern torch call inside the captured segments: its
    torch form must capture (no host sync, ir/op_attention.py) and replay like the eager plan
    in every mode."""
    ex = Executor(open_artifact(store.artifact("llama", **dict(OPTIONS, opt_level=opt_level))),
                  backend="cuda", num_blocks=NUM_BLOCKS)
    check_every_bucket(ex, [1, 2, 4, 8], atol=1e-4, rtol=1e-4)
    check_modes_agree(ex, [1, 2, 4, 8], atol=1e-5, rtol=1e-5)


def check_small_m_gemm(store, backend, dtype, atol, rtol, buckets=(1, 16, 24)):
    """--small-m-gemm triton: buckets T <= 16 bind the skinny GEMM, larger ones cuBLAS; each
    bucket's replay equals the same plans run eagerly; the logits stay within a rounding of
    the extern artifact's."""
    opts = dict(OPTIONS, dtype=dtype)
    ex = Executor(open_artifact(store.artifact("llama", small_m_gemm="triton", **opts)),
                  backend=backend, num_blocks=NUM_BLOCKS)
    runner = check_every_bucket(ex, list(buckets), atol=atol, rtol=rtol)
    for T in runner.buckets:
        names = [c.name for c in runner._buckets[T].plan.calls]
        assert any("skinny_gemm" in n for n in names) == (T <= 16), (T, names)
        assert ("extern.linear" in names) == (T > 16), (T, names)
    plain = Executor(open_artifact(store.artifact("llama", **opts)), backend=backend,
                     num_blocks=NUM_BLOCKS)
    rng = random.Random(5)
    for n in (1, 5, 16, 20):
        chunks = make_step(rng, n, MAX_S, ex.block_size, NUM_BLOCKS)
        got = []
        for e in (ex, plain):
            fill_cache(e, seed=n)
            got.append(eager(e, chunks, e.cache.tensors).float())
        torch.testing.assert_close(got[0], got[1], atol=atol, rtol=rtol,
                                   msg=lambda m, n=n: f"{n} tokens: {m}")


def test_small_m_gemm_bf16_in_graphs(store):
    check_small_m_gemm(store, "cuda", "bfloat16", atol=5e-2, rtol=5e-2)
