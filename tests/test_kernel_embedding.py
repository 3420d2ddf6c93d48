"""The embedding gather kernel against the reference op (Triton interpreter), and its cubins."""

from __future__ import annotations

import pytest
import torch

from braze.ir import Graph, T, TensorType
from kernel_helpers import aot_compile_node, check_kernels


def _graph(vocab, hidden, dtype):
    g = Graph("emb")
    ids = g.add_input("ids", TensorType((T,), "i64"))
    w = g.add_param("w", TensorType((vocab, hidden), dtype))
    g.set_output("y", g.op("embedding", ids, w))
    return g


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("vocab,hidden", [(37, 24), (5, 1100)])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_embedding_matches_reference(tokens, vocab, hidden, dtype):
    g = _graph(vocab, hidden, dtype)
    gen = torch.Generator().manual_seed(tokens)
    feeds = {"ids": torch.randint(0, vocab, (tokens,), generator=gen)}
    params = {"w": torch.randn(vocab, hidden, generator=gen).to(getattr(torch, {"f32": "float32", "f16": "float16"}[dtype]))}
    check_kernels(g, feeds, params, {"embedding"}, {"T": tokens}, atol=0, rtol=0)


def test_embedding_compiles_for_sm80_and_sm90():
    kernels = aot_compile_node(_graph(128256, 4096, "bf16"), 0)
    assert len(kernels) == 2 and all(k.asm.get("cubin") for k in kernels)
