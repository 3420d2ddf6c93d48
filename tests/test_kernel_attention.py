"""The paged attention kernels (attention, paged_attention) against the reference op (Triton
interpreter): mixed prefill + decode batches over shuffled block tables with padding tokens,
GQA 4:2 and 6:2, head_dim 16 and 24, sliding window on/off, the split-KV decode path and its
reduction, strided q; on real -O2 model graphs; and their cubins at real model sizes."""

from __future__ import annotations

import pytest
import torch

from braze.codegen.kernels import attention as attn_mod
from braze.ir import MB, NB, Graph, S, T, TensorType
from braze.ir.types import torch_dtype
from kernel_helpers import aot_compile_node, check_kernels, lower_node
from pass_helpers import model_step_feeds, o2_model_graph, step_sizes

# f32: fp32 everywhere, only the summation order differs. f16: p is rounded to f16 for the
# p @ v product (as in FlashAttention) and the output once more: a couple of f16 ulps.
TOL = {"f32": dict(atol=1e-5, rtol=1e-5), "f16": dict(atol=2e-3, rtol=2e-3)}


def _graph(op, hq, hkv, d, block_size, dtype, window=0, causal=True, strided=False, softcap=0.0):
    """One attention node over a paged cache; `strided` takes q as a column view of a wide
    [T, (hq + 2 hkv) * d + 3] matrix, as the merged QKV GEMM output produces it."""
    g = Graph(op)
    if strided:
        qkv = g.add_input("qkv", TensorType((T, (hq + 2 * hkv) * d + 3), dtype))
        parts = g.add_node("split", [qkv], {"sizes": [hq * d, 2 * hkv * d + 3], "dim": -1}).results
        q = g.op("reshape", parts[0], shape=[-1, hq, d])
    else:
        q = g.add_input("q", TensorType((T, hq, d), dtype))
    kc = g.add_input("k_cache", TensorType((NB, block_size, hkv, d), dtype))
    vc = g.add_input("v_cache", TensorType((NB, block_size, hkv, d), dtype))
    qsl = g.add_input("query_start_loc", TensorType((S + 1,), "i32"))
    lens = g.add_input("seq_lens", TensorType((S,), "i32"))
    tables = g.add_input("block_tables", TensorType((S, MB), "i32"))
    attrs = dict(scale=d ** -0.5, sliding_window=window, causal=causal)
    if softcap:
        attrs["softcap"] = softcap
    if op == "attention":
        attrs.update(num_heads=hq, num_kv_heads=hkv, head_dim=d)
    g.set_output("o", g.op(op, q, kc, vc, qsl, lens, tables, **attrs))
    return g


