"""The shard pass on IR text: which weights split how, where the collectives go.

Its meaning (ranks' logits equal one rank's) is tested over gloo process groups in
tests/test_tensor_parallel.py."""

from __future__ import annotations

import textwrap

import pytest

from braze.ir import parse_graph, print_graph, verify
from braze.ir.errors import BrazeError
from pass_helpers import run_passes

MLP = """
graph @g(%x: f32[T, 8]) {{
  param @gate: f32[{i}, 8]
  param @up: f32[{i}, 8]
  param @down: f32[8, {i}]
  %0: f32[T, {i}] = linear(%x, @gate)
  %1: f32[T, {i}] = silu(%0)
  %2: f32[T, {i}] = linear(%x, @up)
  %3: f32[T, {i}] = mul(%1, %2)
  %4: f32[T, 8] = linear(%3, @down)
  %5: f32[T, 8] = add(%x, %4)
  return out=%5
}}
"""


def _shard(text, n):
    g = parse_graph(textwrap.dedent(text))
    verify(g)
    g, ctx = run_passes(g, ["shard"], tensor_parallel_size=n)
    return g, ctx.records.get("shards", {})


def test_gate_up_column_down_row_then_one_all_reduce():
    g, shards = _shard(MLP.format(i=16), 2)
    assert shards == {"gate": {"dim": 0, "ranges": [[0, 8], [8, 16]]},
                      "up": {"dim": 0, "ranges": [[0, 8], [8, 16]]},
                      "down": {"dim": 1, "ranges": [[0, 8], [8, 16]]}}
    text = print_graph(g)
    assert "param @gate: f32[8, 8]" in text and "param @down: f32[8, 8]" in text
    assert "%3: f32[T, 8] = mul(%1, %2)" in text
    (red,) = [n for n in g.nodes if n.op == "all_reduce"]
    assert red.operands[0].name == "4" and red.attrs["group_size"] == 2
    add = g.nodes[-1]
    assert add.op == "add" and add.operands[1] is red.results[0]
    assert g.meta["tensor_parallel_size"] == 2


def test_one_rank_changes_nothing():
    g, shards = _shard(MLP.format(i=16), 1)
    assert shards == {} and print_graph(g) == print_graph(parse_graph(textwrap.dedent(MLP.format(i=16))))


def test_uneven_intermediate_is_refused_naming_it():
    with pytest.raises(BrazeError, match=r"intermediate_size \(15, dim 0 of @(gate|up)\) is not "
                                         r"divisible by --tensor-parallel-size 2"):
        _shard(MLP.format(i=15), 2)


# tied: one table is the embedding and the LM head; a soft-cap after the head
VOCAB = """
graph @g(%ids: i64[T]) {{
  param @emb: f32[{v}, 8]
  %0: f32[T, 8] = embedding(%ids, @emb)
  %1: f32[T, 8] = silu(%0)
  %2: f32[T, {v}] = linear(%1, @emb)
  %3: f32[T, {v}] = tanh(%2)
  return logits=%3
}}
"""


@pytest.mark.parametrize("v,n,local", [(301, 2, 160), (301, 4, 80), (17, 4, 16)])
def test_a_vocab_the_ranks_do_not_divide_is_padded_and_gathered_back_to_its_size(v, n, local):
    import torch

    from braze.ir.types import T
    from braze.passes.shard import rank_loader
    g, shards = _shard(VOCAB.format(v=v), n)
    verify(g)
    ranges = [[r * local, (r + 1) * local] for r in range(n)]
    assert shards["emb"] == {"dim": 0, "ranges": ranges, "size": v}
    assert shards["tp.vocab_start"] == {"values": [[a] for a, _ in ranges]}
    assert g.params["emb"].type.shape == (local, 8)
    out = g.outputs["logits"]
    assert out.type.shape == (T, v)          # the true vocabulary, not n * local
    assert out.producer.op == "all_gather" and out.producer.attrs == {"group_size": n, "size": v}
    assert out.producer.operands[0].producer.op == "tanh"
    # each rank's shard: its real rows, then zeros (17 rows at 4 ranks: ranks 2 and 3 hold
    # only padding); read whole and narrowed, or by the part-reader
    whole = torch.randn(v, 8)
    parts = lambda name, dim, a, b: whole.narrow(dim, a, b - a)   # noqa: E731
    for part in (None, parts):
        got = [rank_loader(lambda name: whole, shards, r, part)("emb") for r in range(n)]
        assert all(t.shape == (local, 8) for t in got)
        assert torch.equal(torch.cat(got)[:v], whole) and not torch.cat(got)[v:].any()


# two tables of different vocabularies (Gemma 3n: 262400 tokens, its per-layer table 262144)
TWO_TABLES = """
graph @g(%ids: i64[T]) {
  param @emb: f32[301, 8]
  param @ple: f32[256, 8]
  %0: f32[T, 8] = embedding(%ids, @emb)
  %1: f32[T, 8] = embedding(%ids, @ple)
  %2: f32[T, 8] = add(%0, %1)
  %3: f32[T, 301] = linear(%2, @emb)
  return logits=%3
}
"""


def test_each_vocabulary_gets_its_own_start():
    g, shards = _shard(TWO_TABLES, 2)
    starts = {n.operands[1].name: n.operands[2].name for n in g.nodes if n.op == "embedding_shard"}
    assert shards[starts["emb"]] == {"values": [[0], [160]]}
    assert shards[starts["ple"]] == {"values": [[0], [128]]}
