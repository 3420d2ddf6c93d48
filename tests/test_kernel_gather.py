"""The data-movement kernels (index_select, cat) against the reference ops (Triton interpreter),
on real -O2 model graphs, and their cubins at real model sizes."""

from __future__ import annotations

import pytest
import torch

from braze.ir import Graph, S, T, TensorType
from braze.ir.types import torch_dtype
from kernel_helpers import aot_compile_node, check_kernels, lower_node, run_with_kernels
from pass_helpers import model_step_feeds, o2_model_graph, step_sizes

OPS = {"index_select", "cat"}


def _feeds(g, sizes, seed, index_high=None):
    gen = torch.Generator().manual_seed(seed)
    feeds = {}
    for v in g.inputs:
        shape = v.type.concrete_shape(sizes)
        if v.name == "idx":
            feeds[v.name] = torch.randint(0, index_high, shape, generator=gen).to(torch_dtype(v.type.dtype))
        else:
            feeds[v.name] = torch.randn(shape, generator=gen).to(torch_dtype(v.type.dtype))
    return feeds


def _select_graph(shape, dim, n_index, dtype="f32", index_dtype="i64", wide=0):
    """index_select(x, idx) {dim}; with `wide`, x is a column slice of a wider input."""
    g = Graph("sel")
    if wide:
        big = g.add_input("x", TensorType(tuple(shape[:-1]) + (shape[-1] + wide,), dtype))
        x = g.op("slice", big, dim=-1, start=wide, end=None)
    else:
        x = g.add_input("x", TensorType(tuple(shape), dtype))
    idx = g.add_input("idx", TensorType((n_index,), index_dtype))
    g.set_output("y", g.op("index_select", x, idx, dim=dim))
    return g


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("hidden", [64, 24, 1000, 5000])
@pytest.mark.parametrize("tokens,seqs", [(1, 1), (3, 2), (17, 4)])
def test_index_select_rows_like_prune_logits(dtype, hidden, tokens, seqs):
    g = _select_graph((T, hidden), 0, S, dtype)
    sizes = {"T": tokens, "S": seqs}
    check_kernels(g, _feeds(g, sizes, hidden + tokens, index_high=tokens), {}, OPS, sizes, 0, 0)


@pytest.mark.parametrize("index_dtype", ["i64", "i32"])
def test_index_select_strided_source(index_dtype):
    g = _select_graph((T, 40), 0, S, "f16", index_dtype, wide=9)
    sizes = {"T": 17, "S": 5}
    check_kernels(g, _feeds(g, sizes, 1, index_high=17), {}, OPS, sizes, 0, 0)


@pytest.mark.parametrize("shape,dim", [((T, 5, 24), 1), ((T, 5, 24), 0), ((T, 37), 1),
                                       ((T, 37), -1), ((40,), 0), ((2, T, 3, 9), 2),
                                       ((3, T, 4), -2), ((T, 9000), 0)])
def test_index_select_any_dim(shape, dim):
    g = _select_graph(shape, dim, S)
    sizes = {"T": 6, "S": 5}
    n = TensorType(shape, "f32").concrete_shape(sizes)[dim]
    check_kernels(g, _feeds(g, sizes, 2, index_high=n), {}, OPS, sizes, 0, 0)


def test_index_select_out_of_range_index_gives_zero_rows():
    g = _select_graph((T, 24), 0, S)
    x = torch.randn(4, 24)
    idx = torch.tensor([2, -1, 4, 0, 99])
    got = run_with_kernels(g, {"x": x, "idx": idx}, {}, OPS, {"T": 4, "S": 5})["y"]
    torch.testing.assert_close(got[[0, 3]], x[[2, 0]], atol=0, rtol=0)
    assert not got[[1, 2, 4]].any()


