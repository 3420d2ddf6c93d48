"""Generated pointwise kernels (fused_pointwise groups and lone pointwise ops) against the
reference interpreter (Triton interpreter), on real -O2 graphs, and their cubins."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import braze.passes
from braze.codegen.kernels import pointwise
from braze.ir import Graph, T, TensorType, all_ops, parse_graph, print_graph, run_graph, verify
from braze.ir.types import torch_dtype
from kernel_helpers import aot_compile_node, check_kernels, lower_node, run_with_kernels
from pass_helpers import (model_step_feeds, o2_model_graph, pointwise_graphs, run_passes,
                          step_sizes)

PIPELINE_O2 = braze.passes.PIPELINES[2]
KERNEL_OPS = set(pointwise.ops())
# f32: the kernels round like torch op by op, so only transcendental ulps and reduction order
# differ; f16: a rounding that lands on the other side of a half-way point is one f16 ulp
TOL = {"f32": dict(atol=1e-6, rtol=1e-5), "f16": dict(atol=1e-3, rtol=1e-3)}


def check(g: Graph, feeds: dict, params: dict, bindings: dict, atol: float, rtol: float,
          ops=KERNEL_OPS) -> None:
    """Every output through the kernels equals the reference interpreter's (NaN where it is NaN)."""
    assert any(n.op in ops for n in g.nodes)
    want = run_graph(g, {k: v.clone() for k, v in feeds.items()}, params)
    got = run_with_kernels(g, {k: v.clone() for k, v in feeds.items()}, params, ops, bindings)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m: f"output {k}: {m}")


