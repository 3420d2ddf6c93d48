"""`linear_glu` (passes/fuse_linear_glu.py, under --small-m-gemm triton): the skinny GEMM
with the gated activation in its epilogue (codegen/kernels/skinny_gemm.py) and the
epilogue on its own after cuBLAS (larger buckets), against torch's F.linear + act * up;
the pass on IR text, its refusals; which families it fuses (tests/test_small_m_gemm.py runs
them against the extern artifacts and transformers); bf16 cubins for sm_80 / sm_90."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.codegen.kernels import skinny_gemm
from braze.codegen.lowering import Lowering
from braze.ir import Graph, T, TensorType, parse_graph, print_graph
from braze.ir.op_linalg import GLU_ACTS
from braze.ir.types import torch_dtype
from braze.passes import PassContext, PassManager
from braze.runtime import open_artifact

from kernel_helpers import KERNEL_DIR

TOL = {"f32": dict(atol=1e-4, rtol=1e-4), "f16": dict(atol=2e-2, rtol=2e-2)}


def _graph(n: int, k: int, dtype: str, bias: bool, act: str) -> Graph:
    g = Graph("glu")
    x = g.add_input("x", TensorType((T, k), dtype))
    ops = [g.add_param("w", TensorType((n, k), dtype))]
    if bias:
        ops.append(g.add_param("b", TensorType((n,), dtype)))
    node = g.add_node("linear_glu", [x, *ops], {"act": act})
    g.set_output("y", node.results[0])
    return g


def _run(g: Graph, lower, feeds: dict, params: dict, m: int, fill_h=None) -> torch.Tensor:
    """The node's launches from `lower(node, L)` through PlanRunner, interpreted."""
    from braze.kernel_modules import KernelModules
    from braze.runtime.launcher import PlanRunner
    node = g.nodes[-1]
    L = Lowering(node, "skinny_gemm", len(g.nodes) - 1)
    lower(node, L)
    env = {f"%{k}": v for k, v in feeds.items()} | {f"@{k}": v for k, v in params.items()}
    y, h = node.results
    env[y.ref] = torch.full((m, y.type.shape[1]), float("nan"), dtype=torch_dtype(y.type.dtype))
    env[h.ref] = fill_h if fill_h is not None else torch.full(
        (m, h.type.shape[1]), float("nan"), dtype=torch_dtype(h.type.dtype))
    runner = PlanRunner(KernelModules(KERNEL_DIR, interpret=True), L.workspaces, device="cpu")
    for launch in L.launches:
        runner.run(launch, env, {"T": m, "S": m, "R": m, "MB": 1})
    return env[y.ref], L


def _data(m, n, k, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    td = torch_dtype(dtype)
    params = {"w": (torch.randn(n, k, generator=gen) / k ** 0.5).to(td)}
    if bias:
        params["b"] = torch.randn(n, generator=gen).to(td)
    return torch.randn(m, k, generator=gen).to(td), params


def _want(x, params, act):
    h = F.linear(x.float(), params["w"].float(), params["b"].float() if "b" in params else None)
    gate, up = h.chunk(2, dim=-1)
    return GLU_ACTS[act](gate) * up


def check_fused(m, n, k, dtype, bias, act, seed=0):
    g = _graph(n, k, dtype, bias, act)
    x, params = _data(m, n, k, dtype, bias, seed)
    got, L = _run(g, skinny_gemm.lower_linear, {"x": x}, params, m)
    torch.testing.assert_close(got.float(), _want(x, params, act), **TOL[dtype])
    return L


@pytest.mark.parametrize("act", sorted(GLU_ACTS))
@pytest.mark.parametrize("m", [1, 3, 19])
def test_the_fused_epilogue_matches_linear_then_act_times_up(m, act):
    """N = 2 x 20 and K = 72 fit no block size (tails masked); M = 1 is the GEMV branch,
    M = 19 two row tiles. One launch writes y; h is never written."""
    L = check_fused(m, 40, 72, "f32", True, act)
    assert [ln["fn"] for ln in L.launches] == ["skinny_gemm_kernel"]
    assert L.launches[0]["grid"][0] == f"cdiv(20, {L.launches[0]['constexprs']['BLOCK_N']})"


@pytest.mark.parametrize("m,dtype,bias", [(1, "f32", True), (5, "f16", False), (17, "f32", False)])
def test_split_k_applies_the_epilogue_after_the_sum(monkeypatch, m, dtype, bias):
    """Small W tiles force split-K: both halves' fp32 partials go to the workspace and the
    split that finishes last sums them, adds the bias, and only then applies act(gate) * up."""
    monkeypatch.setattr(skinny_gemm, "TILE_BYTES", 1024 if dtype == "f32" else 512)
    L = check_fused(m, 40, 200, dtype, bias, "silu")
    (first,) = L.launches
    assert first["constexprs"]["ACT"] == 1 and first["constexprs"]["SPLIT_K"] > 1
    assert list(L.workspaces.values())[0]["shape"][2] == "40"        # both halves


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 16), half=st.integers(1, 40), k=st.integers(1, 70), bias=st.booleans(),
       act=st.sampled_from(sorted(GLU_ACTS)))
