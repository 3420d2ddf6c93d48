"""The RoPE kernels (rope, rope1, rope_cache_write) against the reference ops (Triton
interpreter): both styles, QK-norm on/off, strided q/k/v views, slot -1 padding; on real
-O2 model graphs; and their cubins at real model sizes."""

from __future__ import annotations

import pytest
import torch

from braze.ir import NB, Graph, T, TensorType
from braze.ir.types import torch_dtype
from kernel_helpers import aot_compile_node, check_kernels
from pass_helpers import model_step_feeds, o2_model_graph, step_sizes

OPS = {"rope", "rope1", "rope_cache_write"}
# f16 without the norm reproduces every reference rounding point: bit-exact
TOL = {"f32": dict(atol=1e-5, rtol=1e-5), "f16": dict(atol=0, rtol=0)}
TOL_NORM_F16 = dict(atol=1e-3, rtol=1e-3)    # fp32 sum order in the norm: at most 1 f16 ulp
BLOCK = 4


def _graph(op, hq, hk, d, dtype, style="neox", norm=False, strided=False, w_dtype=None,
           cos_dtype=None, cache_dtype=None, pad_cols=5, block_size=BLOCK, rotary_dim=0,
           scale_f32=False):
    """One `op` node fed by q/k/v inputs, or (strided) by column views of one wide
    [T, (hq + 2 hk) * d + pad_cols] matrix, as a merged QKV GEMM output produces them."""
    g = Graph(op)
    if strided:
        width = (hq + 2 * hk) * d
        qkv = g.add_input("qkv", TensorType((T, width + pad_cols), dtype))
        sizes = [hq * d, hk * d, hk * d] + ([pad_cols] if pad_cols else [])
        parts = g.add_node("split", [qkv], {"sizes": sizes, "dim": -1}).results
        q, k, v = (g.op("reshape", p, shape=[-1, h, d]) for p, h in zip(parts, (hq, hk, hk)))
    else:
        q = g.add_input("q", TensorType((T, hq, d), dtype))
        k = g.add_input("k", TensorType((T, hk, d), dtype))
        v = g.add_input("v", TensorType((T, hk, d), dtype))
    cos = g.add_input("cos", TensorType((T, 1, rotary_dim or d), cos_dtype or dtype))
    sin = g.add_input("sin", TensorType((T, 1, rotary_dim or d), cos_dtype or dtype))
    ws = []
    if norm:
        ws = [g.add_param("q_norm", TensorType((d,), w_dtype or dtype)),
              g.add_param("k_norm", TensorType((d,), w_dtype or dtype))]
    attrs = {"style": style, "eps": 1e-6 if norm else None}
    if rotary_dim:
        attrs["rotary_dim"] = rotary_dim
    if scale_f32:
        attrs["scale_f32"] = True
    if op == "rope1":
        g.set_output("q", g.op("rope1", q, cos, sin, *ws[:1], **attrs))
    elif op == "rope":
        qo, ko = g.add_node("rope", [q, k, cos, sin, *ws], attrs).results
        g.set_output("q", qo)
        g.set_output("k", ko)
    else:
        cdt = cache_dtype or dtype
        kc = g.add_input("k_cache", TensorType((NB, block_size, hk, d), cdt))
        vc = g.add_input("v_cache", TensorType((NB, block_size, hk, d), cdt))
        slots = g.add_input("slot_mapping", TensorType((T,), "i64"))
        g.set_output("q", g.op("rope_cache_write", q, k, v, cos, sin, kc, vc, slots, *ws,
                               **attrs))
    return g