def feeds_for(g: Graph, bindings: dict, seed: int = 0, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for v in list(g.inputs) + list(g.params.values()):
        shape = v.type.concrete_shape(bindings)
        dt = torch_dtype(v.type.dtype)
        if v.type.dtype == "bool":
            t = torch.rand(shape, generator=gen) > 0.5
        elif dt.is_floating_point:
            t = (scale * torch.randn(shape, generator=gen)).to(dt)
        else:
            t = torch.randint(-5, 9, shape, generator=gen).to(dt)
        out[v.name] = t
    feeds = {v.name: out[v.name] for v in g.inputs}
    params = {n: out[n] for n in g.params}
    return feeds, params


def fused(text: str) -> Graph:
    g = parse_graph(textwrap.dedent(text))
    verify(g)
    run_passes(g, ["fuse-pointwise"])
    return g


def test_every_pointwise_op_of_the_registry_is_lowered():
    pointwise_ops = {name for name, d in all_ops().items() if d.pointwise}
    assert pointwise_ops <= KERNEL_OPS, sorted(pointwise_ops - KERNEL_OPS)
    assert KERNEL_OPS - pointwise_ops == {"fused_pointwise"}
    from braze.codegen.pointwise_ops import NUMERICS
    for name in pointwise_ops:       # each form names a rounding rule the generator has
        assert all_ops()[name].triton.numerics in NUMERICS, name


# -- hand-written groups --------------------------------------------------------------------------

CHAIN = """
graph @g(%x: {dt}[T, 37], %y: {dt}[T, 37]) {{
  %0: {dt}[T, 37] = add(%x, %y)
  %1: {dt}[T, 37] = silu(%0)
  %2: {dt}[T, 37] = mul(%1) {{scalar=0.5}}
  return out=%2
}}
"""

RESIDUAL_RMSNORM = """
graph @g(%h: {dt}[T, 100], %attn: {dt}[T, 100]) {{
  param @w: {dt}[100]
  %0: {dt}[T, 100] = add(%h, %attn)
  %1: f32[T, 100] = cast(%0) {{dtype="f32"}}
  %2: f32[T, 100] = pow(%1) {{scalar=2}}
  %3: f32[T, 1] = mean(%2) {{dims=[-1], keepdim=true}}
  %4: f32[T, 1] = add(%3) {{scalar=1e-06}}
  %5: f32[T, 1] = rsqrt(%4)
  %6: f32[T, 100] = mul(%1, %5)
  %7: {dt}[T, 100] = cast(%6) {{dtype="{dt}"}}
  %8: {dt}[T, 100] = mul(@w, %7)
  return y=%8, residual=%0, inv_rms=%5
}}
"""

SOFTMAX = """
graph @g(%x: {dt}[T, 19]) {{
  %0: {dt}[T, 1] = amax(%x) {{dims=[-1], keepdim=true}}
  %1: {dt}[T, 19] = sub(%x, %0)
  %2: {dt}[T, 19] = exp(%1)
  %3: {dt}[T, 1] = sum(%2) {{dims=[-1], keepdim=true}}
  %4: {dt}[T, 19] = div(%2, %3)
  %5: {dt}[T] = sum(%4) {{dims=[-1]}}
  return p=%4, total=%5, m=%0
}}
"""

BROADCAST = """
graph @g(%s: {dt}[T, 1], %x: {dt}[T, 24], %w: {dt}[24], %c: {dt}[]) {{
  %0: {dt}[T, 24] = mul(%s, %x)
  %1: {dt}[T, 24] = mul(%0, %w)
  %2: {dt}[T, 1] = exp(%s)
  %3: {dt}[T, 24] = sub(%1, %2)
  %4: {dt}[T, 24] = add(%3, %c)
  %5: {dt}[24] = mul(%w, %c)
  %6: {dt}[T, 24] = div(%4, %5)
  return y=%6, e=%2, wc=%5
}}
"""

SCALARS = """
graph @g(%x: {dt}[T, 13]) {{
  %0: {dt}[T, 13] = sub(%x) {{scalar=1.0, scalar_first=true}}
  %1: {dt}[T, 13] = div(%0) {{scalar=3}}
  %2: {dt}[T, 13] = div(%1) {{scalar=0.1, scalar_first=true}}
  %3: {dt}[T, 13] = mul(%2) {{scalar=0.1}}
  %4: {dt}[T, 13] = add(%3) {{scalar=0.1}}
  %5: {dt}[T, 13] = pow(%4) {{scalar=2.0, scalar_first=true}}
  %6: {dt}[T, 13] = maximum(%5) {{scalar=0.3}}
  %7: bool[T, 13] = lt(%6) {{scalar=0.7, scalar_first=true}}
  %8: {dt}[T, 13] = where(%7, %6, %x)
  %9: {dt}[T, 13] = pow(%8) {{scalar=3}}
  %10: {dt}[T, 13] = pow(%9) {{scalar=-0.5}}
  return y=%10, c=%7
}}
"""

CAST_CHAIN = """
graph @g(%x: f32[T, 21]) {{
  %0: f16[T, 21] = cast(%x) {{dtype="f16"}}
  %1: f32[T, 21] = cast(%0) {{dtype="f32"}}
  %2: f32[T, 21] = sub(%x, %1)
  %3: f16[T, 21] = cast(%2) {{dtype="f16"}}
  %4: f16[T, 21] = mul(%3) {{scalar=1000.0}}
  %5: i64[T, 21] = cast(%4) {{dtype="i64"}}
  %6: f32[T, 21] = cast(%5) {{dtype="f32"}}
  %7: bool[T, 21] = cast(%x) {{dtype="bool"}}
  %8: f32[T, 21] = cast(%7) {{dtype="f32"}}
  %9: f32[T, 21] = add(%6, %8)
  return y=%9, h=%0
}}
"""

QK_NORM = """
graph @g(%q: {dt}[T, 3, 24], %bias: {dt}[T, 1, 24]) {{
  param @w: {dt}[24]
  %0: f32[T, 3, 24] = cast(%q) {{dtype="f32"}}
  %1: f32[T, 3, 24] = pow(%0) {{scalar=2}}
  %2: f32[T, 3, 1] = mean(%1) {{dims=[-1], keepdim=true}}
  %3: f32[T, 3, 1] = add(%2) {{scalar=1e-06}}
  %4: f32[T, 3, 1] = rsqrt(%3)
  %5: f32[T, 3, 24] = mul(%0, %4)
  %6: {dt}[T, 3, 24] = cast(%5) {{dtype="{dt}"}}
  %7: {dt}[24] = mul(@w) {{scalar=0.5}}
  %8: {dt}[T, 1, 24] = add(%bias, %7)
  %9: {dt}[T, 3, 24] = mul(%7, %6)
  %10: {dt}[T, 3, 24] = add(%9, %8)
  return y=%10, w2=%7, b2=%8
}}
"""

GROUPS = {"chain": (CHAIN, 1), "residual_rmsnorm": (RESIDUAL_RMSNORM, 1),
          "softmax": (SOFTMAX, 1), "broadcast": (BROADCAST, 1), "scalars": (SCALARS, 1),
          "qk_norm": (QK_NORM, 1)}


@pytest.mark.parametrize("name", sorted(GROUPS))
@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_hand_written_groups(name, dt, tokens):
    text, groups = GROUPS[name]
    g = fused(text.format(dt=dt))
    assert g.op_counts().get("fused_pointwise") == groups, g.op_counts()
    feeds, params = feeds_for(g, {"T": tokens}, seed=tokens)
    check(g, feeds, params, {"T": tokens}, **TOL[dt])


@pytest.mark.parametrize("tokens", [1, 5])
def test_cast_chain_f32_f16_f32_rounds_exactly(tokens):
    g = fused(CAST_CHAIN.format())
    assert [n.op for n in g.nodes] == ["fused_pointwise"]
    feeds, params = feeds_for(g, {"T": tokens}, seed=tokens)
    check(g, feeds, params, {"T": tokens}, atol=0, rtol=0)


SWIGLU = """
graph @g(%x: {dt}[T, 16]) {{
  param @gate_up: {dt}[{i2}, 16]
  %0: {dt}[T, {i2}] = linear(%x, @gate_up)
  %1: {dt}[T, {i}], %2: {dt}[T, {i}] = split(%0) {{sizes=[{i}, {i}], dim=-1}}
  %3: {dt}[T, {i}] = silu(%1)
  %4: {dt}[T, {i}] = mul(%3, %2)
  return y=%4
}}
"""


@pytest.mark.parametrize("dt", ["f32", "f16"])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_swiglu_on_strided_halves(dt, tokens):
    """The halves of the merged gate_up GEMM are views with row stride 2I: the kernel reads
    them in place, with the stride known at codegen time (a literal, not an argument)."""
    g = fused(SWIGLU.format(dt=dt, i=45, i2=90))
    node = next(i for i, n in enumerate(g.nodes) if n.op == "fused_pointwise")
    launches, _, sources = lower_node(g, node)
    assert [a for a in launches[0]["args"] if "stride" in a] == []
    assert "* 90" in next(iter(sources.values()))
    feeds, params = feeds_for(g, {"T": tokens}, seed=tokens, scale=0.5)
    check(g, feeds, params, {"T": tokens}, **TOL[dt])


LAYOUTS = """
graph @g(%a: f32[T, 6], %b: f32[T, 10], %x: f32[T, 4, 6], %s: f32[T, 1]) {
  %0: f32[6, T] = einsum(%a) {equation="td->dt"}
  %1: f32[6, T] = exp(%0)
  %2: f32[4, T] = slice(%0) {dim=0, start=1, end=5}
  %3: f32[4, T] = sigmoid(%2)
  %4: f32[4, T, 6] = permute(%x) {dims=[1, 0, 2]}
  %5: f32[4, T, 6] = neg(%4)
  %6: f32[4, T, 6] = mul(%5, %a)
  %7: f32[T, 5] = slice(%b) {dim=-1, start=0, end=10, step=2}
  %8: f32[T, 5] = expand(%s) {shape=[-1, 5]}
  %9: f32[T, 5] = add(%7, %8)
  %10: f32[T, 5] = tanh(%9)
  return y=%1, y2=%3, z=%6, w=%10
}
"""


@pytest.mark.parametrize("tokens", [1, 4])
def test_views_of_every_layout(tokens):
    """An extern op's own tensor (a transposed einsum: every stride, the last one too, read at
    run time) and a slice of it; a permuted view (strides from the view op, at codegen time);
    a last dim with stride 2; an expanded last dim with stride 0."""
    g = fused(LAYOUTS)
    strides = [a["stride"] for i, n in enumerate(g.nodes) if n.op in KERNEL_OPS
               for a in lower_node(g, i)[0][0]["args"] if "stride" in a]
    assert sorted(strides) == [["%0", 0], ["%0", 1], ["%2", 0], ["%2", 1]], strides
    feeds, params = feeds_for(g, {"T": tokens}, seed=tokens)
    check(g, feeds, params, {"T": tokens}, **TOL["f32"])


def test_static_spaces_and_rank0():
    g = fused("""
        graph @g(%x: f32[3, 5], %y: f32[], %z: f32[7, 300]) {
          %0: f32[3, 5] = mul(%x, %y)
          %1: f32[3, 5] = sigmoid(%0)
          %2: f32[] = exp(%y)
          %3: f32[] = neg(%2)
          %4: f32[7, 1] = amax(%z) {dims=[-1], keepdim=true}
          %5: f32[7, 300] = sub(%z, %4)
          return a=%1, b=%3, c=%5
        }
        """)
    feeds, params = feeds_for(g, {})
    check(g, feeds, params, {}, **TOL["f32"])


def test_integer_and_bool_arithmetic_is_exact():
    g = fused("""
        graph @g(%a: i64[T, 7], %b: i32[T, 7], %c: bool[T, 7]) {
          %0: i64[T, 7] = add(%a, %b)
          %1: i64[T, 7] = mul(%0) {scalar=3}
          %2: f32[T, 7] = div(%1) {scalar=2}
          %3: bool[T, 7] = gt(%a) {scalar=0}
          %4: bool[T, 7] = add(%3, %c)
          %5: bool[T, 7] = mul(%3, %c)
          %6: i64[T, 1] = sum(%4) {dims=[-1], keepdim=true}
          %7: i64[T, 1] = amax(%1) {dims=[-1], keepdim=true}
          %8: i64[T, 7] = sub(%1, %7)
          %9: i64[T, 7] = neg(%8)
          %10: f32[T, 7] = mul(%2, %6)
          return a=%2, b=%5, c=%9, d=%10
        }
        """)
    assert g.op_counts() == {"fused_pointwise": 1}
    feeds, params = feeds_for(g, {"T": 5})
    check(g, feeds, params, {"T": 5}, atol=0, rtol=0)


def test_reductions_propagate_nan_and_mask_ragged_rows():
    g = fused("""
        graph @g(%x: f32[T, 5, 7]) {
          %0: f32[T, 5, 7] = log(%x)
          %1: f32[T, 5, 1] = amax(%0) {dims=[-1], keepdim=true}
          %2: f32[T, 5] = sum(%0) {dims=[-1]}
          %3: f32[T, 5, 7] = mul(%0, %1)
          return m=%1, s=%2, y=%3
        }
        """)
    feeds, params = feeds_for(g, {"T": 3})
    assert torch.isnan(torch.log(feeds["x"])).any()
    check(g, feeds, params, {"T": 3}, **TOL["f32"])


# -- every standalone pointwise op ----------------------------------------------------------------

UNARY = ["neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "silu", "relu",
         "abs", "reciprocal", "logical_not"]
BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt",
          "ge", "logical_and", "logical_or"]
