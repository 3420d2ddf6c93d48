"""The skinny GEMM kernel (codegen/kernels/skinny_gemm.py) against torch's F.linear: small M,
K and N off the block sizes, bias or none, strided x, both the direct and the split-K path
(interpreted on the CPU, f32 and f16); and its cubins for sm_80 / sm_90 in bf16 at real
Llama shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.codegen.kernels import skinny_gemm
from braze.codegen.lowering import Lowering
from braze.ir import Graph, T, TensorType
from braze.ir.types import torch_dtype

from kernel_helpers import KERNEL_DIR

TOL = {"f32": dict(atol=1e-4, rtol=1e-4), "f16": dict(atol=2e-2, rtol=2e-2)}


def _graph(n: int, k: int, dtype: str, bias: bool, rows=T, x_cols: int | None = None):
    """One linear; with `x_cols` > k, x is a column slice of a wider input (strided rows)."""
    g = Graph("linear")
    w = g.add_param("w", TensorType((n, k), dtype))
    ops = [w] + ([g.add_param("b", TensorType((n,), dtype))] if bias else [])
    if x_cols:
        wide = g.add_input("x", TensorType((rows, x_cols), dtype))
        x = g.add_node("split", [wide], {"sizes": [k, x_cols - k], "dim": -1}).results[0]
    else:
        x = g.add_input("x", TensorType((rows, k), dtype))
    g.set_output("y", g.op("linear", x, *ops))
    return g


def _launches(g: Graph):
    i = len(g.nodes) - 1
    L = Lowering(g.nodes[i], "skinny_gemm", i)
    skinny_gemm.lower_linear(g.nodes[i], L)
    return L


def run_kernel(g: Graph, feeds: dict, params: dict, m: int, runner=None) -> torch.Tensor:
    """The graph's linear through the kernel's launches (PlanRunner, interpreted; `runner`
    to reuse one and its workspaces), the views in front of it through torch."""
    from braze.kernel_modules import KernelModules
    from braze.runtime.launcher import PlanRunner
    env = {f"%{k}": v for k, v in feeds.items()} | {f"@{k}": v for k, v in params.items()}
    for node in g.nodes[:-1]:
        outs = node.opdef.impl(*[env[v.ref] for v in node.operands], **node.attrs)
        for r, t in zip(node.results, outs if isinstance(outs, (tuple, list)) else (outs,)):
            env[r.ref] = t
    L = _launches(g)
    out = g.nodes[-1].results[0]
    env[out.ref] = torch.full((m, out.type.shape[1]), float("nan"),
                              dtype=torch_dtype(out.type.dtype))
    if runner is None:
        runner = PlanRunner(KernelModules(KERNEL_DIR, interpret=True), L.workspaces,
                            device="cpu")
    sizes = {"T": m, "S": m, "R": m, "MB": 1}
    for launch in L.launches:
        runner.run(launch, env, sizes)
    return env[out.ref]


def check(m: int, n: int, k: int, dtype: str, bias: bool, x_cols=None, seed=0):
    g = _graph(n, k, dtype, bias, x_cols=x_cols)
    gen = torch.Generator().manual_seed(seed)
    td = torch_dtype(dtype)
    params = {"w": torch.randn(n, k, generator=gen).to(td)}
    if bias:
        params["b"] = torch.randn(n, generator=gen).to(td)
    x = torch.randn(m, x_cols or k, generator=gen).to(td)
    got = run_kernel(g, {"x": x}, params, m)
    want = F.linear(x[:, :k].float(), params["w"].float(),
                    params["b"].float() if bias else None).to(td)
    torch.testing.assert_close(got, want, **TOL[dtype])
    return _launches(g)


@pytest.mark.parametrize("m", [1, 3, 16, 19])
@pytest.mark.parametrize("dtype,bias", [("f32", True), ("f32", False), ("f16", True)])
def test_matches_f_linear(m, dtype, bias):
    """N = 40 and K = 200 are multiples of no block size: the N and K tails are masked;
    M = 19 takes two row tiles."""
    L = check(m, 40, 200, dtype, bias)
    assert [ln["fn"] for ln in L.launches] == ["skinny_gemm_kernel"]


@pytest.mark.parametrize("m", [1, 3])
def test_strided_rows(m):
    """x a column slice of a wider tensor (row stride 57, not K): the rows are read through
    their stride, the columns past K never."""
    L = check(m, 24, 40, "f32", True, x_cols=57)
    strides = [a["stride"] for a in L.launches[0]["args"] if "stride" in a]
    assert strides[0][1] == 0 and strides[1][1] == 1


@pytest.mark.parametrize("m,dtype,bias", [(1, "f32", True), (5, "f16", False), (17, "f32", False)])
def test_split_k_matches_f_linear(monkeypatch, m, dtype, bias):
    """Small W tiles force the split-K path at a tiny shape: K = 200 in 3 splits of 80 (the
    last one ends past K), fp32 partials summed by the split that finishes last, bias
    added there: one launch, and a zeroed workspace of arrival counts per output tile."""
    monkeypatch.setattr(skinny_gemm, "TILE_BYTES", 1024 if dtype == "f32" else 512)
    L = check(m, 40, 200, dtype, bias)
    (first,) = L.launches
    assert first["constexprs"]["SPLIT_K"] == 3 and first["constexprs"]["K_PER_SPLIT"] == 80
    partials, arrived = L.workspaces.values()
    assert partials["shape"] == ["3", "T", "40"] and not partials.get("zero")
    assert arrived["dtype"] == "i32" and arrived["zero"]


def test_split_k_is_deterministic_and_leaves_its_counts_zeroed(monkeypatch):
    """Run twice through one runner (its workspaces kept, as a bound plan's are): the same
    result each time, and every tile's arrival count back at 0 after each run (a count left
    over would make no split of that tile the last in the next run: its output unwritten)."""
    from braze.kernel_modules import KernelModules
    from braze.runtime.launcher import PlanRunner
    monkeypatch.setattr(skinny_gemm, "TILE_BYTES", 1024)
    for m in (1, 4):
        g = _graph(40, 200, "f32", True)
        gen = torch.Generator().manual_seed(3)
        params = {"w": torch.randn(40, 200, generator=gen), "b": torch.randn(40, generator=gen)}
        x = torch.randn(m, 200, generator=gen)
        runner = PlanRunner(KernelModules(KERNEL_DIR, interpret=True), _launches(g).workspaces,
                            device="cpu")
        results = []
        for _ in range(2):
            results.append(run_kernel(g, {"x": x}, params, m, runner))
            counts = [t for key, t in runner._ws.items() if key[0].endswith(".arrived")]
            assert counts and all(not t.any() for t in counts)
        assert torch.equal(*results)
        torch.testing.assert_close(results[0], F.linear(x, params["w"], params["b"]),
                                   **TOL["f32"])


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 70), k=st.integers(1, 90), bias=st.booleans())
def test_any_small_shape(m, n, k, bias):
    check(m, n, k, "f32", bias, seed=m * 1000 + n * 10 + k)


def test_plan_sizes_the_grid_to_the_gpu():
    """Real shapes: enough column blocks for two CTAs per SM, splitting K only where N is
    too narrow for one per SM and K long enough (Llama-3.2-1B's down projection)."""
    def grid(n, k):
        p = skinny_gemm.plan(n, k, "bf16")
        return -(-n // p["BLOCK_N"]), p["SPLIT_K"], p
    assert grid(6144, 4096)[:2] == (384, 1)          # 8B qkv
    assert grid(4096, 14336)[:2] == (256, 1)         # 8B down
    assert grid(28672, 4096)[2]["BLOCK_N"] == 64     # 8B gate_up
    assert grid(2048, 2048)[:2] == (128, 1)          # 1B o: K too short to split
    n_blocks, split, p = grid(2048, 8192)            # 1B down
    assert (n_blocks, split) == (128, 3) and p["K_PER_SPLIT"] == 3072
    for n, k in [(3072, 2048), (2048, 2048), (16384, 2048), (128256, 2048), (4096, 4096)]:
        _, split, p = grid(n, k)
        assert (split - 1) * p["K_PER_SPLIT"] < k <= split * p["K_PER_SPLIT"]
        assert p["BLOCK_N"] * p["BLOCK_K"] * 2 == skinny_gemm.TILE_BYTES


SHAPES = {"8b-qkv": (6144, 4096), "8b-o": (4096, 4096), "8b-gate_up": (28672, 4096),
          "8b-down": (4096, 14336), "8b-lm_head": (128256, 4096),
          "1b-qkv": (3072, 2048), "1b-down": (2048, 8192), "1b-gate_up": (16384, 2048),
          "1b-lm_head": (128256, 2048)}


@pytest.mark.parametrize("shape", ["8b-down", "8b-gate_up", "1b-down", "1b-lm_head"])
def test_compiles_for_sm80_and_sm90(shape):
    """bf16 cubins at the shapes the decode buckets run, with the spec keys the compiler
    derives (M = 1 specialised to a constant, aligned pointers); shared memory within an
    A100's 163 KB."""
    from braze.codegen.aot import compile_launch
    from braze.codegen.plan import build_plan
    n, k = SHAPES[shape]
    g = _graph(n, k, "bf16", False)
    plan = build_plan(g, {"small_m_gemm": "triton", "max_num_tokens": 64})
    launches = [ln for seg in plan["segments"] for ln in seg["launches"] if "kernel" in ln]
    assert len(launches) == 1                 # 1b-down splits K, and still one launch
    assert (launches[0]["constexprs"]["SPLIT_K"] > 1) == (shape == "1b-down")
    compiled = []
    for launch in launches:
        keys = plan["kernels"][launch["kernel"]]["specs"]
        m_at = next(i for i, a in enumerate(launch["args"]) if "expr" in a)
        assert any(key[m_at] == "1" for key in keys)     # M = 1 at bucket 1
        for target in ("sm_80", "sm_90"):
            for key in keys:          # M = 1 (the GEMV branch alone), M % 16 == 0, generic
                compiled.append(compile_launch(KERNEL_DIR, launch, target, key=key))
    assert all(c.asm.get("cubin") for c in compiled)
    assert all(c.metadata.shared <= 163 * 1024 for c in compiled)


@pytest.mark.parametrize("stages", [2, 3])
def test_gemv_stages_pipeline_the_bucket_1_loop_through_cp_async(monkeypatch, stages):
    """GEMV_STAGES > 1 makes the bucket-1 cubin stream W through shared memory with cp.async
    (`stages` tiles in flight per CTA) where the plain loop loads into registers; the
    buckets above keep their mma pipeline; and it still computes the same linear."""
    from pathlib import Path
    import tempfile

    from braze.codegen.aot import compile_launch
    from braze.codegen.cubin_report import cuobjdump, read_cubin
    if cuobjdump() is None:
        pytest.skip("triton ships no cuobjdump here")

    def bucket1(stages: int):
        monkeypatch.setattr(skinny_gemm, "GEMV_STAGES", stages)
        (launch,) = _launches(_graph(*SHAPES["8b-qkv"], "bf16", False)).launches
        base = "".join("D" if a["ty"].startswith("*") else "-" for a in launch["args"])
        m_at = next(i for i, a in enumerate(launch["args"]) if "expr" in a)
        k = compile_launch(KERNEL_DIR, launch, "sm_90", key=base[:m_at] + "1" + base[m_at + 1:])
        path = Path(tempfile.mkdtemp()) / "k.cubin"
        path.write_bytes(k.asm["cubin"])
        return read_cubin(path), k.metadata.shared, launch

    plain, plain_shared, _ = bucket1(1)
    piped, piped_shared, launch = bucket1(stages)
    assert launch["constexprs"]["GEMV_STAGES"] == stages
    tile = skinny_gemm.TILE_BYTES
    assert not plain.async_copies and plain.loads.get(128, 0) * 16 * 128 == tile
    assert sum(piped.async_copies.values()) * 16 * 128 == stages * tile   # 16 B per copy
    assert piped_shared >= (stages - 1) * tile > plain_shared
    check(1, 40, 300, "f16", True)      # the interpreter runs the same loop either way
    check(5, 40, 300, "f16", True)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("shape", ["8b-qkv", "1b-down"])
def test_bf16_on_gpu_matches_torch(m, shape):
    """On CUDA in bf16, through Triton's JIT: within a bf16 rounding of cuBLAS's result."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import triton
    n, k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    b = torch.randn(n, device="cuda", generator=gen).bfloat16()
    p = skinny_gemm.plan(n, k, "bf16")
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    split = p["SPLIT_K"]
    ws = torch.empty(split, m, n, device="cuda", dtype=torch.float32) if split > 1 else out
    skinny_gemm.skinny_gemm_kernel[(triton.cdiv(n, p["BLOCK_N"]), split, triton.cdiv(m, 16))](
        x, w, b, out, ws, m, x.stride(0), x.stride(1), out.stride(0), N=n, K=k,
        BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"], SPLIT_K=split,
        K_PER_SPLIT=p["K_PER_SPLIT"], HAS_BIAS=True, DOT_PRECISION=p["DOT_PRECISION"],
        num_warps=p["num_warps"], num_stages=p["num_stages"])
    if split > 1:
        skinny_gemm.skinny_gemm_reduce_kernel[(triton.cdiv(n, skinny_gemm.REDUCE_BLOCK), m)](
            ws, b, out, m, out.stride(0), N=n, SPLIT_K=split, BLOCK=skinny_gemm.REDUCE_BLOCK,
            HAS_BIAS=True)
    torch.cuda.synchronize()
    want = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=2e-2)