def _feeds(g, tokens, seed, block_size=BLOCK, pad=0):
    """Random q/k/v (scale 2), cos/sin of real angles, caches of noise; the last `pad`
    tokens (and, with more than 3 tokens, one in the middle) have slot -1."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = tokens // block_size + 2
    feeds = {}
    for v in g.inputs:
        dt = torch_dtype(v.type.dtype)
        if v.name in ("cos", "sin"):
            d = v.type.shape[2]
            pos = torch.randint(0, 4096, (tokens, 1, 1), generator=gen).double()
            freqs = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2))
            ang = torch.cat([pos * freqs, pos * freqs + 0.3], -1)   # halves differ on purpose
            feeds[v.name] = (ang.cos() if v.name == "cos" else ang.sin()).to(dt)
        elif v.name == "slot_mapping":
            slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
            if pad:
                slots[tokens - pad:] = -1
            if tokens > 3:
                slots[tokens // 2] = -1
            feeds[v.name] = slots
        elif v.name in ("k_cache", "v_cache"):
            shape = (num_blocks,) + tuple(v.type.shape[1:])
            feeds[v.name] = torch.randn(shape, generator=gen).to(dt)
        else:
            shape = v.type.concrete_shape({"T": tokens})
            feeds[v.name] = (2 * torch.randn(shape, generator=gen)).to(dt)
    params = {n: (1 + 0.3 * torch.randn(p.type.shape, generator=gen)).to(torch_dtype(p.type.dtype))
              for n, p in g.params.items()}
    return feeds, params


def _check(g, tokens, seed=0, tol=None, pad=0):
    feeds, params = _feeds(g, tokens, seed, pad=pad)
    dtype = next(v for v in g.inputs if v.name != "slot_mapping").type.dtype
    if tol is None:
        tol = TOL_NORM_F16 if (dtype == "f16" and g.params) else TOL[dtype]
    check_kernels(g, feeds, params, OPS, {"T": tokens}, **tol)


SHAPES = [(3, 1, 24), (6, 2, 16)]


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("tokens,shape", [(1, SHAPES[0]), (3, SHAPES[1]), (17, SHAPES[0])])
def test_rope_cache_write(style, norm, dtype, tokens, shape):
    g = _graph("rope_cache_write", *shape, dtype, style=style, norm=norm, strided=True)
    _check(g, tokens, seed=tokens, pad=1 if tokens > 1 else 0)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("strided", [False, True])
def test_rope_pair(style, norm, dtype, strided):
    tokens, shape = (3, SHAPES[0]) if strided else (5, SHAPES[1])
    _check(_graph("rope", *shape, dtype, style=style, norm=norm, strided=strided), tokens, seed=7)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_rope1(style, norm, dtype):
    _check(_graph("rope1", 3, 1, 24, dtype, style=style, norm=norm, strided=True), 3, seed=11)


def test_padding_tokens_leave_the_cache_alone():
    """Slot -1 rows still get q' but write nothing; every other cache row stays as it was."""
    g = _graph("rope_cache_write", 6, 2, 16, "f32", strided=True)
    feeds, params = _feeds(g, 4, seed=3)
    feeds["slot_mapping"] = torch.tensor([5, -1, 0, -1])
    check_kernels(g, feeds, params, OPS, {"T": 4}, atol=1e-5, rtol=1e-5)
    feeds["slot_mapping"] = torch.full((4,), -1)
    check_kernels(g, feeds, params, OPS, {"T": 4}, atol=1e-5, rtol=1e-5)


def test_f16_with_f32_norm_weights_and_f32_cos():
    """Mixed dtypes follow torch promotion: q' is f32, k' rounds to the f16 cache."""
    g = _graph("rope_cache_write", 3, 1, 24, "f16", norm=True, strided=True, w_dtype="f32",
               cos_dtype="f32")
    assert g.outputs["q"].type.dtype == "f32"
    _check(g, 3, seed=5, tol=dict(atol=1e-3, rtol=1e-3))
    g = _graph("rope", 3, 1, 24, "f16", norm=True, w_dtype="f32", style="gptj")
    _check(g, 3, seed=6, tol=dict(atol=1e-5, rtol=1e-5))


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_f16_norm_rounding_points_are_exact(style):
    """Integer-valued q/k make the sum of squares exact in any order, so the kernel must hit
    every f16 rounding point of the reference (norm output, weight product, both products
    and the sum) bit for bit."""
    for op in ("rope_cache_write", "rope"):
        g = _graph(op, 6, 2, 16, "f16", style=style, norm=True, strided=op == "rope")
        feeds, params = _feeds(g, 5, seed=12, pad=1)
        gen = torch.Generator().manual_seed(13)
        for name in ("qkv", "q", "k", "v"):
            if name in feeds:
                feeds[name] = torch.randint(-6, 7, feeds[name].shape, generator=gen).half()
        check_kernels(g, feeds, params, OPS, {"T": 5}, atol=0, rtol=0)


@pytest.mark.parametrize("op", ["rope_cache_write", "rope", "rope1"])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("strided", [False, True])
def test_partial_rotary(op, style, dtype, strided):
    """Phi-4's rope on the first 3/4 of each head (12 of 16; 6 pairs, a non power of two)
    and the last quarter copied through, into outputs or the cache."""
    g = _graph(op, 3, 2, 16, dtype, style, strided=strided and op != "rope_cache_write",
               rotary_dim=12)
    _check(g, 7, seed=11, pad=1 if op == "rope_cache_write" else 0)