SCALARS_OF = [0.1, 3, -1.5, 2, 0.5, 1e-06]
# torch's own results vary by an ulp here (Sleef; f16 rsqrt even by vector length)
TRANSCENDENTAL = {"exp", "log", "sin", "cos", "tanh", "sigmoid", "silu", "gelu", "rsqrt"}


def _single(op, dt, variant):
    g = Graph("one")
    x = g.add_input("x", TensorType((T, 5), dt))
    if op in UNARY:
        g.set_output("y", g.op(op, x))
    elif op == "gelu":
        g.set_output("y", g.op(op, x, approximate=variant))
    elif op == "cast":
        src = g.add_input("s", TensorType((T, 5), variant))
        g.set_output("y", g.op("cast", src, dtype=dt))
    elif op == "where":
        c = g.add_input("c", TensorType((T, 1), "bool"))
        g.set_output("y", g.op("where", c, x, g.add_input("w", TensorType((5,), "f32"))))
    elif variant == "tensors":
        g.set_output("y", g.op(op, x, g.add_input("w", TensorType((5,), dt))))
    elif variant == "mixed":      # a 0-d f32 tensor with a f16 one: result f16, torch's rounding
        g.set_output("y", g.op(op, x, g.add_input("z", TensorType((), "f32"))))
        g.set_output("y2", g.op(op, g.inputs[-1], x))
    else:
        for k, s in enumerate(SCALARS_OF):
            g.set_output(f"y{k}", g.op(op, x, scalar=s, scalar_first=variant == "scalar_first"))
    return g