def _step(g, seqs, pad, seed):
    """Feeds for sequences [(cached, new), ...] plus `pad` padding tokens: each sequence's
    blocks are a random (shuffled) choice of the cache's blocks, the table has a spare
    column of garbage, and the cache holds noise everywhere."""
    gen = torch.Generator().manual_seed(seed)
    kc = g.input("k_cache").type
    block_size, hkv, d = kc.shape[1:]
    dt = torch_dtype(kc.dtype)
    need = [-(-(c + n) // block_size) for c, n in seqs]
    width = max(need) + 1
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.randint(0, num_blocks, (len(seqs), width), generator=gen, dtype=torch.int32)
    qsl, used = [0], 0
    for s, ((c, n), k) in enumerate(zip(seqs, need)):
        tables[s, :k] = perm[used:used + k]
        used += k
        qsl.append(qsl[-1] + n)
    tokens = qsl[-1] + pad
    feeds = {"k_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dt),
             "v_cache": torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dt),
             "query_start_loc": torch.tensor(qsl, dtype=torch.int32),
             "seq_lens": torch.tensor([c + n for c, n in seqs], dtype=torch.int32),
             "block_tables": tables}
    for v in g.inputs:
        if v.name in ("q", "qkv"):
            feeds[v.name] = torch.randn(v.type.concrete_shape({"T": tokens}), generator=gen).to(dt)
    return feeds, {"T": tokens, "S": len(seqs), "MB": width}


def _check(g, seqs, pad, seed, dtype):
    feeds, sizes = _step(g, seqs, pad, seed)
    check_kernels(g, feeds, {}, {g.nodes[-1].op}, sizes, **TOL[dtype])


# Batches as (cached, new) per sequence. With head_dim <= 32 the key tile is 16, so a decode
# over 30+ cached keys splits (split-KV + reduction) while short ones write directly.
BATCHES = {
    # T = 1: one decode, two splits
    "decode": ([(29, 1)], 0),
    # T = 3: a one-token fresh prompt, a decode, a padding token
    "tiny": ([(0, 1), (17, 1)], 1),
    # T = 17 + 3 padding: fresh prefill, a chunk after a cached prefix, a decode, and a
    # sequence with no new tokens this step
    "mixed": ([(0, 11), (23, 3), (40, 1), (3, 0)], 3),
    # a prefill spanning two query tiles after a cached prefix, and a long decode
    "long": ([(5, 35), (50, 1)], 4),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("hq,hkv,d,block_size,window", [(4, 2, 16, 4, 0), (6, 2, 24, 16, 6)])
def test_attention_matches_reference(batch, dtype, hq, hkv, d, block_size, window):
    seqs, pad = BATCHES[batch]
    _check(_graph("attention", hq, hkv, d, block_size, dtype, window), seqs, pad,
           seed=len(batch) + hq, dtype=dtype)


@pytest.mark.parametrize("hq,hkv,d,block_size,window", [(4, 2, 16, 16, 5), (6, 2, 24, 4, 0)])
def test_paged_attention_strided_q(hq, hkv, d, block_size, window):
    g = _graph("paged_attention", hq, hkv, d, block_size, "f32", window, strided=True)
    _check(g, *BATCHES["mixed"], seed=3, dtype="f32")


@pytest.mark.parametrize("window", [0, 7])
def test_non_causal_and_mha(window):
    g = _graph("attention", 3, 3, 16, 4, "f32", window, causal=False)   # group 1: 16 tokens / tile
    _check(g, [(0, 18), (12, 5), (30, 1)], 2, seed=5, dtype="f32")


@pytest.mark.parametrize("batch", ["decode", "mixed", "long"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("window", [0, 6])
def test_soft_capped_attention_matches_reference(batch, dtype, window):
    """Scores C * tanh(s / C) (Gemma's attn_logit_softcapping), with a cap small enough
    (scores of these random q, k reach ~3) that it changes the result."""
    seqs, pad = BATCHES[batch]
    g = _graph("attention", 4, 2, 16, 4, dtype, window, softcap=1.5)
    _check(g, seqs, pad, seed=7 + len(batch), dtype=dtype)


def test_launch_plan_depends_only_on_step_sizes():
    """Two launches (the decode path combines its own splits) whose grids are expressions
    of T, S, MB only; constant workspaces, the split arrival counts kept zeroed."""
    import ast

    from braze.launch import compile_expr
    g = _graph("attention", 32, 8, 128, 16, "bf16")
    launches, workspaces, _ = lower_node(g, 0)
    assert [ln["fn"] for ln in launches] == ["attn_fwd_kernel", "attn_fwd_kernel"]
    assert [name for name, w in workspaces.items() if w.get("zero")] == ["ws.0.arrived"]
    for ln in launches:
        for e in ln["grid"]:
            names = {n.id for n in ast.walk(ast.parse(str(e))) if isinstance(n, ast.Name)}
            assert names <= {"T", "S", "MB", "cdiv", "min", "max"}, e
    assert all(all(str(d).isdigit() for d in w["shape"]) for w in workspaces.values())
    splits = compile_expr(launches[0]["grid"][2])
    # a small decode batch spreads over ~TARGET programs, a large one gets no split at all
    assert splits({"S": 1, "T": 1, "MB": 512}) == attn_mod.plan(32, 8, 128, "bf16")["NUM_SPLITS"]
    assert splits({"S": 256, "T": 256, "MB": 512}) == 1
    assert splits({"S": 1, "T": 1, "MB": 2}) == 1          # 32 keys: one key tile
    prefill_tiles = compile_expr(launches[1]["grid"][0])
    assert prefill_tiles({"T": 8192, "S": 4, "MB": 512}) == 8192 // 16 + 4


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("hq,hkv,d,block_size,window", [(4, 2, 16, 4, 0), (6, 2, 24, 16, 6)])
def test_a_decode_step_padded_to_t_equals_s_needs_no_prefill_path(dtype, hq, hkv, d,
                                                                  block_size, window):
    """A decode-only step padded to T == S (token s of sequence s) runs without the launches
    marked decode_idle (the prefill path): the decode path alone gives the reference's
    output, splits and all, and zeroes the padding tokens' rows, which start as NaN here as
    stale memory would on a GPU."""
    from braze.ir import run_graph
    from braze.kernel_modules import KernelModules
    from braze.runtime.launcher import PlanRunner
    from kernel_helpers import KERNEL_DIR
    g = _graph("attention", hq, hkv, d, block_size, dtype, window)
    # two decodes (one long enough to split its keys), two padding sequences and tokens
    feeds, sizes = _step(g, [(29, 1), (5, 1), (0, 0), (0, 0)], pad=2, seed=hq)
    assert sizes["T"] == sizes["S"] == 4
    want = run_graph(g, {k: v.clone() for k, v in feeds.items()}, {})["o"]
    launches, workspaces, sources = lower_node(g, 0)
    idle = [ln for ln in launches if ln.get("decode_idle")]
    assert [ln["constexprs"]["SHORT"] for ln in idle] == [False]      # the prefill path only
    modules = KernelModules(KERNEL_DIR, interpret=True)
    modules.sources.update(sources)
    runner = PlanRunner(modules, workspaces, device="cpu")
    env = {v.ref: feeds[v.name] for v in g.inputs}
    out = g.nodes[0].results[0]
    env[out.ref] = torch.full(want.shape, float("nan"), dtype=want.dtype)
    for launch in launches:
        if not launch.get("decode_idle"):
            runner.run(launch, env, sizes)
    got = env[out.ref]
    assert torch.equal(got[2:], torch.zeros_like(got[2:]))
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_attention_on_o2_model_graph(tmp_path, family):
    """Every attention of a real -O2 graph (mistral: sliding window 8, qwen3: head_dim 24)
    in a step mixing a fresh prefill, a chunk after a cached prefix and a decode."""
    g, params = o2_model_graph(family, tmp_path)
    assert g.op_counts().get("attention")
    prompts = (tuple(range(3, 23)), tuple(range(40, 53)), tuple(range(7, 37)))
    feeds = model_step_feeds(g, prompts=prompts, cached=(0, 9, 29), num_blocks=8)
    sizes = {**step_sizes(feeds), "MB": feeds["block_tables"].shape[1]}
    check_kernels(g, feeds, params, {"attention"}, sizes, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("hq,hkv,window", [(32, 8, 0), (32, 4, 0)],
                         ids=["llama3-8b", "qwen3-30b-a3b"])
def test_attention_compiles_for_sm80_and_sm90(hq, hkv, window):
    kernels = aot_compile_node(_graph("attention", hq, hkv, 128, 16, "bf16", window), 0)
    assert len(kernels) == 4 and all(k.asm.get("cubin") for k in kernels)
    assert all(k.metadata.shared <= 100 * 1024 for k in kernels)


@pytest.mark.parametrize("hq,hkv,d,window,softcap", [(8, 4, 256, 1024, 0.0), (32, 16, 128, 4096, 50.0)],
                         ids=["gemma3-4b", "gemma3-27b-softcapped"])
def test_gemma3_attention_compiles_for_sm80_and_sm90(hq, hkv, d, window, softcap):
    kernels = aot_compile_node(_graph("attention", hq, hkv, d, 16, "bf16", window,
                                      softcap=softcap), 0)
    assert len(kernels) == 4 and all(k.asm.get("cubin") for k in kernels)
    assert all(k.metadata.shared <= 163 * 1024 for k in kernels)
