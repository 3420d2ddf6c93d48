"""The fused MoE kernels (codegen/kernels/moe.py) against the reference op, and their cubins.

Numerics run under the Triton interpreter: float32 within 1e-5 (only the GEMMs' summation
order differs from torch's), float16 within a couple of ulp (the kernels round at the same
points as the reference, and in practice agree bit for bit).
"""

from __future__ import annotations

import random

import pytest
import torch

from braze.ir import Graph, T, TensorType, run_graph
from braze.launch import compile_expr
from kernel_helpers import aot_compile_node, check_kernels, lower_node, run_with_kernels
from pass_helpers import model_step_feeds, o2_model_graph, step_sizes

import braze.codegen.kernels.moe as moe

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = {"f32": {"atol": 1e-5, "rtol": 1e-5}, "f16": {"atol": 2e-3, "rtol": 2e-3}}


def _graph(e, h, i, k, renorm, act, dtype, strided=False, gemma=False):
    g = Graph("moe")
    if strided:      # x is a column slice of a wider activation (row stride h + 24)
        xx = g.add_input("x", TensorType((T, h + 24), dtype))
        x = g.op("slice", xx, dim=1, start=8, end=8 + h)
    else:
        x = g.add_input("x", TensorType((T, h), dtype))
    r = g.add_param("router", TensorType((e, h), dtype))
    gu = g.add_param("w_gate_up", TensorType((e, 2 * i, h), dtype))
    d = g.add_param("w_down", TensorType((e, h, i), dtype))
    extra = []
    if gemma:        # Gemma 4: the router reads its own input and scales each expert's weight
        extra = [g.add_input("rx", TensorType((T, h), dtype)),
                 g.add_param("expert_scale", TensorType((e,), dtype))]
    g.set_output("y", g.op("fused_moe", x, r, gu, d, *extra, top_k=k, renormalize=renorm,
                           act=act))
    return g