def _cases():
    for dt in ("f32", "f16"):
        for op in UNARY:
            yield op, dt, None
        yield "gelu", dt, "none"
        yield "gelu", dt, "tanh"
        for src in ("f32", "f16", "i64", "bool"):
            yield "cast", dt, src
        yield "where", dt, None
        for op in BINARY:
            for variant in ("tensors", "scalar", "scalar_first"):
                yield op, dt, variant
            if dt == "f16" and op in ("add", "sub", "mul", "div", "pow", "maximum", "lt"):
                yield op, dt, "mixed"


@pytest.mark.parametrize("op, dt, variant", list(_cases()))
def test_standalone_op(op, dt, variant):
    g = _single(op, dt, variant)
    feeds, params = feeds_for(g, {"T": 3}, seed=len(op))
    x = feeds["x"].view(-1)
    # the scalars themselves, rounded to f16 and not, so comparisons see ties
    x[: 2 * len(SCALARS_OF)] = torch.tensor([float(torch.tensor(s).to(x.dtype)) for s in SCALARS_OF]
                                            + SCALARS_OF).to(x.dtype)
    if op in ("logical_and", "logical_or", "logical_not"):
        x[-3:] = 0
    # IEEE-rounded ops (and torch's pow special cases) round exactly like torch
    exact = op not in TRANSCENDENTAL and not (op == "pow" and variant != "tensors")
    check(g, feeds, params, {"T": 3}, **(dict(atol=0, rtol=0) if exact else TOL[dt]))