@pytest.mark.parametrize("op", ["rope_cache_write", "rope1"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gemma_qk_norm_scaled_in_f32(op, dtype):
    """Gemma's QK-norm folded in: (n.f32 * (1 + w)).to(dtype), the f32 weight derived at
    compile time, then the rotation."""
    g = _graph(op, 4, 2, 16, dtype, norm=True, w_dtype="f32", scale_f32=True)
    _check(g, 5, seed=13)


@pytest.mark.parametrize("dtype,cache_dtype", [("f32", "f16"), ("f16", "f32")])
def test_cache_dtype_differs_from_model(dtype, cache_dtype):
    """k' is rounded to its own dtype first, then converted to the cache's (as .to() does)."""
    g = _graph("rope_cache_write", 6, 2, 16, dtype, cache_dtype=cache_dtype, strided=True)
    _check(g, 3, seed=8, tol=dict(atol=0, rtol=0))


def test_many_heads_loop_over_head_blocks():
    """More heads than one tile holds (4096 elements): the head loop runs twice."""
    g = _graph("rope_cache_write", 20, 3, 256, "f32", norm=True, strided=True)
    _check(g, 2, seed=9)
    from kernel_helpers import lower_node
    (launch,), _, _ = lower_node(g, len(g.nodes) - 1)
    assert launch["constexprs"]["BLOCK_HQ"] * 256 < 20 * 256 and launch["grid"][0] == "T"


# -- real -O2 graphs -----------------------------------------------------------------------

def _padded_step(g, pad=2):
    """A mixed prefill + decode step (3-token prefix cached for seq 1) plus `pad` padding rows."""
    feeds = model_step_feeds(g, cached=(0, 2))
    for name, fill in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1)):
        feeds[name] = torch.cat([feeds[name], torch.full((pad,), fill, dtype=feeds[name].dtype)])
    return feeds, step_sizes(feeds)


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}),
    ("llama", {"rope_scaling": "llama3"}),
    ("qwen3", {}),
    ("qwen3_moe", {}),
])
def test_o2_model_graphs(family, overrides, tmp_path_factory):
    if overrides.get("rope_scaling") == "llama3":
        from braze.tiny import tiny_llama3_rope
        overrides = {"rope_scaling": tiny_llama3_rope()}
    g, params = o2_model_graph(family, tmp_path_factory.mktemp(family), **overrides)
    nodes = [n for n in g.nodes if n.op == "rope_cache_write"]
    assert nodes and all(bool(n.operands[8:]) == family.startswith("qwen3") for n in nodes)
    feeds, sizes = _padded_step(g)
    # bit-exact without QK-norm; with it (qwen3) the norm sums in another order than torch:
    # measured at most 1.2e-6 apart
    tol = TOL["f32"] if family.startswith("qwen3") else dict(atol=0, rtol=0)
    check_kernels(g, feeds, params, OPS, sizes, **tol)


def test_o2_qwen3_float16(tmp_path):
    """Bit-exact, QK-norm included: in f16 the kernel rounds where the reference does, and
    the fp32 sum order never moved an f16 result on this graph (measured difference 0.0)."""
    g, params = o2_model_graph("qwen3", tmp_path, seed=2, dtype="float16")
    assert any(n.op == "rope_cache_write" for n in g.nodes)
    feeds, sizes = _padded_step(g)
    check_kernels(g, feeds, params, OPS, sizes, atol=0, rtol=0)


# -- cubins at real sizes ------------------------------------------------------------------

def _resources(kernel) -> dict | None:
    """{"REG": n, "STACK": n, "LOCAL": n, ...} of a cubin from the cuobjdump Triton ships
    (None where it is missing): STACK/LOCAL > 0 means register spills."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)} or None


def _check_cubins(g):
    kernels = aot_compile_node(g, len(g.nodes) - 1)
    assert len(kernels) == 2 and all(k.asm.get("cubin") for k in kernels)
    for k in kernels:
        assert k.metadata.shared <= 16384, k.metadata.shared
        res = _resources(k)
        if res is not None:       # everything lives in registers: no spills
            assert res["STACK"] == 0 and res["LOCAL"] == 0 and res["REG"] <= 128, res
    return kernels


REAL = {"llama3-8b": (32, 8, 128, False), "qwen3-30b-a3b": (32, 4, 128, True)}


@pytest.mark.parametrize("op,model", [("rope_cache_write", "llama3-8b"),
                                      ("rope_cache_write", "qwen3-30b-a3b"),
                                      ("rope", "qwen3-30b-a3b"), ("rope1", "llama3-8b")])
def test_compiles_bf16_for_sm80_and_sm90(op, model):
    hq, hk, d, norm = REAL[model]
    g = _graph(op, hq, hk, d, "bf16", norm=norm, strided=True, pad_cols=0, block_size=16)
    for k in _check_cubins(g):     # neox: no layout shuffles through shared memory
        assert k.metadata.shared <= 1024, k.metadata.shared


@pytest.mark.parametrize("shape", [(32, 8, 128), (64, 8, 128), (6, 2, 16)])
def test_gptj_and_odd_shapes_compile(shape):
    _check_cubins(_graph("rope_cache_write", *shape, "bf16", style="gptj", norm=True,
                         strided=True))


@pytest.mark.parametrize("model", ["phi4-mini", "gemma3-27b", "gemma3-1b"])
def test_new_families_compile_bf16_for_sm80_and_sm90(model):
    """Phi-4-mini: 24 / 8 heads of 128, rope on 96; Gemma 3: the (1 + w) QK-norm folded in
    (head_dim 128 at 27B, 256 at 1B with one kv head)."""
    if model == "phi4-mini":
        g = _graph("rope_cache_write", 24, 8, 128, "bf16", strided=True, pad_cols=0,
                   block_size=16, rotary_dim=96)
    else:
        hq, hk, d = (32, 16, 128) if model == "gemma3-27b" else (4, 1, 256)
        g = _graph("rope_cache_write", hq, hk, d, "bf16", norm=True, w_dtype="f32",
                   scale_f32=True, strided=True, pad_cols=0, block_size=16)
    _check_cubins(g)