def _values(g, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    x = g.inputs[0]
    dt = DT[x.type.dtype]
    p = {n: v.type.shape for n, v in g.params.items()}
    feeds = {"x": torch.randn(tokens, x.type.shape[1], generator=gen).to(dt)}
    scaled = lambda shape: (torch.randn(shape, generator=gen) / shape[2] ** 0.5).to(dt)
    params = {"router": torch.randn(p["router"], generator=gen).to(dt),
              "w_gate_up": scaled(p["w_gate_up"]), "w_down": scaled(p["w_down"])}
    if "expert_scale" in p:
        feeds["rx"] = torch.randn(tokens, x.type.shape[1], generator=gen).to(dt)
        params["expert_scale"] = (0.5 + torch.rand(p["expert_scale"], generator=gen)).to(dt)
    return feeds, params


CASES = [   # tokens, experts, top_k, hidden, inter, renormalize, act
    (1, 4, 1, 64, 32, False, "silu"),
    (3, 6, 2, 40, 24, True, "gelu"),
    (17, 4, 4, 64, 24, True, "gelu_tanh"),      # top_k = E
    (17, 6, 2, 40, 32, False, "relu"),
    (3, 6, 6, 64, 32, False, "silu"),            # top_k = E
    (17, 6, 2, 64, 32, True, "silu"),
]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("tokens, e, k, h, i, renorm, act", CASES)
def test_matches_reference(tokens, e, k, h, i, renorm, act, dtype):
    g = _graph(e, h, i, k, renorm, act, dtype)
    feeds, params = _values(g, tokens, seed=tokens * 31 + e * 7 + k)
    check_kernels(g, feeds, params, {"fused_moe"}, {"T": tokens}, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("tokens, e, k", [(5, 4, 2), (17, 6, 3)])
def test_gemma4_router_input_and_expert_scale(tokens, e, k, dtype):
    """Routing on router_x, not x, and each weight times its expert's scale: the kernels
    agree with the reference, and the reference differs from routing on x unscaled."""
    g = _graph(e, 40, 24, k, True, "gelu_tanh", dtype, gemma=True)
    feeds, params = _values(g, tokens, seed=tokens + e)
    check_kernels(g, feeds, params, {"fused_moe"}, {"T": tokens}, **TOL[dtype])
    plain = _graph(e, 40, 24, k, True, "gelu_tanh", dtype)
    without = {n: v for n, v in feeds.items() if n != "rx"}
    assert not torch.allclose(run_graph(g, feeds, params)["y"],
                              run_graph(plain, without, params)["y"])


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_strided_input(dtype):
    g = _graph(6, 40, 24, 2, True, "silu", dtype, strided=True)
    feeds, params = _values(g, 5, seed=4)
    check_kernels(g, feeds, params, {"fused_moe"}, {"T": 5}, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("tokens, e, k", [(17, 6, 3), (40, 4, 2)])
def test_large_tile_regime(tokens, e, k, dtype, monkeypatch):
    """The prefill launches (BLOCK_M 64, grouped tile order), forced for a small T."""
    monkeypatch.setattr(moe, "SMALL_ROWS_PER_EXPERT", 0)
    g = _graph(e, 40, 24, k, True, "silu", dtype)
    launches, _, _ = lower_node(g, 0)
    active = {l["constexprs"].get("BLOCK_M") for l in launches
              if all(compile_expr(d)({"T": tokens}) for d in l["grid"])}
    assert active == {64, None}
    feeds, params = _values(g, tokens, seed=tokens)
    check_kernels(g, feeds, params, {"fused_moe"}, {"T": tokens}, **TOL[dtype])


def test_one_hot_expert_gets_every_token():
    """All tokens routed to one expert: its run spans several BLOCK_M tiles."""
    g = _graph(4, 64, 32, 1, False, "silu", "f32")
    feeds, params = _values(g, 40, seed=5)
    feeds["x"][:, 0] = 4.0                      # a constant feature that only expert 2 reads
    params["router"][:, 0] = 0.0
    params["router"][2, 0] = 20.0
    ids = torch.softmax(feeds["x"] @ params["router"].T, -1).argmax(-1)
    assert (ids == 2).all()
    check_kernels(g, feeds, params, {"fused_moe"}, {"T": 40}, **TOL["f32"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # numpy, on the NaN row
def test_nan_token_stays_in_its_row():
    """A garbage (NaN) token must still route to valid experts and not touch other rows."""
    g = _graph(6, 40, 24, 2, True, "silu", "f32")
    feeds, params = _values(g, 5, seed=6)
    feeds["x"][2] = float("nan")
    want = run_graph(g, {k: v.clone() for k, v in feeds.items()}, params)["y"]
    got = run_with_kernels(g, {k: v.clone() for k, v in feeds.items()}, params, {"fused_moe"},
                           {"T": 5})["y"]
    assert got[2].isnan().all()
    rows = [0, 1, 3, 4]
    torch.testing.assert_close(got[rows], want[rows], **TOL["f32"])


# -- the static plan: grids and workspaces depend on T only, and are large enough ------------

def test_plan_grids_and_worst_case_bounds():
    e, k = 6, 2
    launches, workspaces, _ = lower_node(_graph(e, 40, 24, k, True, "silu", "f32"), 0)
    limit = moe.SMALL_ROWS_PER_EXPERT * e // k
    rng = random.Random(0)
    for tokens in [1, 2, 3, 17, limit, limit + 1, 300]:
        sizes = {"T": tokens}
        on = [l for l in launches if all(compile_expr(d)(sizes) for d in l["grid"])]
        bms = {l["constexprs"]["BLOCK_M"] for l in on if "BLOCK_M" in l["constexprs"]}
        assert bms == {16 if tokens <= limit else 64}, (tokens, bms)      # one regime per T
        assert len(on) == 6
        rows = compile_expr(workspaces["ws.0.sorted_ids"]["shape"][0])(sizes)
        for l in on:
            if l["fn"] not in ("moe_gate_up_kernel", "moe_down_kernel"):
                continue
            bm = l["constexprs"]["BLOCK_M"]
            max_tiles = compile_expr(l["args"][5]["expr"])(sizes)
            for trial in range(20):      # random and adversarial routings fit the static plan
                counts = [0] * e
                for _ in range(tokens):
                    for ex in (rng.sample(range(e), k) if trial else range(k)):
                        counts[ex] += 1
                tiles = sum(-(-c // bm) for c in counts)
                assert tiles <= max_tiles and tiles * bm <= rows


# -- real -O2 graphs -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_o2_model_graphs(family, tmp_path_factory):
    g, params = o2_model_graph(family, tmp_path_factory.mktemp(family))
    assert any(n.op == "fused_moe" for n in g.nodes)
    feeds = model_step_feeds(g, cached=(0, 2))
    check_kernels(g, feeds, params, {"fused_moe"}, step_sizes(feeds), atol=1e-5, rtol=1e-5)


def test_o2_qwen3_moe_float16(tmp_path):
    g, params = o2_model_graph("qwen3_moe", tmp_path, seed=2, dtype="float16")
    feeds = model_step_feeds(g, cached=(0, 2))
    check_kernels(g, feeds, params, {"fused_moe"}, step_sizes(feeds), atol=2e-3, rtol=2e-3)


# -- cubins at real sizes --------------------------------------------------------------------

A100_SHARED = 166912      # bytes of shared memory one block may use: sm_80 (163 KB)
H100_SHARED = 232448      # sm_90 (227 KB)


def _specialised(launch, target):
    """The variant Triton's JIT builds on a GPU for 16-byte aligned pointers and strides (the
    plain AOT build assumes no alignment of strides, so it neither vectorises nor pipelines
    loads)."""
    from braze.codegen.aot import compile_launch, kernel_fn
    from kernel_helpers import KERNEL_DIR
    fn = kernel_fn(KERNEL_DIR, launch)
    runtime = [n for n in fn.arg_names if n not in launch["constexprs"]]
    key = "".join("D" if a["ty"].startswith("*") or n.startswith("stride") else "-"
                  for n, a in zip(runtime, launch["args"]))
    return compile_launch(KERNEL_DIR, launch, target, key=key)


@pytest.mark.parametrize("shape", [(128, 2048, 768, 8), (8, 4096, 14336, 2),
                                   (128, 2816, 704, 8, "gemma")],
                         ids=["qwen3-30b-a3b", "mixtral-8x7b", "gemma4-26b-a4b"])
def test_compiles_bf16_for_sm80_and_sm90(shape):
    e, h, i, k, *gemma = shape
    g = _graph(e, h, i, k, True, "gelu_tanh" if gemma else "silu", "bf16", gemma=bool(gemma))
    launches, _, _ = lower_node(g, 0)
    kernels = aot_compile_node(g, 0)
    assert len(kernels) == 2 * len(launches) == 2 * 11
    assert all(c.asm.get("cubin") for c in kernels)
    for c in kernels:
        assert c.metadata.shared <= A100_SHARED
    if e != 8:
        return
    # the aligned variants a GPU's JIT builds pipeline the GEMM loads: they must fit too. Their
    # shared memory depends only on the block sizes, which are at their largest at this shape
    for launch in launches:
        if launch["fn"] in ("moe_gate_up_kernel", "moe_down_kernel"):
            for target, limit in (("sm_80", A100_SHARED), ("sm_90", H100_SHARED)):
                c = _specialised(launch, target)
                assert "cp.async" in c.asm["ptx"] and c.metadata.shared <= limit


# -- fused_moe_routed: the graph's own routing (DeepSeek-V3) ------------------------------

def _routed_graph(e, h, i, k, dtype, weight_dtype="f32"):
    """A sigmoid top-k router written as graph ops, then fused_moe_routed over its ids."""
    g = Graph("moe_routed")
    x = g.add_input("x", TensorType((T, h), dtype))
    r = g.add_param("router", TensorType((e, h), weight_dtype))
    scores = g.op("sigmoid", g.op("linear", g.op("cast", x, dtype=weight_dtype), r))
    n = g.add_node("topk", [scores], {"k": k, "dim": -1, "largest": True, "sorted": True})
    ids = n.results[1]
    w = g.op("mul", g.op("gather", scores, ids, dim=1), scalar=2.5)
    gu = g.add_param("w_gate_up", TensorType((e, 2 * i, h), dtype))
    d = g.add_param("w_down", TensorType((e, h, i), dtype))
    g.set_output("y", g.op("fused_moe_routed", x, w, ids, gu, d, act="silu"))
    return g


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("tokens, e, k, h, i", [(1, 8, 2, 64, 16), (17, 6, 3, 40, 24),
                                                (5, 4, 4, 64, 32)])
def test_routed_matches_reference(tokens, e, k, h, i, dtype):
    g = _routed_graph(e, h, i, k, dtype)
    gen = torch.Generator().manual_seed(tokens + e)
    feeds = {"x": torch.randn(tokens, h, generator=gen).to(DT[dtype])}
    params = {"router": torch.randn(e, h, generator=gen),
              "w_gate_up": (torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5).to(DT[dtype]),
              "w_down": (torch.randn(e, h, i, generator=gen) / i ** 0.5).to(DT[dtype])}
    check_kernels(g, feeds, params, {"fused_moe_routed"}, {"T": tokens}, **TOL[dtype])


def test_routed_equals_the_dense_routing_matrix_form():
    """fused_moe_routed's reference == the dense form it replaces: every expert on every
    token, weighted by scatter(zeros, ids, weights)."""
    e, h, i, k, tokens = 6, 32, 16, 2, 9
    g = _routed_graph(e, h, i, k, "f32")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, h, generator=gen)
    router = torch.randn(e, h, generator=gen)
    wg, wu, wd = (torch.randn(e, i, h, generator=gen), torch.randn(e, i, h, generator=gen),
                  torch.randn(e, h, i, generator=gen))
    got = run_graph(g, {"x": x}, {"router": router, "w_gate_up": torch.cat([wg, wu], 1),
                                  "w_down": wd})["y"]
    scores = torch.sigmoid(x @ router.T)
    ids = scores.topk(k, dim=-1)[1]
    routing = torch.zeros_like(scores).scatter(1, ids, scores.gather(1, ids) * 2.5)
    h_all = torch.nn.functional.silu(torch.einsum("th,eih->tei", x, wg)) \
        * torch.einsum("th,eih->tei", x, wu)
    want = torch.einsum("te,teh->th", routing, torch.einsum("tei,ehi->teh", h_all, wd))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(256, 7168, 2048, 8), (8, 64, 16, 2)],
                         ids=["deepseek-v3", "tiny"])
def test_routed_compiles_bf16_for_sm80_and_sm90(shape):
    e, h, i, k = shape
    g = _routed_graph(e, h, i, k, "bf16")
    index = next(n for n, node in enumerate(g.nodes) if node.op == "fused_moe_routed")
    launches, _, _ = lower_node(g, index)
    assert {la["fn"] for la in launches} >= {"moe_zero_counts_kernel", "moe_given_route_kernel"}
    kernels = aot_compile_node(g, index)
    assert len(kernels) == 2 * len(launches) and all(c.asm.get("cubin") for c in kernels)
    assert all(c.metadata.shared <= A100_SHARED for c in kernels)


# -- expert parallelism: local_experts, the rank's expert ids as the last operand -------------

def _ep_graph(e, n, rank, h, i, k, dtype, routed=False, gemma=False):
    """One rank's fused MoE of an n-rank expert-parallel artifact: its e // n experts'
    weights, the ids of those experts, routing over all e."""
    local = e // n
    whole = _routed_graph(e, h, i, k, dtype) if routed else _graph(e, h, i, k, True, "silu",
                                                                   dtype, gemma=gemma)
    g = Graph("moe_ep")
    env = {v: g.add_input(v.name, v.type) for v in whole.inputs}
    for name, p in whole.params.items():
        t = p.type
        if name in ("w_gate_up", "w_down"):
            t = t.with_shape((local,) + t.shape[1:])
        env[p] = g.add_param(name, t)
    ids = g.add_param("ep.experts", TensorType((local,), "i64"))
    for node in whole.nodes:
        attrs = dict(node.attrs)
        operands = [env[v] for v in node.operands]
        if node.op.startswith("fused_moe"):
            operands.append(ids)
            attrs["local_experts"] = local
        new = g.add_node(node.op, operands, attrs)
        env.update(zip(node.results, new.results))
    g.set_output("y", env[whole.outputs["y"]])
    return g, whole


def _ep_values(whole, g, tokens, rank, n, seed):
    gen = torch.Generator().manual_seed(seed)
    feeds = {v.name: torch.randn((tokens,) + v.type.shape[1:], generator=gen).to(DT[v.type.dtype])
             for v in whole.inputs}
    params = {}
    for name, p in whole.params.items():
        dt = torch.float32 if name == "router" else DT[p.type.dtype]
        w = torch.randn(p.type.shape, generator=gen)
        params[name] = (w / p.type.shape[-1] ** 0.5 if p.type.rank == 3 else
                        0.5 + w.abs() if p.type.rank == 1 else w).to(dt)
    if whole.params["router"].type.dtype != "f32" or not any(nd.op == "fused_moe_routed"
                                                              for nd in whole.nodes):
        params["router"] = params["router"].to(DT[whole.params["router"].type.dtype])
    local = params["w_gate_up"].shape[0] // n
    mine = {k: (v[rank * local:(rank + 1) * local] if k in ("w_gate_up", "w_down") else v)
            for k, v in params.items()}
    mine["ep.experts"] = torch.arange(rank * local, (rank + 1) * local)
    return feeds, params, mine


@pytest.mark.parametrize("routed,gemma", [(False, False), (True, False), (False, True)],
                         ids=["softmax", "routed", "gemma4"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_expert_parallel_ranks_match_reference_and_sum_to_the_whole(routed, gemma, dtype):
    """Each rank's kernels (only its experts counted, tiled and computed; other experts'
    slots add 0) agree with the reference of `local_experts`, and the ranks' outputs sum
    to the unsharded MoE."""
    e, n, k, tokens = 8, 4, 3, 17
    total = None
    for rank in range(n):
        g, whole = _ep_graph(e, n, rank, 40, 24, k, dtype, routed=routed, gemma=gemma)
        feeds, params, mine = _ep_values(whole, g, tokens, rank, n, seed=11)
        op = "fused_moe_routed" if routed else "fused_moe"
        check_kernels(g, feeds, mine, {op}, {"T": tokens}, **TOL[dtype])
        part = run_with_kernels(g, {k2: v.clone() for k2, v in feeds.items()}, mine, {op},
                                {"T": tokens})["y"].float()
        total = part if total is None else total + part
    want = run_graph(whole, feeds, params)["y"].float()
    torch.testing.assert_close(total, want, **({"atol": 1e-5, "rtol": 1e-5} if dtype == "f32"
                                               else {"atol": 1e-2, "rtol": 1e-2}))


@pytest.mark.parametrize("routed", [False, True], ids=["softmax", "routed"])
def test_expert_parallel_compiles_bf16_for_sm80_and_sm90(routed):
    """Qwen3-30B-A3B's MoE (128 experts, top 8) at 4 ranks, and DeepSeek-V3's routed one
    (256 experts) at 8: every launch builds a cubin for both targets."""
    e, n, h, i, k = (256, 8, 7168, 2048, 8) if routed else (128, 4, 2048, 768, 8)
    g, _ = _ep_graph(e, n, 0, h, i, k, "bf16", routed=routed)
    index = next(j for j, node in enumerate(g.nodes) if node.op.startswith("fused_moe"))
    launches, workspaces, _ = lower_node(g, index)
    assert all(la["constexprs"].get("EP", True) for la in launches
               if la["fn"] in ("moe_route_kernel", "moe_given_route_kernel", "moe_combine_kernel"))
    counts = next(w for name, w in workspaces.items() if name.endswith(".counts"))
    assert counts["shape"] == [str(e // n)]       # one counter per expert this rank holds
    kernels = aot_compile_node(g, index)
    assert len(kernels) == 2 * len(launches) and all(c.asm.get("cubin") for c in kernels)
    assert all(c.metadata.shared <= A100_SHARED for c in kernels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("routed", [False, True], ids=["softmax", "routed"])
def test_expert_parallel_on_cuda_bf16(routed):
    """The expert-parallel launches JIT-compiled on a GPU, in bfloat16: each of 4 ranks'
    output (computed one after another on this GPU) agrees with the reference, and the four
    sum to the whole MoE."""
    e, n, k, tokens = 16, 4, 4, 50
    total = None
    for rank in range(n):
        g, whole = _ep_graph(e, n, rank, 256, 128, k, "bf16", routed=routed)
        feeds, params, mine = _ep_values(whole, g, tokens, rank, n, seed=7)
        cuda = lambda d: {name: v.to("cuda") for name, v in d.items()}
        op = "fused_moe_routed" if routed else "fused_moe"
        got = run_with_kernels(g, cuda(feeds), cuda(mine), {op}, {"T": tokens},
                               interpret=False)["y"].float()
        want = run_graph(g, cuda(feeds), cuda(mine))["y"].float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        total = got if total is None else total + got
    want = run_graph(whole, cuda(feeds), cuda(params))["y"].float()
    torch.testing.assert_close(total, want, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_router_and_routed_experts_on_cuda_bf16():
    """DeepSeek-V3's MoE on a GPU in bfloat16: the f32 router GEMM, the grouped_topk
    kernel (64 experts in 8 groups, 4 kept, 8 per token) and the routed expert kernels,
    JIT-compiled, against the reference interpreter's torch on the same GPU: the same
    experts, weights and output."""
    e, h, i, k, tokens = 64, 256, 128, 8, 50
    g = Graph("ds_moe")
    x = g.add_input("x", TensorType((T, h), "bf16"))
    r = g.add_param("router", TensorType((e, h), "f32"))
    bias = g.add_param("bias", TensorType((e,), "f32"))
    logits = g.op("linear", g.op("cast", x, dtype="f32"), r)
    w, ids = g.add_node("grouped_topk", [logits, bias],
                        dict(n_group=8, topk_group=4, top_k=k, renormalize=True,
                             scale=2.5)).results
    gu = g.add_param("w_gate_up", TensorType((e, 2 * i, h), "bf16"))
    d = g.add_param("w_down", TensorType((e, h, i), "bf16"))
    g.set_output("y", g.op("fused_moe_routed", x, w, ids, gu, d, act="silu"))
    g.set_output("w", w)
    g.set_output("ids", ids)
    gen = torch.Generator().manual_seed(11)
    feeds = {"x": torch.randn(tokens, h, generator=gen).to(torch.bfloat16).cuda()}
    params = {"router": (torch.randn(e, h, generator=gen) / h ** 0.5).cuda(),
              "bias": (torch.randn(e, generator=gen) * 0.1).cuda(),
              "w_gate_up": (torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5)
              .to(torch.bfloat16).cuda(),
              "w_down": (torch.randn(e, h, i, generator=gen) / i ** 0.5).to(torch.bfloat16).cuda()}
    got = run_with_kernels(g, feeds, params, {"grouped_topk", "fused_moe_routed"},
                           {"T": tokens}, interpret=False)
    want = run_graph(g, feeds, params)
    assert torch.equal(got["ids"], want["ids"])
    torch.testing.assert_close(got["w"], want["w"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["y"].float(), want["y"].float(), atol=2e-2, rtol=2e-2)