# -- random pointwise DAGs, fused by the pass ---------------------------------------------------

UNARY_OPS = ["neg", "tanh", "sigmoid", "silu", "abs", "relu", "sin", "cos", "exp", "rsqrt",
             "sqrt", "log", "reciprocal"]
BINARY_OPS = ["add", "sub", "mul", "maximum", "minimum", "div", "pow"]


@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pointwise_graphs(UNARY_OPS, BINARY_OPS, ["add", "sub", "mul", "div", "pow", "maximum"],
                       [2, 0.5, -1.5, 1e-06, 3, 0.1], ["gt", "le", "ne"], max_n=6, max_t=9))
def test_random_pointwise_graphs(case):
    g, t = case
    if not g.outputs:
        return
    g = parse_graph(print_graph(g))
    run_passes(g, ["fuse-pointwise"])
    if not any(n.op in KERNEL_OPS for n in g.nodes):
        return
    feeds, params = feeds_for(g, {"T": t}, seed=t, scale=1.0)
    dt = g.inputs[0].type.dtype
    check(g, feeds, params, {"T": t}, **TOL[dt])


# -- real graphs ----------------------------------------------------------------------------------

def _o2(g, params):
    ops = {n.op for n in g.nodes} & KERNEL_OPS
    feeds = model_step_feeds(g, cached=(0, 2))          # a prefill and a chunked prefill
    return g, ops, feeds, params, {**step_sizes(feeds), "MB": feeds["block_tables"].shape[1]}


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_o2_model_graphs(family, tmp_path_factory):
    """SwiGLU groups on the gate_up halves (the RoPE angles' cast, mul, cos and sin are
    compile-time tables now: tabulate-positions)."""
    g, ops, feeds, params, sizes = _o2(*o2_model_graph(family, tmp_path_factory.mktemp("m")))
    assert "fused_pointwise" in ops and not {"cos", "sin"} & set(g.op_counts()), g.op_counts()
    check_kernels(g, feeds, params, ops, sizes, atol=1e-5, rtol=1e-5)


def test_o2_llama_float16(tmp_path):
    """In f16: the SwiGLU groups round as the model does."""
    g, ops, feeds, params, sizes = _o2(*o2_model_graph("llama", tmp_path, seed=2, dtype="float16"))
    assert "fused_pointwise" in ops, g.op_counts()
    check_kernels(g, feeds, params, ops, sizes, atol=1e-3, rtol=1e-3)