def _cat_graph(shapes, dim, dtype="f32", same=False, wide=0):
    g = Graph("cat")
    xs = []
    for i, shape in enumerate(shapes[:1] if same else shapes):
        if wide:
            big = g.add_input(f"x{i}", TensorType(tuple(shape[:-1]) + (shape[-1] + wide,), dtype))
            xs.append(g.op("slice", big, dim=-1, start=0, end=shape[-1]))
        else:
            xs.append(g.add_input(f"x{i}", TensorType(tuple(shape), dtype)))
    if same:
        xs = xs * len(shapes)
    g.set_output("y", g.op("cat", *xs, dim=dim))
    return g


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_cat_rope_halves(dtype, tokens):
    """cat(f, f) {dim=-1}: the RoPE preamble; one launch writes both halves."""
    g = _cat_graph([(T, 8), (T, 8)], -1, dtype, same=True)
    launches, _, _ = lower_node(g, 0)
    assert len(launches) == 1 and launches[0]["constexprs"]["NREP"] == 2
    sizes = {"T": tokens}
    check_kernels(g, _feeds(g, sizes, tokens), {}, OPS, sizes, 0, 0)


@pytest.mark.parametrize("shapes,dim", [
    ([(T, 5), (T, 11), (T, 64)], -1),             # distinct widths, not powers of two
    ([(T, 3, 12), (T, 3, 12)], 2),                # per-head halves
    ([(T, 4, 6, 1), (T, 4, 6, 1)], -1),           # GPT-J rotation pieces
    ([(T, 24), (S, 24), (2, 24)], 0),             # leading dim, symbolic offsets
    ([(T, 2, 9), (T, 5, 9)], 1),
    ([(3, T, 4), (3, T, 4)], 1),
    ([(7,), (T,)], 0),
    ([(T, 5000), (T, 9000)], -1),                 # rows wider than one block
])
@pytest.mark.parametrize("wide", [0, 3])
def test_cat_shapes_and_strides(shapes, dim, wide):
    if wide and len(shapes[0]) == 1:
        pytest.skip("1-D operands have no columns to slice")
    g = _cat_graph(shapes, dim, "f16", wide=wide)
    sizes = {"T": 5, "S": 2}
    check_kernels(g, _feeds(g, sizes, 3), {}, OPS, sizes, 0, 0)


def test_cat_repeated_operand_runs():
    g = Graph("cat")
    a = g.add_input("x0", TensorType((T, 6), "f32"))
    b = g.add_input("x1", TensorType((T, 10), "f32"))
    g.set_output("y", g.op("cat", a, a, b, a, a, a, dim=1))
    assert [ln["constexprs"]["NREP"] for ln in lower_node(g, 0)[0]] == [2, 1, 3]
    check_kernels(g, _feeds(g, {"T": 3}, 4), {}, OPS, {"T": 3}, 0, 0)


# -- real -O2 graphs -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
def test_o2_model_graphs(family, tmp_path_factory):
    """The RoPE table gather of -O2 graphs (tabulate-positions: cos/sin rows by position,
    no cat left) through the kernel."""
    g, params = o2_model_graph(family, tmp_path_factory.mktemp(family))
    assert {n.op for n in g.nodes} & OPS == {"index_select"}
    feeds = model_step_feeds(g, cached=(0, 2))
    check_kernels(g, feeds, params, OPS, step_sizes(feeds), atol=0, rtol=0)


# -- cubins at real sizes ------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [4096, 2048])
def test_index_select_compiles_bf16(hidden):
    kernels = aot_compile_node(_select_graph((T, hidden), 0, S, "bf16"), 0)
    assert len(kernels) == 2 and all(k.asm.get("cubin") for k in kernels)


def test_cat_compiles_bf16():
    kernels = aot_compile_node(_cat_graph([(T, 64), (T, 64)], -1, "bf16", same=True), 0)
    assert len(kernels) == 2 and all(k.asm.get("cubin") for k in kernels)
    kernels = aot_compile_node(_cat_graph([(T, 24), (S, 24)], 0, "bf16"), 0)
    assert len(kernels) == 4