def test_any_small_shape(m, half, k, bias, act):
    check_fused(m, 2 * half, k, "f32", bias, act, seed=m * 1000 + half * 10 + k)


@pytest.mark.parametrize("act", sorted(GLU_ACTS))
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_the_epilogue_alone_matches_the_model_rounding(act, dtype):
    """Above the kernel's buckets cuBLAS writes h and glu_kernel makes y: act(gate) rounded
    to the model's dtype, then times up, as the unfused model computes it."""
    m, n, k = 21, 2 * 1500, 8                  # 1500 columns: two programs of 1024 per row
    g = _graph(n, k, dtype, False, act)
    x, params = _data(m, n, k, dtype, False)
    h = F.linear(x, params["w"]) if dtype == "f32" else F.linear(x.float(), params["w"].float()).to(
        torch.float16)
    got, L = _run(g, skinny_gemm.lower_glu_epilogue, {"x": x}, params, m, fill_h=h)
    gate, up = h.chunk(2, dim=-1)
    want = GLU_ACTS[act](gate.float()).to(h.dtype).float() * up.float()
    torch.testing.assert_close(got.float(), want.to(h.dtype).float(), **TOL[dtype])
    assert [ln["fn"] for ln in L.launches] == ["glu_kernel"]


# ----------------------------------------------------------------------------- the pass

MLP = """graph @mlp(%x: f32[T, 8]) {{
  param @w: f32[12, 8]
  param @d: f32[8, {half}]
  %0: f32[T, 12] = linear(%x, @w)
  %1: f32[T, {a}], %2: f32[T, {b}] = split(%0) {{sizes=[{a}, {b}], dim=-1}}
  %3: f32[T, {half}] = {act}
  %4: f32[T, {half}] = mul({mul})
  %5: f32[T, 8] = linear(%4, @d)
  return y=%5{extra}
}}
"""
GATED = dict(a=6, b=6, half=6, act="silu(%1)", mul="%3, %2", extra="")


def _opt(text: str, small_m="triton") -> tuple[str, PassContext]:
    g = parse_graph(text)
    ctx = PassContext(options={"small_m_gemm": small_m})
    PassManager(["fuse-linear-glu"], ctx=ctx).run(g)
    return print_graph(g), ctx


@pytest.mark.parametrize("act,want", [("silu(%1)", "silu"),
                                      ('gelu(%1) {approximate="tanh"}', "gelu_tanh"),
                                      ("gelu(%1)", "gelu")])
@pytest.mark.parametrize("mul", ["%3, %2", "%2, %3"])
def test_the_pass_fuses_a_gated_mlp(act, want, mul):
    """Llama's act(gate) * up and Phi-3's up * act(gate); silu, GeLU tanh (Gemma), GeLU."""
    text = MLP.format(**dict(GATED, act=act, mul=mul))
    out, _ = _opt(text)
    assert f'%4: f32[T, 6], %0: f32[T, 12] = linear_glu(%x, @w) {{act="{want}"}}' in out
    assert not any(f"= {op}(" in out for op in ("split", "mul", "silu", "gelu"))
    assert "%5: f32[T, 8] = linear(%4, @d)" in out
    plain, _ = _opt(text, small_m="extern")
    assert plain == print_graph(parse_graph(text))          # nothing to gain without the kernel


@pytest.mark.parametrize("change,reason", [
    (dict(a=4, b=8, half=4, mul="%3, %1"), None),         # the halves are not both read
    (dict(a=4, b=8, half=8, act="silu(%2)", mul="%3, %2"), None),
    (dict(act="silu(%2)", mul="%3, %1"), "second half"),
    (dict(extra=", h=%2"), "also read by a graph output"),
    (dict(extra=", h=%0"), "also read by a graph output"),
])
def test_the_pass_says_why_it_refuses(change, reason):
    out, ctx = _opt(MLP.format(**dict(GATED, **change)))
    assert "linear_glu" not in out
    said = [r.reason for r in ctx.refusals]
    if reason is None:
        assert not said
    else:
        assert len(said) == 1 and said[0].startswith("fuse-linear-glu: ") and reason in said[0]