def _llama3_8b_o2():
    from braze.frontend.trace import trace_to_ir
    from braze.models.registry import build_model, build_spec
    from braze.tiny import tiny_config
    cfg = tiny_config("llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, num_hidden_layers=1, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0)
    g = trace_to_ir(build_model(build_spec(cfg), torch.bfloat16), "llama3_8b", 16, "bf16")
    run_passes(g, PIPELINE_O2, max_num_tokens=8192, max_num_seqs=256, max_model_len=8192,
               block_size=16)
    return g


def test_llama3_8b_groups_compile_bf16_for_sm80_and_sm90():
    """The pointwise kernel of a Llama-3-8B-shaped bf16 -O2 graph: SwiGLU over I = 14336 on
    the halves of the gate_up GEMM (row stride 28672, a literal). The RoPE angles' cast, mul,
    cos and sin are compile-time tables (tabulate-positions)."""
    g = _llama3_8b_o2()
    assert {n.op for n in g.nodes} & KERNEL_OPS == {"fused_pointwise"}
    seen, compiled, swiglu = set(), [], False
    for i, n in enumerate(g.nodes):
        if n.op not in KERNEL_OPS:
            continue
        launches, _, sources = lower_node(g, i)
        if launches[0]["module"] in seen:
            continue
        seen.add(launches[0]["module"])
        if "silu(%in0)" in n.attrs.get("body", ""):
            swiglu = True
            assert "%in0: bf16[T, 14336]" in n.attrs["body"]
            assert "* 28672" in sources[launches[0]["module"]]
        for k in aot_compile_node(g, i):
            assert k.asm.get("cubin")
            compiled.append(k)
    assert swiglu and len(seen) == 1 and len(compiled) == 2


ROW_GROUPS_AT_SIZE = {
    # residual add + RMSNorm at Llama-3-8B's hidden size: one 4096 row per program, 8 warps
    "rmsnorm_4096": (RESIDUAL_RMSNORM.replace("100", "4096"), {"ROWS": 1, "BLOCK_N": 4096}),
    # softmax over Qwen3-30B-A3B's 128 experts: 16 rows per program
    "softmax_128": (SOFTMAX.replace("19", "128"), {"ROWS": 16, "BLOCK_N": 128}),
    # per-head norm of [T, 32, 128] (Qwen3 QK-norm shape): rows are (token, head)
    "qk_norm_32x128": (QK_NORM.replace("3, 24", "32, 128").replace("1, 24", "1, 128")
                       .replace("[24]", "[128]").replace("3, 1", "32, 1"),
                       {"ROWS": 16, "BLOCK_N": 128}),
    # the 1-D kernel with [T, 1], [D] and scalar inputs at 4096
    "broadcast_4096": (BROADCAST.replace("24", "4096"), {"BLOCK": 1024}),
}


@pytest.mark.parametrize("name", sorted(ROW_GROUPS_AT_SIZE))
def test_groups_at_real_sizes_compile_bf16(name):
    text, constexprs = ROW_GROUPS_AT_SIZE[name]
    g = fused(text.format(dt="bf16"))
    (i,) = [i for i, n in enumerate(g.nodes) if n.op == "fused_pointwise"]
    assert lower_node(g, i)[0][0]["constexprs"] == constexprs
    kernels = aot_compile_node(g, i)
    assert len(kernels) == 2 and all(k.asm.get("cubin") for k in kernels)
    for k in kernels:                   # rows stay in registers: shared memory only for reductions
        assert k.metadata.shared <= 4096


# ~140 compiles: about 27 s with a cold Triton cache on 2 busy cores; in the default run
# because nothing else checks that the bf16 forms compile
def test_every_standalone_op_and_group_compiles_bf16():
    """The bf16 forms (interpreted tests cannot run bf16) of every op variant and hand-written
    group compile for sm_80 and sm_90."""
    graphs = [_single(op, "bf16", variant) for op, dt, variant in _cases() if dt == "f16"]
    graphs += [fused(text.format(dt="bf16")) for text, _ in GROUPS.values()]
    graphs += [fused(LAYOUTS), fused(SWIGLU.format(dt="bf16", i=45, i2=90))]
    modules = set()
    for g in graphs:
        for i, n in enumerate(g.nodes):
            if n.op in KERNEL_OPS:
                kernels = aot_compile_node(g, i)
                assert len(kernels) == 2 and all(k.asm.get("cubin") for k in kernels)
                modules.add(lower_node(g, i)[0][0]["module"])
    assert len(modules) > 100
