"""The LoRA shrink/expand kernels against the lora op's torch reference (Triton interpreter),
with odd shapes, merged parts and base tokens mixed in, and their cubins at real sizes."""

from __future__ import annotations

import pytest
import torch

from braze.ir import Graph, T, TensorType
from braze.ir.types import torch_dtype
from kernel_helpers import aot_compile_node, check_kernels

OPS = {"lora"}


def _graph(H, sizes, K, R, dtype, x_wide=0):
    """lora(x, a, b, slots) {sizes}; with `x_wide`, x is a column slice of a wider input
    (a strided row)."""
    g = Graph("lora")
    if x_wide:
        big = g.add_input("xw", TensorType((T, H + x_wide), dtype))
        x = g.op("slice", big, dim=-1, start=x_wide, end=None)
    else:
        x = g.add_input("x", TensorType((T, H), dtype))
    a = g.add_input("a", TensorType((K, R * len(sizes), H), dtype))
    b = g.add_input("b", TensorType((K, sum(sizes), R), dtype))
    slots = g.add_input("slots", TensorType((T,), "i32"))
    g.set_output("d", g.op("lora", x, a, b, slots, sizes=sizes))
    return g


def _feeds(g, tokens, K, seed):
    gen = torch.Generator().manual_seed(seed)
    feeds = {}
    for v in g.inputs:
        shape = v.type.concrete_shape({"T": tokens})
        if v.name == "slots":
            feeds[v.name] = torch.randint(-1, K, shape, generator=gen).to(torch.int32)
        else:
            feeds[v.name] = torch.randn(shape, generator=gen).to(torch_dtype(v.type.dtype))
    return feeds


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("f16", 2e-3)])   # f32 sums in another order
@pytest.mark.parametrize("H,sizes,K,R", [
    (64, [64, 32, 32], 3, 8),          # a merged QKV (GQA) at rank 8
    (24, [5, 7, 9], 2, 3),             # odd everything, three parts
    (200, [48, 48], 4, 16),            # gate/up: H wider than one K block
    (40, [300], 1, 5),                 # one part, O wider than one output block
    (24, [20, 12], 2, 70),             # a rank wider than one R block
])
@pytest.mark.parametrize("tokens", [1, 7, 45])
def test_lora_kernels_match_reference(dtype, tol, H, sizes, K, R, tokens):
    g = _graph(H, sizes, K, R, dtype)
    check_kernels(g, _feeds(g, tokens, K, H + tokens), {}, OPS, {"T": tokens}, tol, tol)


def test_lora_kernels_read_a_strided_input_and_skip_base_tokens():
    g = _graph(32, [16, 16], 2, 4, "f32", x_wide=5)
    feeds = _feeds(g, 6, 2, 0)
    feeds["slots"] = torch.tensor([-1, 1, -1, 0, 1, -1], dtype=torch.int32)
    check_kernels(g, feeds, {}, OPS, {"T": 6}, 1e-5, 1e-5)


@pytest.mark.parametrize("H,sizes,R", [(4096, [4096, 1024, 1024], 16), (4096, [14336, 14336], 64),
                                       (14336, [4096], 8), (4096, [4096], 128)])
def test_lora_kernels_compile_to_cubins(H, sizes, R):
    """bf16 at Llama-3-8B sizes (QKV, gate/up at rank 64, down, o at rank 128) for sm_80
    and sm_90."""
    kernels = aot_compile_node(_graph(H, sizes, 4, R, "bf16"), 0)
    assert len(kernels) == 2 * (1 + len(sizes)) and all(k for k in kernels)   # shrink + expands