# ------------------------------------------------------------------------- whole models

OPTS = dict(opt_level=2, max_num_tokens=24)           # as tests/test_small_m_gemm.py


@pytest.mark.parametrize("case,act,count", [("llama", "silu", 2),
                                            ("phi3-longrope-partial-tied", "silu", 2),
                                            ("gemma3-sandwich-softcap", "gelu_tanh", 3),
                                            ("qwen3_moe-dense-middle", "silu", 1)])
def test_families_fuse_their_gated_mlps(store, case, act, count):
    """Each family's gated MLPs become linear_glu: Llama's merged gate_up, Phi-3's fused
    checkpoint, Gemma's GeLU tanh, Qwen3-MoE's dense layer (its experts stay fused_moe).
    tests/test_small_m_gemm.py runs these artifacts against the extern ones and transformers."""
    art = open_artifact(store.artifact(case, small_m_gemm="triton", **OPTS))
    glu = [n for n in art.graph.nodes if n.op == "linear_glu"]
    assert len(glu) == count and {n.attrs["act"] for n in glu} == {act}
    assert not any(n.op in ("silu", "gelu") for n in art.graph.nodes)
    plain = open_artifact(store.artifact(case, **OPTS))
    assert not any(n.op == "linear_glu" for n in plain.graph.nodes)


# ------------------------------------------------------------------------------- cubins

@pytest.mark.parametrize("n,k", [(16384, 2048), (28672, 4096)], ids=["1b", "8b"])
def test_compiles_for_sm80_and_sm90(n, k):
    """bf16 gated cubins at Llama-3.2-1B's and Llama-3-8B's gate_up shapes, every spec key
    the compiler derives (the M = 1 GEMV branch among them), and the epilogue kernel;
    shared memory within an A100's 163 KB (two W tiles per stage)."""
    from braze.codegen.aot import compile_launch
    from braze.codegen.plan import build_plan
    g = _graph(n, k, "bf16", False, "silu")
    plan = build_plan(g, {"small_m_gemm": "triton", "max_num_tokens": 64})
    launches = [ln for seg in plan["segments"] for ln in seg["launches"] if "kernel" in ln]
    assert sorted(ln["fn"] for ln in launches) == ["glu_kernel", "skinny_gemm_kernel"]
    compiled = []
    for launch in launches:
        for target in ("sm_80", "sm_90"):
            for key in plan["kernels"][launch["kernel"]]["specs"]:
                compiled.append(compile_launch(KERNEL_DIR, launch, target, key=key))
    assert all(c.asm.get("cubin") for c in compiled)
    assert all(c.metadata.shared <= 163 * 1024 for c in compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_bf16_on_gpu_matches_torch(m):
    """On CUDA in bf16 at the 1B gate_up shape: within bf16 roundings of cuBLAS + torch."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import triton
    n, k = 16384, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    p = skinny_gemm.plan(n // 2, k, "bf16", tile_bytes=skinny_gemm.TILE_BYTES // 2)
    out = torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16)
    assert p["SPLIT_K"] == 1
    skinny_gemm.skinny_gemm_kernel[(triton.cdiv(n // 2, p["BLOCK_N"]), 1, triton.cdiv(m, 16))](
        x, w, w, out, out, m, x.stride(0), x.stride(1), out.stride(0), N=n, K=k,
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], SPLIT_K=1,
        K_PER_SPLIT=p["K_PER_SPLIT"], HAS_BIAS=False, DOT_PRECISION=p["DOT_PRECISION"], ACT=1,
        num_warps=p["num_warps"], num_stages=p["num_stages"])
    torch.cuda.synchronize()
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    want = F.silu(gate.float()) * up.float()
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


def test_the_fused_epilogue_saves_a_launch_per_layer_at_decode_buckets(store):
    """Counted on the bound plans (benchmarks/launch_count.py): at T <= 16 each layer's
    SwiGLU launch is gone (the tiny Llama's down_proj does not split K, so nothing is
    added); at larger buckets both artifacts launch cuBLAS and a pointwise kernel alike."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from launch_count import count
    fused = count(store.artifact("llama", small_m_gemm="triton", **OPTS), [1, 16, 24])
    plain = count(store.artifact("llama", **OPTS), [1, 16, 24])
    layers = 2
    for bucket in (1, 16):
        assert sum(plain[bucket].values()) - sum(fused[bucket].values()) == layers
        assert fused[bucket]["skinny_gemm.skinny_gemm_kernel"] == plain[bucket]["extern.linear"]
    assert sum(plain[24].values()) == sum(fused[24].values())
    assert fused[24]["skinny_gemm.glu_kernel"] == layers
